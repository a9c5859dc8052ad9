"""DPO on the generator with trl's ``DPOTrainer`` and LoRA adapters through peft
(paper section 4; DESIGN section 1, lever 2).

The generator is a ``LlamaForCausalLM`` over ``[prompt block][<boi>][image tokens]``
whose image token ``k`` is id ``text_vocab + k``; it scores an image with
:meth:`ShapesGenerator.image_logprobs`, where only the image codes compete (text logits
are masked out, as in sampling). trl's DPOTrainer computes per-token log-probabilities
of the completion over the model's *full* vocabulary, with a fused LM head that
multiplies the hidden states by ``lm_head.weight`` (plus ``lm_head.bias``) directly, so
neither a forward hook on ``lm_head`` nor a logits processor would be seen. Two pieces
make the two agree exactly:

- **the data** is given pre-tokenized in the generator's own ids: ``prompt_ids`` =
  prompt block + ``<boi>`` (13 ids), ``chosen_ids`` / ``rejected_ids`` = the 256 image
  tokens (:func:`pairs_dataset`); :class:`ImageDPOTrainer` passes such a dataset through
  unchanged (trl 1.16 always re-tokenizes text columns and appends an EOS token, which
  would add a text token to every completion), and trl's own collator builds
  ``prompt + completion`` sequences and completion masks from it. No padding occurs
  (every sequence has the same length) and nothing is truncated (``max_length=None``).
- **the head**: :func:`mask_text_logits` gives ``lm_head`` a non-persistent bias buffer,
  0 for image codes and :data:`TEXT_LOGIT_MASK` for text ids. trl's fused head adds
  ``lm_head.bias``, so its log-softmax runs over the image codes only (``exp(-1e4)`` is
  0 in float32, bfloat16 and float16 alike); the ordinary forward adds it too. The buffer
  is not saved (non-persistent), and :func:`unmask_text_logits` removes it.

Every position trl scores (labels != -100) is an image position, so the masked head
equals ``image_logprobs`` there (``tests/test_align.py`` checks it through trl's own
:meth:`DPOTrainer.compute_ref_log_probs`).

Reference model: the generator without adapters (trl's default with ``peft_config``:
adapters disabled). Iterative DPO starts round 2 from round 1's *merged* generator, so
its reference is the round-1 model. The aligned generator is saved with merged weights
as a :class:`ShapesGenerator` folder; the adapter alone under ``adapter/``.

Classifier-free guidance: the generator is sampled with CFG against its null prompt.
The pairs carry real prompts only; the unconditional branch is left to the shared
weights (LoRA changes it too, a little). DPO raises the chosen images' likelihood under
the prompt more than under the null prompt, which is what guidance amplifies.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cotgen.generator.model import ShapesGenerator

#: Bias given to text ids in the masked LM head: far below any logit, finite in fp16.
TEXT_LOGIT_MASK = -1.0e4

ADAPTER_DIR = "adapter"


# ---------------------------------------------------------------------------- the head
def mask_text_logits(model, text_vocab: int) -> None:
    """Give ``model``'s LM head a non-persistent bias: 0 for ids >= ``text_vocab`` (image
    codes), :data:`TEXT_LOGIT_MASK` below; idempotent. Raises ValueError if the head
    already has a trained bias."""
    head = model.get_output_embeddings()
    if "bias" in head._buffers:
        head._buffers["bias"][:text_vocab] = TEXT_LOGIT_MASK
        return
    if head.bias is not None:
        raise ValueError("the LM head has a bias of its own; cannot mask text logits with it")
    mask = torch.zeros(head.weight.shape[0], dtype=head.weight.dtype, device=head.weight.device)
    mask[:text_vocab] = TEXT_LOGIT_MASK
    del head.bias
    head.register_buffer("bias", mask, persistent=False)


def unmask_text_logits(model) -> None:
    """Undo :func:`mask_text_logits` (no-op if the head is not masked)."""
    head = model.get_output_embeddings()
    if "bias" in head._buffers:
        del head._buffers["bias"]
        head.register_parameter("bias", None)


# ---------------------------------------------------------------------------- the data
def pairs_dataset(generator: ShapesGenerator, pairs: Sequence[dict]):
    """A ``datasets.Dataset`` of pre-tokenized preference pairs in the generator's ids:
    ``prompt_ids`` (prompt block + ``<boi>``), ``chosen_ids`` / ``rejected_ids``
    (``text_vocab + code`` for each of the ``g*g`` image codes).

    Raises:
        ValueError: no pairs, or a pair whose sides are not ``g*g`` valid codes (named by
            its index; nothing is truncated or padded).
    """
    from datasets import Dataset

    if not pairs:
        raise ValueError("no preference pairs to train on")
    rows = []
    blocks = generator.prefix(generator.encode_prompts([p["prompt"] for p in pairs]))
    for i, (pair, block) in enumerate(zip(pairs, blocks)):
        sides = {}
        for side in ("chosen", "rejected"):
            codes = torch.as_tensor(pair[side], dtype=torch.long)
            if codes.numel() != generator.num_image_tokens or codes.min() < 0 or codes.max() >= generator.codebook_size:
                raise ValueError(f"pair {i} ({pair['prompt']!r}): {side} must be {generator.num_image_tokens} codes in "
                                 f"[0, {generator.codebook_size}), got {codes.numel()}")
            sides[f"{side}_ids"] = (codes + generator.text_vocab).tolist()
        rows.append({"prompt_ids": block.tolist(), **sides})
    return Dataset.from_list(rows)


def _trainer_class():
    from trl import DPOTrainer

    class ImageDPOTrainer(DPOTrainer):
        """trl's DPOTrainer that takes pre-tokenized pairs (``prompt_ids``,
        ``chosen_ids``, ``rejected_ids``) as they are; any other dataset goes through
        trl's own preparation."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(dataset.column_names):
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    return ImageDPOTrainer


def dpo_config(
    out_dir: str | Path,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    steps: int = 100,
    batch_size: int = 8,
    learning_rate: float = 5e-4,
    warmup_steps: int = 0,
    seed: int = 0,
    progress: bool = True,
):
    """trl's ``DPOConfig`` for the generator: ``steps`` optimiser steps, no truncation,
    no gradient checkpointing (tiny model), no checkpoints, bf16 only on a GPU that has
    it (the CPU runs float32)."""
    from trl import DPOConfig

    cuda = torch.cuda.is_available()
    return DPOConfig(
        output_dir=str(Path(out_dir) / "trainer"), beta=beta, loss_type=[loss_type], max_steps=steps,
        per_device_train_batch_size=batch_size, per_device_eval_batch_size=batch_size, learning_rate=learning_rate,
        warmup_steps=min(warmup_steps, steps // 10), lr_scheduler_type="linear", logging_steps=max(1, steps // 20),
        max_length=None, pad_to_multiple_of=None, gradient_checkpointing=False,
        bf16=bool(cuda and torch.cuda.is_bf16_supported()), use_cpu=not cuda, save_strategy="no", report_to=[],
        seed=seed, dataloader_num_workers=0, disable_tqdm=not progress,
    )


def lora_config(rank: int = 8, alpha: int = 16, target_modules: Sequence[str] = ("q_proj", "v_proj")):
    """peft's ``LoraConfig`` for the generator's Llama blocks (never ``lm_head``: trl's
    fused head reads its weight directly)."""
    from peft import LoraConfig

    if "lm_head" in target_modules:
        raise ValueError("LoRA on lm_head is not supported by trl's DPOTrainer; target the Llama blocks")
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=0.0,
                      task_type="CAUSAL_LM")


def build_trainer(generator: ShapesGenerator, pairs: Sequence[dict], args, lora, heldout: Sequence[dict] = (),
                  callbacks=()):
    """An :class:`ImageDPOTrainer` on ``generator.model`` (text logits masked, LoRA from
    ``lora``, reference = adapters disabled)."""
    mask_text_logits(generator.model, generator.text_vocab)
    generator.model.train()
    return _trainer_class()(
        model=generator.model, args=args, train_dataset=pairs_dataset(generator, pairs),
        eval_dataset=pairs_dataset(generator, heldout) if heldout else None,
        processing_class=generator.text_tokenizer, peft_config=lora, callbacks=list(callbacks),
    )


def _history(log_history: list[dict]) -> dict:
    """Training curves from the trainer's log: step -> loss / margins / accuracies."""
    keys = {"loss": "loss", "rewards/margins": "margin", "rewards/accuracies": "accuracy",
            "rewards/chosen": "reward_chosen", "rewards/rejected": "reward_rejected"}
    rows = [{"step": e["step"], **{v: float(e[k]) for k, v in keys.items() if k in e}}
            for e in log_history if "loss" in e]
    return {"log": rows}


def train_dpo(
    generator: ShapesGenerator,
    pairs: Sequence[dict],
    out_dir: str | Path,
    heldout: Sequence[dict] = (),
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    lora_rank: int = 8,
    lora_alpha: int = 16,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    steps: int = 100,
    batch_size: int = 8,
    learning_rate: float = 5e-4,
    warmup_steps: int = 0,
    seed: int = 0,
    max_seconds: float | None = None,
    progress: bool = True,
) -> tuple[ShapesGenerator, dict]:
    """DPO with LoRA on ``generator`` from preference ``pairs`` (see the module).

    Writes ``out_dir/generator`` (a :class:`ShapesGenerator` folder, merged weights) and
    ``out_dir/adapter`` (the LoRA adapter alone, peft format). ``heldout`` pairs (other
    prompts) are scored by trl after training. ``max_seconds`` stops early (wall clock).

    Returns:
        ``(aligned generator loaded from out_dir/generator, metrics)``: ``pairs``,
        ``steps``, ``seconds``, ``train_loss``, the first and last logged ``loss`` /
        ``margin`` / ``accuracy``, the training ``log``, ``heldout`` (trl's eval metrics)
        and ``merge_max_abs_diff``: the largest difference of ``image_logprobs`` on the
        first pairs between the adapted model and the saved, reloaded merged generator.
    """
    from cotgen.training import Deadline

    out_dir = Path(out_dir)
    config = generator.model.config
    saved_pad = config.pad_token_id, generator.model.generation_config.pad_token_id
    args = dpo_config(out_dir, beta, loss_type, steps, batch_size, learning_rate, warmup_steps, seed, progress)
    deadline = Deadline(max_seconds)
    policy = ShapesGenerator(copy.deepcopy(generator.model), generator.text_tokenizer, generator.image_tokenizer,
                             generator.prompt_len)  # peft injects its layers in place: leave the caller's model alone
    trainer = build_trainer(policy, pairs, args, lora_config(lora_rank, lora_alpha, target_modules), heldout,
                            [deadline])
    result = trainer.train()
    seconds = time.monotonic() - deadline.start
    metrics = {"pairs": len(pairs), "heldout_pairs": len(heldout), "steps": int(trainer.state.global_step),
               "seconds": seconds, "train_loss": float(result.training_loss), **_history(trainer.state.log_history)}
    log = metrics["log"]
    if log:
        for key in ("loss", "margin", "accuracy"):
            metrics[f"first_{key}"], metrics[f"last_{key}"] = log[0].get(key), log[-1].get(key)
    if heldout:
        metrics["heldout"] = {k.removeprefix("eval_"): float(v) for k, v in trainer.evaluate().items()
                              if isinstance(v, (int, float))}

    peft_model = trainer.model.to("cpu")
    peft_model.eval()
    probe = list(pairs[: min(8, len(pairs))])
    probe_prompts = [p["prompt"] for p in probe]
    probe_tokens = torch.tensor([p["chosen"] for p in probe], dtype=torch.long)
    adapted = ShapesGenerator(peft_model, generator.text_tokenizer, generator.image_tokenizer, generator.prompt_len)
    with torch.no_grad():
        adapted_lp = adapted.image_logprobs(probe_prompts, probe_tokens.cpu())
    peft_model.save_pretrained(out_dir / ADAPTER_DIR)
    merged = peft_model.merge_and_unload()
    unmask_text_logits(merged)
    merged.config.pad_token_id, merged.generation_config.pad_token_id = saved_pad
    merged = merged.to("cpu").eval()
    ShapesGenerator(merged, generator.text_tokenizer, generator.image_tokenizer, generator.prompt_len).save_pretrained(
        out_dir / "generator")
    aligned = ShapesGenerator.from_pretrained(out_dir / "generator")
    with torch.no_grad():
        merged_lp = aligned.image_logprobs(probe_prompts, probe_tokens)
    metrics["merge_max_abs_diff"] = float((adapted_lp.cpu() - merged_lp).abs().max())
    return aligned, metrics


def pair_logprob_margin(generator: ShapesGenerator, pairs: Sequence[dict], batch_size: int = 16) -> np.ndarray:
    """``image_logprobs(chosen) - image_logprobs(rejected)`` per pair, ``(P,)`` float64."""
    out = []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            prompts = [p["prompt"] for p in chunk]
            c = generator.image_logprobs(prompts, torch.tensor([p["chosen"] for p in chunk]))
            r = generator.image_logprobs(prompts, torch.tensor([p["rejected"] for p in chunk]))
            out.append((c - r).double().numpy())
    return np.concatenate(out) if out else np.zeros(0)

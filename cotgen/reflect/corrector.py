"""PARM++'s self-correction generator (paper section 5): given the prompt, the previous
image and the judge's reflection, generate a corrected image.

Layout (one ``LlamaForCausalLM`` sequence, the same for every row, so no attention
mask is needed and the StepwiseSampler's batching and KV cache work unchanged):

    [prompt block (prompt_len)][reflection block (reflection_len)][<boi>][previous image (g*g)][<boi>][new image (g*g)]

- the reflection block holds the reflection's words, left-padded with ``<pad>``; the
  text vocabulary is the world's plus every reflection word
  (:func:`cotgen.reflect.text.reflection_words`), appended after the world's words so
  that their ids are unchanged; image code ``k`` moves to ``T' + k``.
- ``[reflection block][<boi>][previous image]`` is the sampler's ``condition``
  (:class:`cotgen.generator.sampling.StepwiseSampler`); the unconditional (CFG) rows
  have a null prompt *and* a null reflection but keep the previous image.
- a first round has no previous image: a blank canvas (the image tokenizer's
  ``background_tokens``) and an empty reflection; the corrector is trained on such
  rows too, so it is also a text-to-image generator.

:func:`corrector_from_generator` widens the base generator (embedding rows copied,
new words' rows initialised at the mean text embedding; ``max_position_embeddings``
raised: RoPE needs no new weights). :func:`train_corrector` fine-tunes it with LoRA
(peft) on the Llama blocks, the embeddings and the LM head being fully trained
(``modules_to_save``: the new words must be learnt), loss on the new image's codes only
(text logits out of the softmax, as in sampling), then merges the adapters.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cotgen.generator.model import ShapesGenerator
from cotgen.reflect.text import REFLECTION_LEN, YES, reflection_words

CORRECTOR_FILE = "corrector.json"
COPY_FILE = "copy_embedding.safetensors"


def corrector_text_tokenizer():
    """The world's word-level tokenizer with every reflection word appended (the
    world's words keep their ids)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from cotgen.tokenizer.text import BOI, EOI, PAD, SPECIAL_TOKENS, UNK, world_words

    words = [*SPECIAL_TOKENS, *world_words()]
    words += [w for w in reflection_words() if w not in words]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.Strip(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, unk_token=UNK,
                                   additional_special_tokens=[BOI, EOI], model_max_length=64, padding_side="right")


class SelfCorrector:
    """A :class:`ShapesGenerator` read with the self-correction layout.

    Args:
        generator: its text tokenizer must know every reflection word.
        reflection_len: words in the reflection block.
        aligned_positions: the new image takes the previous image's RoPE positions (sets
            the generator's :attr:`~cotgen.generator.model.ShapesGenerator.position_shift`;
            the sampler and :meth:`image_logprobs` pass them). Without it, copying a kept cell
            means attending 257 positions back, which 1,000 LoRA steps did not learn (stop 24).
        copy_input: the input that predicts the new image's cell ``j`` also receives a learnt
            embedding of the previous image's code at cell ``j`` (sets the generator's
            :attr:`~cotgen.generator.model.ShapesGenerator.copy_embedding`, ``(K, hidden)``
            float32, zero at the start so the widened generator is unchanged). Neither LoRA
            nor aligned positions learnt to copy kept cells in 300-1,000 steps (stop 24).
    """

    def __init__(self, generator: ShapesGenerator, reflection_len: int = REFLECTION_LEN,
                 aligned_positions: bool = False, copy_input: bool = False) -> None:
        self.generator = generator
        self.reflection_len = reflection_len
        self.aligned_positions = aligned_positions
        self.copy_input = copy_input
        # [<boi>][new image] take the positions of [<boi>][previous image]: the code to copy from the
        # previous image then sits one position ahead of the input that predicts it, at every cell
        boi2 = self.new_image_start - 1
        generator.position_shift = (boi2, 1 + generator.num_image_tokens) if aligned_positions else None
        generator.copy_split = boi2 if copy_input else None
        if not copy_input:
            generator.copy_embedding = None
        elif generator.copy_embedding is None:
            generator.copy_embedding = torch.nn.Embedding(generator.codebook_size, generator.model.config.hidden_size)
            torch.nn.init.zeros_(generator.copy_embedding.weight)
        vocab = generator.text_tokenizer.get_vocab()
        lacking = [w for w in reflection_words() if w not in vocab]
        if lacking:
            raise ValueError(f"the corrector's text tokenizer lacks reflection words: {lacking[:8]}")

    @property
    def condition_length(self) -> int:
        return self.reflection_len + 1 + self.generator.num_image_tokens

    @property
    def new_image_start(self) -> int:
        """Sequence index of the new image's first code (after the second ``<boi>``)."""
        return self.generator.prompt_len + self.condition_length + 1

    def encode_reflections(self, texts: Sequence[str]) -> torch.Tensor:
        """Reflection blocks ``(P, reflection_len)`` long, left-padded; ``""`` or ``"yes"``
        give an empty block. Raises ValueError for unknown words or too long a text."""
        from cotgen.tokenizer.text import encode_prompt

        g, L = self.generator, self.reflection_len
        rows = []
        for text in texts:
            ids = [] if not text.strip() or text.strip() == YES else encode_prompt(g.text_tokenizer, text)
            if len(ids) > L:
                raise ValueError(f"reflection has {len(ids)} words, at most {L} fit: {text!r}")
            rows.append([g.pad_id] * (L - len(ids)) + ids)
        return torch.tensor(rows, dtype=torch.long).reshape(len(texts), L)

    def blank_tokens(self, n: int) -> torch.Tensor:
        """``n`` blank canvases (the first round's previous image), ``(n, g*g)`` long."""
        bg = self.generator.image_tokenizer.background_tokens.reshape(1, -1).long()
        return bg.expand(n, -1).clone()

    def condition(self, reflections: Sequence[str], previous: torch.Tensor) -> torch.Tensor:
        """``[reflection block][<boi>][previous image]`` ``(P, condition_length)`` in model ids."""
        return self.condition_blocks(self.encode_reflections(reflections), previous)

    def condition_blocks(self, reflection_blocks: torch.Tensor, previous) -> torch.Tensor:
        """:meth:`condition` from encoded reflection blocks ``(P, reflection_len)`` long and
        previous images ``(P, g*g)`` codes. Raises ValueError for bad codes."""
        g = self.generator
        prev = torch.as_tensor(previous, dtype=torch.long).reshape(len(reflection_blocks), -1)
        if prev.shape[1] != g.num_image_tokens or prev.min() < 0 or prev.max() >= g.codebook_size:
            raise ValueError(f"previous images must be {g.num_image_tokens} codes in [0, {g.codebook_size})")
        boi = torch.full((len(reflection_blocks), 1), g.boi_id, dtype=torch.long)
        return torch.cat([reflection_blocks, boi, prev + g.text_vocab], 1)

    def null_condition(self, previous: torch.Tensor) -> torch.Tensor:
        """The unconditional rows' condition: empty reflection, same previous image."""
        prev = torch.as_tensor(previous, dtype=torch.long).reshape(-1, self.generator.num_image_tokens)
        return self.condition([""] * len(prev), prev)

    def first_round(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(condition, null_condition)`` of a first round: blank canvas, no reflection."""
        blank = self.blank_tokens(n)
        return self.condition([""] * n, blank), self.null_condition(blank)

    def first_round_search_kwargs(self, n: int) -> dict:
        """The extra keyword arguments of :func:`cotgen.search.search` for ``n`` prompts
        searched with this corrector from a blank first round (``corrector``,
        ``condition``, ``null_condition``): what the Table-5 rows and the service's
        ``parm_pp`` pass, so both run the same configuration."""
        cond, null = self.first_round(n)
        return {"corrector": self, "condition": cond, "null_condition": null}

    def sequences(self, prompts: Sequence[str], reflections: Sequence[str], previous, new) -> torch.Tensor:
        """Training sequences: ``[prompt][condition][<boi>][new image]``, ``(B, L)`` long."""
        return self.layout(self.generator.encode_prompts(prompts), self.encode_reflections(reflections),
                           previous, new)

    def layout(self, prompt_blocks: torch.Tensor, reflection_blocks: torch.Tensor, previous, new) -> torch.Tensor:
        """:meth:`sequences` from encoded blocks: prompt ``(B, prompt_len)`` and reflection
        ``(B, reflection_len)`` long model ids, previous and new images ``(B, g*g)`` codes."""
        g = self.generator
        head = torch.cat([prompt_blocks, self.condition_blocks(reflection_blocks, previous)], 1)
        return g.sequences(head, torch.as_tensor(new, dtype=torch.long).reshape(len(prompt_blocks), -1))

    def new_image_logits(self, seq: torch.Tensor) -> torch.Tensor:
        """Logits over the image codes at the inputs that predict the new image's codes,
        ``(B, g*g, K)``, from :meth:`layout` sequences ``(B, L)``."""
        g = self.generator
        out = g.model(**g.model_inputs(seq[:, :-1]))
        return out.logits[:, self.new_image_start - 1 :, g.text_vocab :]

    def code_logprobs(self, prompts, reflections, previous, new) -> torch.Tensor:
        """log p of each code of the new image given the prompt, reflection, previous image
        and the codes before it: ``(B, g*g)`` float32 (image codes only compete, as in
        sampling)."""
        seq = self.sequences(prompts, reflections, previous, new)
        target = seq[:, self.new_image_start :] - self.generator.text_vocab
        logits = self.new_image_logits(seq)
        return torch.log_softmax(logits.float(), -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)

    def image_logprobs(self, prompts, reflections, previous, new) -> torch.Tensor:
        """log p(new image | prompt, reflection, previous image), summed over its codes:
        ``(B,)`` float32 (:meth:`code_logprobs`)."""
        return self.code_logprobs(prompts, reflections, previous, new).sum(-1)

    def save_pretrained(self, path: str | Path) -> None:
        """The generator (:meth:`ShapesGenerator.save_pretrained`), ``corrector.json`` and,
        with the copy input, ``copy_embedding.safetensors``."""
        from safetensors.torch import save_file

        self.generator.save_pretrained(path)
        cfg = {"reflection_len": self.reflection_len, "aligned_positions": self.aligned_positions,
               "copy_input": self.copy_input}
        (Path(path) / CORRECTOR_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
        if self.copy_input:
            save_file({"weight": self.generator.copy_embedding.weight.detach().contiguous()},
                      Path(path) / COPY_FILE)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> SelfCorrector:
        """Raises FileNotFoundError naming what is missing."""
        path = Path(path)
        if not (path / CORRECTOR_FILE).is_file():
            raise FileNotFoundError(
                f"no self-correction generator at {path} ({CORRECTOR_FILE} missing); "
                "run `dvc repro reflect/dvc.yaml:corrector`"
            )
        cfg = json.loads((path / CORRECTOR_FILE).read_text())
        generator = ShapesGenerator.from_pretrained(path)
        if cfg.get("copy_input", False):
            from safetensors.torch import load_file

            if not (path / COPY_FILE).is_file():
                raise FileNotFoundError(f"{path / CORRECTOR_FILE} asks for a copy input but {COPY_FILE} is missing")
            weight = load_file(path / COPY_FILE)["weight"]
            generator.copy_embedding = torch.nn.Embedding.from_pretrained(weight, freeze=True)
        return cls(generator, cfg["reflection_len"], cfg.get("aligned_positions", False),
                   cfg.get("copy_input", False))


def corrector_from_generator(base: ShapesGenerator, reflection_len: int = REFLECTION_LEN,
                             aligned_positions: bool = False, copy_input: bool = False) -> SelfCorrector:
    """The base generator widened to the self-correction layout (see the module;
    ``aligned_positions`` and ``copy_input`` as :class:`SelfCorrector`)."""
    from transformers import LlamaForCausalLM

    text = corrector_text_tokenizer()
    T, T2, K = base.text_vocab, len(text), base.codebook_size
    old = base.model
    cfg = old.config.to_dict()
    cfg.update(vocab_size=T2 + K,
               max_position_embeddings=base.prompt_len + reflection_len + 2 + 2 * base.num_image_tokens)
    for k in ("architectures", "transformers_version", "model_type"):
        cfg.pop(k, None)
    from transformers import LlamaConfig

    model = LlamaForCausalLM(LlamaConfig(**cfg))
    state = old.state_dict()
    new_state = model.state_dict()
    for name in new_state:
        src = state[name]
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            w = torch.empty_like(new_state[name])
            w[:T] = src[:T]
            w[T:T2] = src[:T].mean(0) if name == "model.embed_tokens.weight" else 0.0
            w[T2:] = src[T:]
            new_state[name] = w
        else:
            new_state[name] = src.clone()
    model.load_state_dict(new_state)
    model.eval()
    return SelfCorrector(ShapesGenerator(model, text, base.image_tokenizer, base.prompt_len), reflection_len,
                         aligned_positions, copy_input)


def train_corrector(
    corrector: SelfCorrector,
    groups: Sequence[dict],
    out_dir: str | Path,
    lora_rank: int = 8,
    lora_alpha: int = 16,
    target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    steps: int = 300,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    warmup_steps: int = 20,
    first_round_fraction: float = 0.25,
    reflection_dropout: float = 0.1,
    cond_dropout: float = 0.1,
    seed: int = 0,
    max_seconds: float | None = None,
    progress: bool = True,
    copy_learning_rate: float | None = None,
    prompt_dropout: float = 0.0,
) -> tuple[SelfCorrector, dict]:
    """Fine-tune the corrector with LoRA on reflection groups (``prompt``,
    ``wrong_tokens``, ``reflection``, ``right_tokens``; the ``reflections`` data kind).

    Each training row draws (seeded): with ``first_round_fraction`` a first round (blank
    canvas, empty reflection -> right image); else a correction, whose reflection is
    emptied with ``reflection_dropout`` (so "regenerate without reflection" is in
    distribution, the ablation's condition), and its prompt nulled with ``prompt_dropout``
    (so the fix must be read from the reflection); then with ``cond_dropout`` the prompt and
    reflection become null (classifier-free guidance). Loss: cross-entropy of the right
    image's codes over the image codes. With the copy input, its embedding is trained fully,
    at ``copy_learning_rate`` (default: ``learning_rate``). Writes ``out_dir`` (merged weights,
    :meth:`SelfCorrector.save_pretrained`; the adapter under ``adapter/``).

    Raises:
        ValueError: no groups, or a rate outside [0, 1] (named).

    Returns:
        ``(corrector reloaded from out_dir, metrics)``: ``groups``, ``steps``,
        ``seconds``, ``first_loss`` / ``last_loss`` (means of the first / last tenth),
        ``trainable_parameters``, ``merge_max_abs_diff`` (log-prob of a few groups:
        adapted model against the saved, merged one).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import get_cosine_schedule_with_warmup

    if not groups:
        raise ValueError("no reflection groups to train the corrector on")
    rates = {"first_round_fraction": first_round_fraction, "reflection_dropout": reflection_dropout,
             "cond_dropout": cond_dropout, "prompt_dropout": prompt_dropout}
    for name, rate in rates.items():
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name} must be a probability in [0, 1], got {rate}")
    g = corrector.generator
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    prompts = g.encode_prompts([r["prompt"] for r in groups])
    refl = corrector.encode_reflections([r["reflection"] for r in groups])
    wrong = torch.tensor([r["wrong_tokens"] for r in groups], dtype=torch.long)
    right = torch.tensor([r["right_tokens"] for r in groups], dtype=torch.long)
    blank = corrector.blank_tokens(1)[0]
    lora = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=list(target_modules), lora_dropout=0.0,
                      modules_to_save=["embed_tokens", "lm_head"], task_type="CAUSAL_LM")
    import copy

    peft_model = get_peft_model(copy.deepcopy(g.model), lora)
    # the corrector being trained: the peft model, and its own copy of the copy input (trained fully)
    view = ShapesGenerator(peft_model, g.text_tokenizer, g.image_tokenizer, g.prompt_len)
    view.copy_embedding = copy.deepcopy(g.copy_embedding)
    training = SelfCorrector(view, corrector.reflection_len, corrector.aligned_positions, corrector.copy_input)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    param_groups = [{"params": list(trainable)}]
    if training.copy_input:
        copy_weight = training.generator.copy_embedding.weight.requires_grad_(True)
        trainable.append(copy_weight)
        param_groups.append({"params": [copy_weight], "lr": copy_learning_rate or learning_rate})
    opt = torch.optim.AdamW(param_groups, lr=learning_rate, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, min(warmup_steps, steps // 10), steps)
    losses, start = [], time.monotonic()
    peft_model.train()
    for _ in tqdm(range(steps), desc="corrector", disable=not progress):
        idx = torch.as_tensor(rng.integers(len(groups), size=min(batch_size, len(groups))))
        p, r, w = prompts[idx].clone(), refl[idx].clone(), wrong[idx].clone()
        u = rng.random((len(idx), 3))
        first = torch.as_tensor(u[:, 0] < first_round_fraction)
        w[first] = blank
        r[first | torch.as_tensor(u[:, 1] < reflection_dropout)] = g.pad_id
        if prompt_dropout:  # corrections that must be read from the reflection: the prompt nulled
            p[~first & torch.as_tensor(rng.random(len(idx)) < prompt_dropout)] = g.pad_id
        null = torch.as_tensor(u[:, 2] < cond_dropout)
        p[null], r[null] = g.pad_id, g.pad_id
        logits = training.new_image_logits(training.layout(p, r, w, right[idx]))
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                 right[idx].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if max_seconds is not None and time.monotonic() - start > max_seconds:
            break
    peft_model.eval()
    out_dir = Path(out_dir)
    probe = groups[: min(4, len(groups))]
    args = (
        [r["prompt"] for r in probe],
        [r["reflection"] for r in probe],
        torch.tensor([r["wrong_tokens"] for r in probe]),
        torch.tensor([r["right_tokens"] for r in probe]),
    )
    with torch.no_grad():
        adapted_lp = training.image_logprobs(*args)
    peft_model.save_pretrained(out_dir / "adapter")
    training.generator.model = peft_model.merge_and_unload().eval()
    training.save_pretrained(out_dir)
    trained = SelfCorrector.from_pretrained(out_dir)
    with torch.no_grad():
        merged_lp = trained.image_logprobs(*args)
    tenth = max(1, len(losses) // 10)
    return trained, {"groups": len(groups), "steps": len(losses), "seconds": time.monotonic() - start,
                     "first_loss": float(np.mean(losses[:tenth])), "last_loss": float(np.mean(losses[-tenth:])),
                     "trainable_parameters": int(sum(p.numel() for p in trainable)),
                     "merge_max_abs_diff": float((adapted_lp - merged_lp).abs().max())}

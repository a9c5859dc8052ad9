"""The VLM judge: any transformers image-text-to-text model prompted through its
processor's chat template with the paper's questions (DESIGN section 4).

Score = P("yes") at the first answer position, normalised over "yes" and "no" (paper
section 3; its public code scores the same way). Fine-tuning is trl's ``SFTTrainer``
on conversational prompt-completion examples (loss on the answer only) with LoRA
adapters through peft.

The same code serves a pretrained VLM (LLaVA-OneVision, Qwen2-VL: the real-model
issue) and :func:`tiny_llava_judge`, a randomly initialised ``LlavaForConditionalGeneration``
with a word-level tokenizer that the tests and the embedded world use; nothing here
special-cases the tiny one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cotgen.reward.judge import QUESTIONS, check_batch, check_question

ANSWERS = ("yes", "no")

#: A LLaVA-1.5-style template for processors that ship none (the tiny judge).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER : {% else %}ASSISTANT : {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image> {% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %} </s>{% endif %} "
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)


def question_text(question: str, prompt: str) -> str:
    """The user turn's text: the prompt and the paper's question."""
    return f'The prompt is " {prompt} " . {QUESTIONS[check_question(question)]}'


def messages(question: str, prompt: str, answer: str | None = None) -> list[dict]:
    """Chat messages (one image, the question; optionally the answer)."""
    out = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question_text(question, prompt)}]}]
    if answer is not None:
        out.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return out


class VLMJudge:
    """Judge interface over a VLM and its processor.

    Args:
        model: an image-text-to-text transformers model (e.g. ``LlavaForConditionalGeneration``).
        processor: its processor, with a chat template.
    Raises:
        ValueError: "yes" or "no" is not a single token of the processor's tokenizer.
    """

    #: Side every image it scores must have: None, any size (its processor resizes).
    required_image_size: int | None = None

    def __init__(self, model, processor) -> None:
        self.model = model.eval()
        self.processor = processor
        tok = processor.tokenizer
        self.answer_ids = []
        for word in ANSWERS:
            ids = tok.encode(word, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(f"answer {word!r} must be one token of the tokenizer, got ids {ids}")
            self.answer_ids.append(ids[0])

    def prompt_texts(self, question: str, prompts: Sequence[str]) -> list[str]:
        return [
            self.processor.apply_chat_template(messages(question, p), add_generation_prompt=True, tokenize=False)
            for p in prompts
        ]

    @torch.no_grad()
    def score(self, question, prompts, images, progress=None) -> np.ndarray:
        """P(yes) float64 ``(B,)``, normalised over yes/no at the first answer position.
        ``progress`` is not shown to the VLM (it judges the image as the paper's does).

        Raises:
            ValueError: unknown question, lengths that differ.
        """
        check_question(question)
        check_batch(prompts, images, progress)
        if not len(prompts):
            return np.zeros(0)
        texts = self.prompt_texts(question, prompts)
        rgb = [im.convert("RGB") for im in images]
        inputs = self.processor(images=rgb, text=texts, return_tensors="pt", padding=True, padding_side="left")
        logits = self.model(**inputs).logits[:, -1, self.answer_ids].float()
        return logits.softmax(-1)[:, 0].double().numpy()

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        self.model.save_pretrained(path / "model")
        self.processor.save_pretrained(path / "processor")

    @classmethod
    def from_pretrained(cls, path: str | Path, model_class=None) -> VLMJudge:
        """Load a judge saved by :meth:`save_pretrained` (or any local VLM folder with
        ``model/`` and ``processor/``). Raises FileNotFoundError naming what is missing."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        path = Path(path)
        for part in ("model", "processor"):
            if not (path / part).is_dir():
                raise FileNotFoundError(f"no VLM judge at {path}: {part}/ is missing")
        model = (model_class or AutoModelForImageTextToText).from_pretrained(path / "model")
        return cls(model, AutoProcessor.from_pretrained(path / "processor"))


def vlm_vocabulary() -> list[str]:
    """Words of the tiny judge's tokenizer: the world's vocabulary, the questions,
    the template's words and the answers."""
    import re

    from cotgen.tokenizer.text import world_words

    words = set(world_words()) | set(ANSWERS) | {"user", "assistant", ":", '"', ".", "the", "prompt", "is"}
    for q in QUESTIONS.values():
        words |= set(re.findall(r"\w+|[^\w\s]", q.lower()))
    return sorted(words)


def tiny_llava_judge(
    seed: int = 0,
    image_size: int = 64,
    patch_size: int = 16,
    hidden_size: int = 32,
    vision_layers: int = 1,
    text_layers: int = 2,
    num_heads: int = 2,
) -> VLMJudge:
    """A randomly initialised ``LlavaForConditionalGeneration`` (CLIP vision tower +
    Llama) with a ``LlavaProcessor`` over a word-level tokenizer: the same classes a
    pretrained LLaVA uses, small enough for tests (defaults) or for training from
    scratch in the embedded world (``image_size / patch_size`` squared image tokens,
    ``hidden_size`` and layer counts of both towers)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
    vocab = {w: i for i, w in enumerate(specials + vlm_vocabulary())}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left",
    )
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                                       num_hidden_layers=vision_layers, num_attention_heads=num_heads,
                                       image_size=image_size, patch_size=patch_size, projection_dim=hidden_size),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                                num_hidden_layers=text_layers, num_attention_heads=num_heads,
                                num_key_value_heads=num_heads,
                                max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    model = LlavaForConditionalGeneration(config)
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch_size,
                               vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                               num_additional_image_tokens=1)
    return VLMJudge(model, processor)


def finetune_vlm_judge(
    judge: VLMJudge,
    examples: Sequence[tuple[str, str, Image.Image, bool]],
    out_dir: str | Path,
    lora_rank: int = 8,
    lora_alpha: int = 16,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    steps: int = 100,
    batch_size: int = 8,
    learning_rate: float = 2e-4,
    warmup_steps: int = 0,
    seed: int = 0,
    max_seconds: float | None = None,
) -> tuple[VLMJudge, dict]:
    """Fine-tuning with trl's ``SFTTrainer`` on (question, prompt, image, label)
    examples as conversational prompt-completion data (loss on the "yes"/"no" answer).

    ``lora_rank > 0``: LoRA adapters through peft (a pretrained VLM); returns the judge
    with merged adapters (same outputs as the adapted model), the adapter alone saved
    under ``out_dir/adapter``. ``lora_rank == 0``: every weight is trained (a judge
    trained from scratch). ``max_seconds`` stops training early (wall clock).

    Returns:
        ``(judge, metrics)``: metrics ``train_loss``, ``steps`` (done), ``seconds``.
    """
    import time

    from cotgen.training import Deadline

    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    rows = [
        {"images": [image.convert("RGB")], "prompt": messages(q, p),
         "completion": [{"role": "assistant", "content": [{"type": "text", "text": "yes" if label else "no"}]}]}
        for q, p, image, label in examples
    ]
    args = SFTConfig(
        output_dir=str(Path(out_dir) / "trainer"), max_steps=steps, per_device_train_batch_size=batch_size,
        learning_rate=learning_rate, warmup_steps=warmup_steps, logging_steps=max(1, steps // 10), save_strategy="no",
        report_to=[], seed=seed,
        use_cpu=not torch.cuda.is_available(), max_length=None, completion_only_loss=True,
        dataloader_num_workers=0, remove_unused_columns=False,
    )
    lora = (LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=list(target_modules), lora_dropout=0.0)
            if lora_rank > 0 else None)
    judge.model.train()
    deadline = Deadline(max_seconds)
    trainer = SFTTrainer(model=judge.model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=judge.processor, peft_config=lora, callbacks=[deadline])
    result = trainer.train()
    metrics = {"train_loss": float(result.training_loss), "steps": int(trainer.state.global_step),
               "seconds": time.monotonic() - deadline.start}
    if lora is None:
        judge.model.eval()
        return judge, metrics
    trainer.model.save_pretrained(Path(out_dir) / "adapter")
    merged = trainer.model.merge_and_unload()
    return VLMJudge(merged, judge.processor), metrics


def outcome_examples(traj, image_tokenizer, split: str, question: str = "outcome"):
    """(question, prompt, final image, label) of the trajectories' paths in ``split``
    ("train" | "heldout"), final images decoded by the image tokenizer: the VLM judge's
    data (the object judge's outcome examples, as images)."""
    from cotgen.reward.train import decode_steps

    rows = [i for i, p in enumerate(traj.paths) if p["split"] == split]
    images = decode_steps(traj, image_tokenizer, [(i, traj.num_steps) for i in rows])
    return [(question, traj.paths[i]["prompt"], im, bool(traj.paths[i]["correct"])) for i, im in zip(rows, images)]


def train_vlm_judge(
    traj,
    image_tokenizer,
    out_dir: str | Path,
    hidden_size: int = 96,
    patch_size: int = 8,
    vision_layers: int = 2,
    text_layers: int = 2,
    num_heads: int = 4,
    steps: int = 5000,
    batch_size: int = 32,
    learning_rate: float = 3e-4,
    warmup_steps: int = 200,
    max_seconds: float | None = None,
    seed: int = 0,
) -> tuple[VLMJudge, dict]:
    """Train a :func:`tiny_llava_judge` from scratch (every weight) on the outcome
    question of the trajectories' train paths and measure it on the held-out paths:
    the VLM route of the embedded world's judge (DESIGN section 4), through the same
    chat template, yes/no scoring and trl trainer a pretrained VLM uses.

    Returns:
        ``(judge, metrics)``: metrics ``train_loss``, ``steps``, ``seconds``,
        ``parameters``, ``train_examples`` and ``outcome`` (held-out ``n``, ``yes_rate``,
        ``auroc``, ``accuracy`` at 0.5). The judge is saved under ``out_dir/judge``.
    """
    from cotgen.reward.train import binary_metrics

    judge = tiny_llava_judge(seed=seed, patch_size=patch_size, hidden_size=hidden_size, vision_layers=vision_layers,
                             text_layers=text_layers, num_heads=num_heads)
    train = outcome_examples(traj, image_tokenizer, "train")
    held = outcome_examples(traj, image_tokenizer, "heldout")
    judge, metrics = finetune_vlm_judge(judge, train, out_dir, lora_rank=0, steps=steps, batch_size=batch_size,
                                        learning_rate=learning_rate, warmup_steps=warmup_steps, seed=seed,
                                        max_seconds=max_seconds)
    scores = np.concatenate([judge.score("outcome", [p for _, p, _, _ in held[i : i + 64]],
                                         [im for _, _, im, _ in held[i : i + 64]]) for i in range(0, len(held), 64)])
    labels = np.array([lab for *_, lab in held], dtype=int)
    metrics.update(parameters=sum(p.numel() for p in judge.model.parameters()), train_examples=len(train),
                   outcome=binary_metrics(labels, scores))
    judge.save_pretrained(Path(out_dir) / "judge")
    return judge, metrics

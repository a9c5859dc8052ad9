"""Training the embedded generator on rendered scenes of the *training* prompt set
(never the evaluation set), with condition dropout for classifier-free guidance.

The optimisation loop is transformers' ``Trainer``; this module only builds the data
(scenes rendered, then VQ-encoded once) and the collator that applies condition dropout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm
from transformers import LlamaForCausalLM, Trainer

from cotgen.generator.model import ShapesGenerator
from cotgen.training import training_arguments

IGNORE_INDEX = -100


def pick_scenes(
    prompts: Sequence[dict], num_images: int, tag_weights: Mapping[str, float] | None, seed: int
) -> list[dict]:
    """Draw ``num_images`` metadata lines: a tag by ``tag_weights`` (renormalised over
    the tags present; uniform over lines when ``None``), then a line of that tag."""
    rng = np.random.default_rng(seed)
    if not tag_weights:
        return [prompts[i] for i in rng.integers(0, len(prompts), num_images)]
    by_tag: dict[str, list[dict]] = {}
    for line in prompts:
        by_tag.setdefault(line["tag"], []).append(line)
    tags = [t for t in by_tag if tag_weights.get(t, 0) > 0]
    if not tags:
        raise ValueError(f"tag_weights {dict(tag_weights)} give no weight to any tag present: {sorted(by_tag)}")
    w = np.array([tag_weights[t] for t in tags], dtype=np.float64)
    chosen = rng.choice(len(tags), size=num_images, p=w / w.sum())
    return [by_tag[tags[t]][rng.integers(len(by_tag[tags[t]]))] for t in chosen]


def encode_scenes(
    lines: Sequence[dict],
    image_tokenizer,
    seed: int,
    batch_size: int = 256,
    progress: bool = True,
    style: str = "varied",
) -> torch.Tensor:
    """Render one scene per line (seeded per index) in ``style`` (a key of
    :data:`cotgen.world.render.STYLES`) and VQ-encode it: ``(M, g, g)`` long.

    Raises:
        ValueError: an unknown style.
    """
    from cotgen.world.render import STYLES, render_scene

    if style not in STYLES:
        raise ValueError(f"unknown scene style {style!r}; known: {', '.join(STYLES)}")

    out = []
    for start in tqdm(range(0, len(lines), batch_size), desc="encode scenes", disable=not progress):
        chunk = lines[start : start + batch_size]
        arr = np.stack(
            [np.asarray(render_scene(m, np.random.default_rng([seed, start + i]), style=STYLES[style])[0])
             for i, m in enumerate(chunk)]
        )
        with torch.no_grad():
            out.append(image_tokenizer.encode(torch.from_numpy(arr)))
    return torch.cat(out)


class SceneDataset(Dataset):
    """(prompt block, image codes) pairs as full sequences with labels on image tokens only."""

    def __init__(self, generator: ShapesGenerator, prompts: Sequence[str], codes: torch.Tensor) -> None:
        if len(prompts) != len(codes):
            raise ValueError(f"{len(prompts)} prompts but {len(codes)} token grids")
        self.sequences = generator.sequences(generator.encode_prompts(prompts), codes)
        self.prefix_len = generator.prompt_len + 1

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.sequences[i]}


class ConditionDropoutCollator:
    """Stacks sequences, replaces the prompt block by the null prompt with probability
    ``p`` (classifier-free guidance training), and masks labels outside image tokens."""

    def __init__(self, generator: ShapesGenerator, p: float, seed: int = 0) -> None:
        if not 0 <= p < 1:
            raise ValueError(f"condition dropout must be in [0, 1), got {p}")
        self.p, self.prompt_len, self.pad_id = p, generator.prompt_len, generator.pad_id
        self.rng = torch.Generator().manual_seed(seed)

    def __call__(self, items: list[dict]) -> dict:
        ids = torch.stack([it["input_ids"] for it in items]).clone()
        drop = torch.rand(len(ids), generator=self.rng) < self.p
        ids[drop, : self.prompt_len] = self.pad_id
        labels = ids.clone()
        labels[:, : self.prompt_len + 1] = IGNORE_INDEX
        return {"input_ids": ids, "labels": labels}


def train_generator(
    out_dir: str | Path,
    train_prompts: Sequence[dict],
    text_tokenizer,
    image_tokenizer,
    *,
    num_images: int,
    steps: int,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    cond_dropout: float = 0.1,
    tag_weights: Mapping[str, float] | None = None,
    model_size: Mapping[str, int] | None = None,
    prompt_len: int = 12,
    seed: int = 0,
    progress: bool = True,
    scene_style: str = "varied",
) -> tuple[ShapesGenerator, dict]:
    """Train a generator from scratch and save it to ``out_dir``; returns it and a small
    metrics dict (``train_loss``, ``params``, ``images``). Training scenes are rendered
    in ``scene_style`` ("varied": the world's scenes; "canonical": sprites on the token
    grid, see :data:`cotgen.world.render.CANONICAL`).

    Raises:
        ValueError: an empty prompt set or bad knob (named).
    """
    if not train_prompts:
        raise ValueError("no training prompts")
    torch.manual_seed(seed)
    config = ShapesGenerator.llama_config(
        len(text_tokenizer), image_tokenizer.codebook_size, prompt_len, image_tokenizer.grid_size, **(model_size or {})
    )
    generator = ShapesGenerator(LlamaForCausalLM(config), text_tokenizer, image_tokenizer, prompt_len)
    lines = pick_scenes(train_prompts, num_images, tag_weights, seed)
    codes = encode_scenes(lines, image_tokenizer, seed, progress=progress, style=scene_style)
    dataset = SceneDataset(generator, [m["prompt"] for m in lines], codes)
    out_dir = Path(out_dir)
    args = training_arguments(out_dir, steps, batch_size, learning_rate, 100, 0.05, seed, progress)
    trainer = Trainer(
        model=generator.model,
        args=args,
        train_dataset=dataset,
        data_collator=ConditionDropoutCollator(generator, cond_dropout, seed),
    )
    result = trainer.train()
    generator.model.eval()
    generator.save_pretrained(out_dir)
    metrics = {
        "train_loss": float(result.training_loss),
        "params": sum(p.numel() for p in generator.model.parameters()),
        "images": len(dataset),
        "steps": steps,
    }
    return generator, metrics

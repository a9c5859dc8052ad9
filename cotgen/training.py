"""Shared settings of cotgen's transformers ``Trainer`` runs."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import TrainingArguments


def training_arguments(
    out_dir: str | Path,
    steps: int,
    batch_size: int,
    learning_rate: float,
    warmup_steps: int,
    weight_decay: float,
    seed: int,
    progress: bool = True,
) -> TrainingArguments:
    """``TrainingArguments`` for a run of ``steps`` optimiser steps: AdamW, linear
    warm-up (at most a tenth of the run) then cosine decay, 20 log lines, no
    checkpoints (the caller saves the model), no reporting; CPU unless CUDA is there
    (accelerate picks the device)."""
    return TrainingArguments(
        output_dir=str(Path(out_dir) / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=min(warmup_steps, steps // 10),
        weight_decay=weight_decay,
        logging_steps=max(1, steps // 20),
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=not progress,
    )

"""Shared settings of cotgen's transformers ``Trainer`` runs."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainingArguments


class Deadline(TrainerCallback):
    """Stops a ``Trainer`` run after ``max_seconds`` of wall clock (None = never);
    ``start`` is the ``time.monotonic()`` at construction."""

    def __init__(self, max_seconds: float | None) -> None:
        self.max_seconds = max_seconds
        self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if self.max_seconds is not None and time.monotonic() - self.start > self.max_seconds:
            control.should_training_stop = True


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

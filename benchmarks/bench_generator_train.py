"""Seconds per optimiser step of the generator's training: transformers' ``Trainer`` with
cotgen's ``training_arguments`` (what the `generator` stage runs) against a bare PyTorch
loop doing the same work (AdamW, cosine schedule, gradient clipping at 1.0), on a
randomly initialised generator of params.yaml's size and random token sequences of the
real layout ([12 prompt words][<boi>][256 image codes]).

Usage: python benchmarks/bench_generator_train.py [--steps 30] [--batch-size 32] [--threads 2]
       [--json benchmarks/results/generator_train_cpu.json]

The first 5 steps of each arm are warm-up and not timed.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import LlamaForCausalLM, Trainer, TrainerCallback, get_cosine_schedule_with_warmup

from cotgen.generator.model import ShapesGenerator
from cotgen.pipeline.params import load_params
from cotgen.training import training_arguments

TEXT_VOCAB, PROMPT_LEN, GRID = 64, 12, 16
WARMUP = 5


class RandomSequences(Dataset):
    def __init__(self, n: int, vocab: int, length: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


class StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())


def model(size: dict) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(ShapesGenerator.llama_config(TEXT_VOCAB, 512, PROMPT_LEN, GRID, **size))


def per_step(times: list[float]) -> float:
    t = times[WARMUP:]
    return (t[-1] - t[0]) / (len(t) - 1)


def bench_trainer(size: dict, data: Dataset, steps: int, batch_size: int) -> float:
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        args = training_arguments(tmp, steps, batch_size, 1.5e-3, 100, 0.05, 0, progress=False)
        Trainer(model=model(size), args=args, train_dataset=data, callbacks=[timer]).train()
    return per_step(timer.times)


def bench_loop(size: dict, data: Dataset, steps: int, batch_size: int) -> float:
    m = model(size)
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=1.5e-3, weight_decay=0.05)
    sched = get_cosine_schedule_with_warmup(opt, min(100, steps // 10), steps)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True)
    times, it = [], iter(loader)
    for _ in range(steps):
        batch = next(it)
        loss = m(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        times.append(time.perf_counter())
    return per_step(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    size = dict(load_params()["generator"]["model"])
    data = RandomSequences(a.steps * a.batch_size, TEXT_VOCAB + 512, PROMPT_LEN + 1 + GRID * GRID)
    result = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "batch_size": a.batch_size, "timed_steps": a.steps - WARMUP, "model": size}
    # alternate the arms so that a busy machine slows both alike
    result["bare_loop_s_per_step"] = bench_loop(size, data, a.steps, a.batch_size)
    result["trainer_s_per_step"] = bench_trainer(size, data, a.steps, a.batch_size)
    result["threads_after_trainer"] = torch.get_num_threads()
    result["bare_loop_again_s_per_step"] = bench_loop(size, data, a.steps, a.batch_size)
    print(json.dumps(result, indent=2))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

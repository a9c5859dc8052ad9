"""Janus-Pro sampling throughput with and without path cutting (issue 9's GPU check).

The model is ``JanusForConditionalGeneration`` with Janus-Pro-1B's (or 7B's)
architecture and *random* weights (:func:`cotgen.real.tiny.random_janus_pro`): the same
shapes, so the same speed and memory as the real checkpoint; the images are noise. The
sampler is cotgen's :class:`cotgen.real.janus.JanusSampler` (CFG rows, KV cache, path
dropping), the search is :func:`cotgen.search.search`.

For each (prompts P, paths N) it times, after a warm-up:

- ``full``: all P*N paths to the end (what best-of-N pays);
- ``cut@S keep K``: every path to step S (of 8), then all but K paths per prompt dropped
  from the batch and the KV cache (what PARM's potential cut does), the rest to the end;
- ``parm``: :func:`cotgen.search.search` with strategy ``parm`` and a scripted judge
  (clear from step 3 on, potential and outcome seeded random, so about half the paths are
  cut), VQ-decoding the intermediate images it asks about.

Reported per run: wall seconds (CUDA synchronised), image tokens generated, image tokens
per second, forward passes (CFG rows counted), seconds per prompt, peak GPU memory (GiB).

Usage:
    python benchmarks/bench_janus_gpu.py --arch janus-pro-1b --device cuda --out janus_gpu.json
    python benchmarks/bench_janus_gpu.py --arch tiny --device cpu           # smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

PROMPTS = [
    "a photo of a red bench and a blue cat",
    "a photo of three apples",
    "a photo of a dog right of a teddy bear",
    "a photo of a purple toothbrush",
    "a photo of a green clock and a yellow bicycle",
    "a photo of four giraffes",
    "a photo of a cake below a baseball bat",
    "a photo of an orange car",
]


class ScriptedJudge:
    """Clarity yes from ``clear_from`` (fraction of tokens) on; potential and outcome
    uniform random from a seeded generator (the cut depends on nothing the model does)."""

    def __init__(self, clear_from: float = 0.375, seed: int = 0) -> None:
        self.clear_from = clear_from
        self.rng = np.random.default_rng(seed)
        self.calls = 0

    def score(self, question, prompts, images, progress=None):
        self.calls += len(prompts)
        if question == "clarity":
            return (np.asarray(progress, dtype=np.float64) >= self.clear_from - 1e-9).astype(np.float64)
        return self.rng.uniform(size=len(prompts))


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def build(arch: str, device: str, dtype: torch.dtype):
    if arch == "tiny":
        from cotgen.real.tiny import tiny_janus

        generator = tiny_janus()
        generator.model.to(device)
        return generator
    from cotgen.real.tiny import random_janus_pro

    return random_janus_pro(arch, device=device, dtype=dtype)


def run_sampler(generator, prompts, cfg, cut_step: int | None, keep: int, device) -> dict:
    sync(device)
    t0 = time.perf_counter()
    sampler = generator.stepwise_sampler(prompts, cfg)
    while not sampler.done:
        if cut_step is not None and sampler.step_index == cut_step:
            drop = [p.id for p in sampler.alive() if p.candidate >= keep]
            sampler.drop(drop)
        sampler.step()
    sync(device)
    seconds = time.perf_counter() - t0
    tokens = sum(p.image_tokens for p in sampler.paths)
    passes = sum(p.forward_passes for p in sampler.paths)
    finals = sum(len(p.tokens) == generator.num_image_tokens for p in sampler.paths)
    return {"seconds": seconds, "image_tokens": tokens, "forward_passes": passes, "final_images": finals,
            "tokens_per_second": tokens / seconds, "seconds_per_prompt": seconds / len(prompts)}


def run_parm(generator, prompts, cfg, device) -> dict:
    from cotgen.search import SearchConfig, search

    judge = ScriptedJudge()
    sync(device)
    t0 = time.perf_counter()
    results = search(generator, judge, prompts, cfg, SearchConfig(strategy="parm", potential_threshold=0.5))
    sync(device)
    seconds = time.perf_counter() - t0
    tokens = sum(r.compute["image_tokens"] for r in results)
    cut = sum(p.cut_at_step is not None for r in results for p in r.paths)
    return {"seconds": seconds, "image_tokens": tokens, "forward_passes": sum(r.compute["forward_passes"] for r in results),
            "judge_calls": judge.calls, "paths_cut": cut, "paths": sum(len(r.paths) for r in results),
            "tokens_per_second": tokens / seconds, "seconds_per_prompt": seconds / len(prompts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="janus-pro-1b", help="janus-pro-1b | janus-pro-7b | tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--n", type=int, default=20, help="paths per prompt (N)")
    ap.add_argument("--prompts", type=int, nargs="+", default=[1, 4], help="prompts per batch (P), one setting each")
    ap.add_argument("--cfg-scale", type=float, default=4.0, help="Janus-Pro's cfg_weight 5 = cfg_scale 4")
    ap.add_argument("--cut-step", type=int, default=2, help="step (of 8) at which the cut happens")
    ap.add_argument("--keep", type=int, nargs="+", default=[10, 5], help="paths kept per prompt after the cut")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()

    from cotgen.generator.sampling import SamplingConfig

    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    generator = build(args.arch, args.device, dtype)
    build_seconds = time.perf_counter() - t0
    tps = generator.num_image_tokens // 8
    params = sum(p.numel() for p in generator.model.parameters())
    info = {"arch": args.arch, "parameters": params, "device": args.device, "dtype": args.dtype,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() and args.device == "cuda" else platform.processor(),
            "torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "image_tokens": generator.num_image_tokens, "tokens_per_step": tps, "cfg_scale": args.cfg_scale,
            "n": args.n, "build_seconds": round(build_seconds, 1)}
    print(json.dumps(info), flush=True)

    def cfg(n):
        return SamplingConfig(n=n, cfg_scale=args.cfg_scale, temperature=1.0, top_k=0, seed=0, tokens_per_step=tps)

    run_sampler(generator, PROMPTS[:1], cfg(2), None, 0, args.device)  # warm-up
    rows = []
    for P in args.prompts:
        prompts = PROMPTS[:P]
        runs = [("full", None, args.n)] + [(f"cut@{args.cut_step} keep {k}", args.cut_step, k) for k in args.keep]
        for name, cut, keep in runs:
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            r = run_sampler(generator, prompts, cfg(args.n), cut, keep, args.device)
            r.update(run=name, prompts=P)
            if args.device == "cuda":
                r["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            rows.append(r)
            print(json.dumps(r), flush=True)
        r = run_parm(generator, prompts, cfg(args.n), args.device)
        r.update(run="parm (scripted judge)", prompts=P)
        rows.append(r)
        print(json.dumps(r), flush=True)

    print(f"\n{args.arch} ({params / 1e9:.2f} B params, {info['gpu']}), N = {args.n}, CFG rows doubled")
    print(f"{'P':>2} {'run':<24} {'seconds':>8} {'tokens':>8} {'tok/s':>9} {'s/prompt':>9} {'vs full':>8}")
    for P in args.prompts:
        full = next(r for r in rows if r["prompts"] == P and r["run"] == "full")
        for r in (r for r in rows if r["prompts"] == P):
            print(f"{P:>2} {r['run']:<24} {r['seconds']:8.2f} {r['image_tokens']:8d} {r['tokens_per_second']:9.0f} "
                  f"{r['seconds_per_prompt']:9.2f} {r['seconds'] / full['seconds']:8.2f}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"info": info, "runs": rows}, fh, indent=1)


if __name__ == "__main__":
    main()

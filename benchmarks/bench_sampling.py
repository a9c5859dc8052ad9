"""Image tokens per second of step-wise sampling: batched KV-cached sampling of N paths
against a loop that recomputes the whole sequence for every token, and the fraction of
this machine's measured matmul rate that the model reaches.

Usage: python benchmarks/bench_sampling.py [--generator data/generator] [--tokens 64]

Without a trained generator it uses a randomly initialised one of the same size
(params.yaml's generator.model), which has the same speed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def matmul_gflops(n: int = 1024, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e9


def flops_per_token(model, context: int) -> float:
    """~2 x non-embedding params + attention (2 x layers x context x hidden x 2)."""
    cfg = model.config
    params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    return 2 * params + 4 * cfg.num_hidden_layers * context * cfg.hidden_size


def load(path: Path):
    from cotgen.generator.model import ShapesGenerator

    if (path / "generator.json").is_file():
        return ShapesGenerator.from_pretrained(path)
    from transformers import LlamaForCausalLM

    from cotgen.pipeline.params import load_params
    from cotgen.tokenizer.text import build_text_tokenizer
    from cotgen.tokenizer.vq import VQConfig, VQTokenizer

    p = load_params("params.yaml")
    text = build_text_tokenizer()
    vq = VQTokenizer(VQConfig(**p["tokenizer"]["model"]))
    cfg = ShapesGenerator.llama_config(len(text), vq.codebook_size, p["generator"]["prompt_len"], vq.grid_size,
                                       **p["generator"]["model"])
    return ShapesGenerator(LlamaForCausalLM(cfg).eval(), text, vq, p["generator"]["prompt_len"])


@torch.no_grad()
def recompute_rate(gen, n: int, tokens: int) -> float:
    """Tokens/s of a loop that feeds the whole sequence every token (no KV cache, no CFG)."""
    seq = gen.prefix(gen.encode_prompts(["a photo of two circles"] * n))
    t = time.perf_counter()
    for _ in range(tokens):
        logits = gen.model(input_ids=seq, use_cache=False).logits[:, -1, gen.text_vocab :]
        nxt = torch.multinomial(torch.softmax(logits, -1), 1) + gen.text_vocab
        seq = torch.cat([seq, nxt], 1)
    return n * tokens / (time.perf_counter() - t)


@torch.no_grad()
def cached_rate(gen, n: int, tokens: int, prompts: int = 1, cfg_scale: float = 0.0) -> float:
    """Tokens/s of step-wise KV-cached sampling of ``n`` paths for each of ``prompts``
    prompts sampled together (rows = prompts x n, twice that with CFG)."""
    from cotgen.generator.sampling import SamplingConfig, StepwiseSampler

    steps = max(1, tokens // gen.grid_size)
    t = time.perf_counter()
    sampler = StepwiseSampler(gen, ["a photo of two circles"] * prompts, SamplingConfig(n=n, cfg_scale=cfg_scale))
    for _ in range(steps):
        sampler.step()
    return prompts * n * steps * gen.grid_size / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--generator", type=Path, default=Path("data/generator"))
    ap.add_argument("--tokens", type=int, default=64, help="image tokens per path to time")
    args = ap.parse_args()
    torch.set_num_threads(2)
    gen = load(args.generator)
    peak = matmul_gflops()
    fpt = flops_per_token(gen.model, gen.prompt_len + 1 + gen.num_image_tokens // 2)
    print(f"model: {sum(p.numel() for p in gen.model.parameters()) / 1e6:.2f} M params, "
          f"~{fpt / 1e6:.1f} MFLOP per token; measured matmul rate {peak:.1f} GFLOP/s")
    print(f"{'N':>3} | {'recompute tok/s':>15} | {'KV-cached tok/s':>15} | {'speed-up':>8} | {'roofline':>8}")
    for n in (1, 8, 20):
        slow = recompute_rate(gen, n, args.tokens)
        fast = cached_rate(gen, n, args.tokens)
        print(f"{n:>3} | {slow:>15.1f} | {fast:>15.1f} | {fast / slow:>7.1f}x | {fast * fpt / 1e9 / peak:>7.1%}")
    # the search's batching (search.batch_prompts): N = 20 paths for each of P prompts, with CFG
    from cotgen.pipeline.params import load_params

    cfg = float(load_params("params.yaml")["sampling"]["cfg_scale"])
    print(f"\nN = 20 paths per prompt, CFG scale {cfg}: prompts sampled together against tokens/s")
    for prompts in (1, 8, 16, 32):
        print(f"{prompts:>3} prompts ({prompts * 20:>4} paths) | {cached_rate(gen, 20, args.tokens, prompts, cfg):>8.1f} tok/s")


if __name__ == "__main__":
    main()

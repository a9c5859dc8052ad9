"""How well can *any* potential rank one prompt's paths at a step? (issue 4's bar 2; README,
verification section.)

For recorded evaluation paths (``data/replay/paths.jsonl``, from ``cotgen stage
record_paths``), each path's prefix up to ``--step`` is rebuilt exactly (per-path seeds, as
the recording made it) and ``--rollouts`` completions are sampled from it; the fraction the
GenEval-Shapes evaluator finds correct is a Monte-Carlo estimate of P(correct | prefix),
the best potential a judge could learn, measured independently of how the path itself ended.
Printed, on the same records:

- the within-record AUROC (pairs of one record's paths, one ending correct and one wrong)
  of the judge's recorded potential at the step and of the roll-out value;
- PARM-like cuts at the step: keep the top ``k`` paths by either score (ties by the judge's
  potential), finish them, pick the highest recorded outcome P(yes); against best-of-N and
  the oracle (GenEval's overall, the mean over tags), with the image tokens each spends; in
  brackets the oracle among the kept paths.

The roll-outs cost far more than a search would (``rollouts`` x the rest of the image per
path): this is a bound on what a step-``s`` cut can keep, not a strategy.

    python scripts/potential_bound.py [--root .] [--stride 8] [--offset 0] [--rollouts 8] [--step 4]
        [--out FILE.jsonl] [--analyse FILE.jsonl ...]

About 11 s per record on one thread (20 paths, 8 roll-outs of half an image each).
Raises FileNotFoundError if the recording or the models are missing.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


def rollout_records(root: Path, stride: int, offset: int, rollouts: int, step: int, out: Path) -> None:
    """Append one JSON line per recorded (prompt, image) of ``records[offset::stride]`` to ``out``."""
    import torch

    from cotgen.generator.model import ShapesGenerator
    from cotgen.generator.sampling import StepwiseSampler
    from cotgen.geneval.scoring import judge_image
    from cotgen.pipeline.params import load_params
    from cotgen.pipeline.stages import PATHS as MAIN
    from cotgen.pipeline.stages import sampling_config
    from cotgen.search import stepwise_sampler
    from cotgen.search.replay import read_records
    from cotgen.world.detector import ShapesDetector

    params = load_params(root / "params.yaml")
    generator = ShapesGenerator.from_pretrained(root / MAIN["generator"])
    detector = ShapesDetector.from_pretrained(root / MAIN["detector"])
    records = read_records(root / "data/replay/paths.jsonl")
    sampling = sampling_config(params, len(records[0]["paths"]))
    with out.open("a") as f:
        for record in records[offset::stride]:
            start = time.monotonic()
            meta = json.loads(record["metadata"])
            config = replace(sampling, seed=sampling.seed + 1000 * record["image"])  # as record_paths
            sampler = stepwise_sampler(generator, [record["prompt"]], config)
            for _ in range(step):
                sampler.step()
            prefixes = torch.tensor([p.tokens for p in sampler.paths])
            completions = StepwiseSampler(generator, [record["prompt"]] * len(prefixes),
                                          replace(config, n=rollouts, seed=4242), prefix_tokens=prefixes)
            completions.run()
            images = generator.decode(torch.tensor([p.tokens for p in completions.paths]))
            correct = np.array([judge_image(detector, im, meta)[0] for im in images]).reshape(len(prefixes), rollouts)
            f.write(json.dumps({
                "index": record["index"], "image": record["image"], "tag": record["tag"], "step": step,
                "tokens_per_step": record["tokens_per_step"], "num_steps": record["num_steps"],
                "correct": [p["correct"] for p in record["paths"]], "outcome": [p["outcome"] for p in record["paths"]],
                "potential": [p["potential"][step - 1] for p in record["paths"]],
                "rollout": correct.mean(1).tolist()}) + "\n")
            f.flush()
            print(f"record {record['index']}/{record['image']} ({record['tag']}): roll-outs correct "
                  f"{correct.mean():.3f}, {time.monotonic() - start:.1f} s", flush=True)


def overall(rows: list[dict], right: list[bool]) -> float:
    """GenEval's overall score (:func:`cotgen.geneval.scoring.summarize`: the mean over tags)
    of one verdict per record."""
    from cotgen.geneval.scoring import summarize

    return summarize([{"tag": r["tag"], "metadata": str(r["index"]), "correct": ok} for r, ok in zip(rows, right)])[
        "overall"]


def keep_top(rows: list[dict], key: str, k: int) -> tuple[float, float]:
    """Keep the top ``k`` paths by ``key`` (ties: judge potential), pick the highest outcome:
    ``(GenEval-Shapes overall of the picks, the same with a correct path kept counting as right)``."""
    right, kept = [], []
    for r in rows:
        order = np.lexsort((-np.array(r["potential"]), -np.array(r[key])))[:k]
        right.append(r["correct"][order[np.argmax(np.array(r["outcome"])[order])]])
        kept.append(any(r["correct"][i] for i in order))
    return overall(rows, right), overall(rows, kept)


def analyse(rows: list[dict]) -> None:
    n, step, tps, steps = len(rows[0]["correct"]), rows[0]["step"], rows[0]["tokens_per_step"], rows[0]["num_steps"]
    full = n * steps * tps
    best = overall(rows, [r["correct"][int(np.argmax(r["outcome"]))] for r in rows])
    oracle = overall(rows, [any(r["correct"]) for r in rows])
    print(f"{len(rows)} records, N = {n} (GenEval-Shapes overall: the mean over tags): best-of-{n} {best:.3f} "
          f"({full:,} tokens per image), oracle {oracle:.3f}")
    from cotgen.search.replay import within_group_auroc

    judge, rollout = (within_group_auroc((r["correct"], r[key]) for r in rows) for key in ("potential", "rollout"))
    print(f"within-record AUROC at step {step}: judge potential {judge:.3f}, roll-out value {rollout:.3f}")
    for k in (1, 2, 4, 6, 8):
        tokens = n * step * tps + k * (steps - step) * tps
        (judge, judge_kept), (rollout, rollout_kept) = keep_top(rows, "potential", k), keep_top(rows, "rollout", k)
        print(f"keep top-{k} at step {step} ({tokens:,} tokens, {tokens / full:.0%} of best-of-{n}): by judge potential "
              f"{judge:.3f} (a correct path kept {judge_kept:.3f}), by roll-out value {rollout:.3f} ({rollout_kept:.3f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("."))
    ap.add_argument("--stride", type=int, default=8, help="every stride-th record")
    ap.add_argument("--offset", type=int, default=0, help="starting at this record")
    ap.add_argument("--rollouts", type=int, default=8)
    ap.add_argument("--step", type=int, default=4, help="the step of the cut (1 .. num_steps - 1)")
    ap.add_argument("--out", type=Path, default=Path("potential_bound.jsonl"), help="roll-out rows (appended)")
    ap.add_argument("--analyse", type=Path, nargs="*", help="only analyse these roll-out files")
    a = ap.parse_args()
    if a.stride < 1 or a.offset < 0 or a.rollouts < 1 or a.step < 1:
        ap.error("--stride, --rollouts and --step must be at least 1, --offset at least 0")
    if not a.analyse:
        rollout_records(a.root, a.stride, a.offset, a.rollouts, a.step, a.out)
    files = a.analyse or [a.out]
    analyse([json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()])


if __name__ == "__main__":
    main()

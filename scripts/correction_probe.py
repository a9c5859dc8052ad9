"""How often one sampled correction fixes a wrong image (issue 8's probe; README, PARM++ section).

Held-out wrong images (edit groups of the held-out prompts' trajectories, made as the
training groups are) are corrected once each: the self-correction generator samples one
image (plain sampling, n = 1) from the prompt, the wrong image and a reflection, and the
GenEval-Shapes evaluator judges the result. Printed per condition: the fraction fixed
(by failure kind), the fraction of codes kept from the wrong image.

Conditions: ``oracle`` (the evaluator's own reflection), ``empty`` (no reflection, as
``parm_pp_noreflect``), ``judge`` (the reflective judge's, with ``--judge``). Modes:

- ``plain``: as ``parm_pp`` samples a round (CFG rows: null prompt and reflection,
  previous image kept);
- ``region``: every code outside the group's edit (the box of the codes the repaired image
  changed, one cell of margin) is forced to the wrong image's; only the edit's region is
  sampled (an upper bound on knowing *where* to edit). ``--base`` also runs the main
  job's generator (prompt only) in the same regions;
- ``guidance``: reflection guidance: the CFG rows keep the prompt and the previous image and
  take an empty reflection, so CFG contrasts the reflection alone.

    python scripts/correction_probe.py [--root .] [--images 96] [--temperature 0.8] [--cfg-scale 0.5]
        [--mode plain|region|guidance] [--judge] [--base] [--corrector DIR] [--seed 2]

A measurement of the trained models of a finished ``dvc repro reflect/dvc.yaml``; about a
minute per condition for 96 images on one thread.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch


def edit_region(wrong: list[int], right: list[int], grid: int, margin: int = 1) -> np.ndarray:
    """``(grid*grid,)`` bool: the box of the cells where ``right`` differs from ``wrong``,
    ``margin`` cells wider (all False when they are equal)."""
    changed = (np.asarray(wrong) != np.asarray(right)).reshape(grid, grid)
    box = np.zeros((grid, grid), dtype=bool)
    if changed.any():
        rows, cols = np.where(changed)
        box[max(0, rows.min() - margin):rows.max() + 1 + margin, max(0, cols.min() - margin):cols.max() + 1 + margin] = True
    return box.ravel()


def main() -> None:
    from cotgen.generator.model import ShapesGenerator
    from cotgen.generator.sampling import SamplingConfig, StepwiseSampler
    from cotgen.geneval.scoring import judge_image
    from cotgen.pipeline.stages import PATHS as MAIN
    from cotgen.pipeline.stages import _load_generator_parts
    from cotgen.reflect.corrector import SelfCorrector
    from cotgen.reflect.data import reflection_groups
    from cotgen.reflect.stages import PATHS
    from cotgen.reward.data import Trajectories
    from cotgen.world.detector import ShapesDetector

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("."))
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--cfg-scale", type=float, default=0.5)
    ap.add_argument("--mode", choices=("plain", "region", "guidance"), default="plain")
    ap.add_argument("--judge", action="store_true", help="also the reflective judge's reflections")
    ap.add_argument("--base", action="store_true", help="region mode: also the main job's generator")
    ap.add_argument("--corrector", type=Path, default=None, help="default: data/reflect/corrector")
    ap.add_argument("--seed", type=int, default=2, help="which held-out groups")
    a = ap.parse_args()
    if a.images < 1:
        ap.error(f"--images must be at least 1, got {a.images}")
    if a.base and a.mode != "region":
        ap.error("--base runs the main job's generator in the oracle regions: it needs --mode region")
    root = a.root
    traj = Trajectories.load(root / MAIN["trajectories"])
    image_tokenizer = _load_generator_parts(root)[1]
    detector = ShapesDetector.from_pretrained(root / MAIN["detector"])
    held = reflection_groups(traj, image_tokenizer, detector, seed=0, splits=("heldout",), right="edit")
    rng = np.random.default_rng(a.seed)
    groups = [held[i] for i in rng.choice(len(held), min(a.images, len(held)), replace=False)]
    corrector = SelfCorrector.from_pretrained(a.corrector or root / PATHS["corrector"])
    g = corrector.generator
    prompts = [x["prompt"] for x in groups]
    previous = torch.tensor([x["wrong_tokens"] for x in groups])
    conditions = {"oracle": [x["reflection"] for x in groups], "empty": [""] * len(groups)}
    if a.judge:
        from cotgen.reflect.judge import ReflectiveJudge

        judge = ReflectiveJudge.from_pretrained(root / PATHS["judge"])
        conditions["judge"] = judge.reflect(prompts, g.decode(previous), force=True)
    regions = [edit_region(x["wrong_tokens"], x["right_tokens"], g.grid_size) for x in groups]
    kinds = [x["kind"] for x in groups]
    config = SamplingConfig(n=1, cfg_scale=a.cfg_scale, temperature=a.temperature, seed=0)

    class RegionSampler(StepwiseSampler):
        """Codes outside a prompt's region are the previous image's."""

        def _sample(self, logits):
            codes = super()._sample(logits)
            for row, pid in enumerate(self._rows):
                path = self.paths[pid]
                cell = len(path.tokens)
                if not regions[path.prompt_index][cell]:
                    codes[row] = int(previous[path.prompt_index, cell])
            return codes

    def report(name, generator, sampler):
        sampler.run()
        tokens = torch.tensor([p.tokens for p in sampler.paths])
        fixed = np.array([judge_image(detector, im, x["metadata"])[0]
                          for im, x in zip(generator.decode(tokens), groups)])
        by_kind = ", ".join(f"{k} {fixed[[kk == k for kk in kinds]].mean():.2f} (of {kinds.count(k)})"
                            for k in sorted(set(kinds)))
        print(f"{a.mode} {name:6s}: fixed {fixed.mean():.3f} ({fixed.sum()} of {len(fixed)}); codes kept "
              f"{float((tokens == previous).float().mean()):.3f}; by kind: {by_kind}", flush=True)

    sampler_class = RegionSampler if a.mode == "region" else StepwiseSampler
    for name, reflections in conditions.items():
        condition = corrector.condition(reflections, previous)
        null = corrector.null_condition(previous)
        if a.mode == "guidance":  # the CFG rows: the same prompt and previous image, an empty reflection
            null_prompts, g.null_prompts = g.null_prompts, lambda n: g.encode_prompts(prompts)
            null = corrector.condition([""] * len(prompts), previous)
        try:
            sampler = sampler_class(g, prompts, config, condition=condition, null_condition=null)
        finally:
            if a.mode == "guidance":
                g.null_prompts = null_prompts
        report(name, g, sampler)
    if a.mode == "region" and a.base:
        base = ShapesGenerator.from_pretrained(root / MAIN["generator"])
        report("base", base, RegionSampler(base, prompts, config))


if __name__ == "__main__":
    main()

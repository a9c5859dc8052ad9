"""What the self-correction generator reads (issue 8's diagnostic; README, PARM++ section).

For groups of a wrong image, its reflection and a right image of the same prompt, prints
log p(right image | prompt, condition) per image (summed over its codes, nats; image codes
only compete, as in sampling: :meth:`cotgen.reflect.corrector.SelfCorrector.image_logprobs`)
under six conditions: the true reflection and previous image (what ``parm_pp`` passes), an
empty reflection, a blank canvas, both (a first round), and another group's reflection or
previous image. Then, per code, the mean log p where the right image keeps the wrong one's
code (of an object, or of the blank canvas) and where it does not: a corrector that copies
what the edit kept scores kept object codes near 0 given the previous image, and no better
than a first round without it. Held-out groups come from the held-out prompts'
trajectories, made as the training groups were (``--right``, default ``params.yaml``'s ``reflect.data.right``:
``edit`` = the wrong image repaired, ``sample`` = a correct path of the same prompt, no
rendered right images); training groups from ``data/reflect/reflections.jsonl`` (edited or
generator-sampled right images only), for contrast.

    python scripts/corrector_inputs.py [--root .] [--groups 128] [--seed 1] [--right edit|sample] [--corrector DIR]

A measurement of the trained models of a finished ``dvc repro reflect/dvc.yaml``; 3.3 min on
one thread for 2 x 128 groups. Raises FileNotFoundError if those models are missing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    from cotgen.reflect.corrector import SelfCorrector
    from cotgen.reflect.data import read_groups, reflection_groups
    from cotgen.reflect.stages import PATHS
    from cotgen.pipeline.stages import PATHS as MAIN
    from cotgen.reward.data import Trajectories

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("."))
    ap.add_argument("--groups", type=int, default=128, help="groups drawn from each split")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--corrector", type=Path, default=None,
                    help="a corrector directory (default: the stage's, under --root)")
    ap.add_argument(
        "--right",
        choices=("edit", "sample"),
        default=None,
        help="how held-out groups get their right image (default: params.yaml reflect.data.right)",
    )
    args = ap.parse_args()

    from cotgen.pipeline.params import load_params

    right = args.right or load_params(args.root / "params.yaml")["reflect"]["data"].get("right", "sample")
    corrector = SelfCorrector.from_pretrained(args.corrector or args.root / PATHS["corrector"])
    traj = Trajectories.load(args.root / MAIN["trajectories"])
    if right == "edit":
        from cotgen.pipeline.stages import _load_generator_parts
        from cotgen.world.detector import ShapesDetector

        tokenizer = _load_generator_parts(args.root)[1]
        detector = ShapesDetector.from_pretrained(args.root / MAIN["detector"])
        held = reflection_groups(traj, tokenizer, detector, seed=0, splits=("heldout",), right="edit")
    else:
        held = reflection_groups(traj, seed=0, splits=("heldout",), render_right=False)
    splits = {
        "held out": held,
        "training": [
            g for g in read_groups(args.root / PATHS["groups"]) if g["right_source"] in ("edit", "generator")
        ],
    }
    rng = np.random.default_rng(args.seed)
    for name, pool in splits.items():
        groups = [pool[i] for i in rng.choice(len(pool), size=min(args.groups, len(pool)), replace=False)]
        prompts = [g["prompt"] for g in groups]
        refl = [g["reflection"] for g in groups]
        wrong = torch.tensor([g["wrong_tokens"] for g in groups])
        right = torch.tensor([g["right_tokens"] for g in groups])
        other = np.roll(np.arange(len(groups)), 1)  # another group (another prompt, almost always)
        blank, empty = corrector.blank_tokens(len(groups)), [""] * len(groups)
        conditions = {
            "true reflection, previous image (parm_pp)": (refl, wrong),
            "empty reflection, previous image": (empty, wrong),
            "true reflection, blank canvas": (refl, blank),
            "empty reflection, blank canvas (a first round)": (empty, blank),
            "another group's reflection, previous image": ([refl[i] for i in other], wrong),
            "true reflection, another group's previous image": (refl, wrong[other]),
        }
        codes = {}
        with torch.no_grad():
            for cond, (r, w) in conditions.items():
                codes[cond] = torch.cat([
                    corrector.code_logprobs(prompts[i : i + args.batch_size], r[i : i + args.batch_size],
                                            w[i : i + args.batch_size], right[i : i + args.batch_size])
                    for i in range(0, len(groups), args.batch_size)])
        logp = {cond: v.sum(-1).numpy() for cond, v in codes.items()}
        base = logp["true reflection, previous image (parm_pp)"]
        print(f"## {name}: {len(groups)} groups (of {len(pool)})")
        for cond, v in logp.items():
            d = base - v
            print(
                f"{cond:50s} log p {v.mean():8.2f}   true condition minus this {d.mean():6.2f} nats/image"
                f" (true higher in {np.mean(d > 0):.0%})"
            )
        # per code: where the right image keeps the wrong one's code (an object's or the blank
        # canvas's), and where it does not
        kept = right == wrong
        parts = {
            "kept, object": kept & (right != blank),
            "kept, background": kept & (right == blank),
            "changed": ~kept,
        }
        print(
            "  mean log p per code: "
            + ", ".join(f"{k} ({float(m.float().mean()):.0%} of codes)" for k, m in parts.items())
        )
        for cond in list(conditions)[:4]:
            print(
                f"  {cond:48s} " + "  ".join(f"{float(codes[cond][m].mean()):7.3f}" for m in parts.values())
            )


if __name__ == "__main__":
    main()

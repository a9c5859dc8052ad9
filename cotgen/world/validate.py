"""Does the shapes detector score GenEval-Shapes correctly? (DESIGN section 3)

The renderer knows the truth, so the evaluator (detector + GenEval rules) can be
checked against it on three kinds of images per evaluation prompt:

* ground-truth renders (:func:`cotgen.world.render.render_scene`): should be judged
  correct;
* the same renders degraded (a random non-empty combination of blur, noise, colour
  jitter and 4x4 blocks per image, :func:`cotgen.world.render.random_degradation`):
  should still be judged correct;
* near misses (:func:`cotgen.world.render.render_near_miss`, every applicable kind):
  should be judged wrong.

Scoring is GenEval's: ``threshold_detections(detector.detect(image), tag)`` then
``evaluate``; a tag's score is the mean over its images, ``overall`` the unweighted
mean of the tag means.

Run ``python -m cotgen.world.validate --detector DIR --out metrics/evaluator_validation.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from cotgen.geneval.detector import Detector
from cotgen.geneval.rules import evaluate, threshold_detections
from cotgen.world import render

_BATCH = 64


def judge(
    detector: Detector, images: Sequence[Image.Image], metadata: Sequence[Mapping]
) -> list[tuple[bool, str]]:
    """GenEval's verdict ``(correct, reason)`` on each image for its metadata line.

    Uses ``detector.detect_batch`` when the detector has it, else ``detect`` per image."""
    batch = getattr(detector, "detect_batch", None)
    raws = batch(list(images)) if batch is not None else [detector.detect(im) for im in images]
    return [evaluate(threshold_detections(raw, md["tag"]), md) for raw, md in zip(raws, metadata)]


def _tag_means(results: Sequence[tuple[str, bool]]) -> tuple[dict[str, float], float]:
    by_tag: dict[str, list[bool]] = defaultdict(list)
    for tag, ok in results:
        by_tag[tag].append(ok)
    tags = {t: float(np.mean(v)) for t, v in by_tag.items()}
    return tags, float(np.mean(list(tags.values()))) if tags else float("nan")


def validate_evaluator(
    detector: Detector,
    eval_set: Sequence[Mapping],
    images_per_prompt: int = 4,
    seed: int = 0,
    progress: bool = True,
    failures_kept: int = 20,
) -> dict:
    """Measure how well ``detector`` + GenEval's rules judge rendered scenes.

    Args:
        detector: any :class:`~cotgen.geneval.detector.Detector` for the shapes classes.
        eval_set: GenEval metadata lines (e.g. ``build_shapes_eval_set()``).
        images_per_prompt: renders per prompt, and near misses per prompt and kind.
        seed: seed of the NumPy generator drawing every scene and degradation.
        progress: show a tqdm bar.
        failures_kept: how many example failures of each kind to include.
    Returns:
        A JSON-ready dict:
        ``ground_truth_overall``, ``ground_truth_tags`` (tag -> mean correct),
        ``degraded_overall``, ``degraded_tags``, ``degraded_by_kind`` (degradation combo
        -> mean correct), ``near_miss_correct_rate`` (tag -> fraction of near misses
        judged correct), ``near_miss_by_kind`` (kind -> fraction judged correct),
        ``near_miss_overall`` (mean of the tag rates), ``counts`` (images per part),
        ``failures`` (a few examples per part: prompt, reason, degradation or kind),
        ``seconds``.
    Raises:
        ValueError: ``eval_set`` is empty or ``images_per_prompt`` < 1, or a line cannot
            be rendered.
    """
    from tqdm.auto import tqdm

    if not eval_set:
        raise ValueError("eval_set is empty")
    if images_per_prompt < 1:
        raise ValueError(f"images_per_prompt must be >= 1, got {images_per_prompt}")
    t0 = time.time()
    rng = np.random.default_rng(seed)
    gt, deg, near = [], [], []  # (tag, correct)
    deg_kind: dict[str, list[bool]] = defaultdict(list)
    near_kind: dict[str, list[bool]] = defaultdict(list)
    failures: dict[str, list[dict]] = {"ground_truth": [], "degraded": [], "near_miss": []}

    def keep(part: str, md: Mapping, reason: str, **extra) -> None:
        if len(failures[part]) < failures_kept:
            failures[part].append({"prompt": md["prompt"], "tag": md["tag"], "reason": reason, **extra})

    pending: list[tuple[str, Mapping, Image.Image, str]] = []  # part, metadata, image, note

    def flush() -> None:
        verdicts = judge(detector, [p[2] for p in pending], [p[1] for p in pending])
        for (part, md, _, note), (ok, reason) in zip(pending, verdicts):
            if part == "ground_truth":
                gt.append((md["tag"], ok))
            elif part == "degraded":
                deg.append((md["tag"], ok))
                deg_kind[note].append(ok)
            else:
                near.append((md["tag"], ok))
                near_kind[note].append(ok)
            wrong = ok if part == "near_miss" else not ok
            if wrong:
                keep(part, md, reason or "judged correct", note=note)
        pending.clear()

    for md in tqdm(eval_set, desc="validating evaluator", disable=not progress, mininterval=1.0):
        for _ in range(images_per_prompt):
            image, _objects = render.render_scene(md, rng)
            pending.append(("ground_truth", md, image, ""))
            combo = render.random_degradation(rng)
            pending.append(("degraded", md, render.degrade(image, rng, combo), combo))
        for kind in render.near_miss_kinds(md):
            for _ in range(images_per_prompt):
                image, _objects = render.render_near_miss(md, rng, kind)
                pending.append(("near_miss", md, image, kind))
        if len(pending) >= _BATCH:
            flush()
    flush()

    gt_tags, gt_overall = _tag_means(gt)
    deg_tags, deg_overall = _tag_means(deg)
    near_tags, near_overall = _tag_means(near)
    return {
        "ground_truth_overall": gt_overall,
        "ground_truth_tags": gt_tags,
        "degraded_overall": deg_overall,
        "degraded_tags": deg_tags,
        "degraded_by_kind": {k: float(np.mean(v)) for k, v in sorted(deg_kind.items())},
        "near_miss_correct_rate": near_tags,
        "near_miss_overall": near_overall,
        "near_miss_by_kind": {k: float(np.mean(v)) for k, v in sorted(near_kind.items())},
        "counts": {
            "prompts": len(eval_set),
            "ground_truth": len(gt),
            "degraded": len(deg),
            "near_miss": len(near),
        },
        "images_per_prompt": images_per_prompt,
        "seed": seed,
        "failures": failures,
        "seconds": round(time.time() - t0, 1),
    }


def main(argv: Sequence[str] | None = None, load: Callable[[str], Detector] | None = None) -> dict:
    from cotgen.world.detector import ShapesDetector
    from cotgen.world.prompts import build_shapes_eval_set

    parser = argparse.ArgumentParser(
        description="Validate the shapes detector + GenEval rules on rendered scenes."
    )
    parser.add_argument(
        "--detector", required=True, help="detector directory (config.json + model.safetensors)"
    )
    parser.add_argument("--out", default="metrics/evaluator_validation.json", help="metrics JSON to write")
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    detector = (load or ShapesDetector.from_pretrained)(args.detector)
    metrics = validate_evaluator(detector, build_shapes_eval_set(), args.images_per_prompt, args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    summary = {k: metrics[k] for k in ("ground_truth_overall", "degraded_overall", "near_miss_correct_rate")}
    print(json.dumps(summary, indent=2))
    return metrics


if __name__ == "__main__":
    main()

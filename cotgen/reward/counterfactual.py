"""Colour-word counterfactuals for the judge (issue 4).

The judge's colour errors on the evaluation set are bindings of the colour word to the
object (a yellow diamond scores high for "a blue diamond"): the generated data hold few
``colors`` prompts outside the evaluation set (17 of 80 colour-shape pairs), and the judge
never sees the same picture asked about in other colours. Here each labelled final image
is asked about again as a ``colors`` / ``color_attr`` prompt on objects it shows, in the
colours it shows ("yes") and in swapped or other colours ("no"), relabelled by the
evaluator's own rules on the image's detections, never with an evaluation prompt.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from tqdm import tqdm

from cotgen.reward.data import Trajectories
from cotgen.reward.train import decode_steps


def recolored_metadata(names: Sequence[str], colors: Sequence[str]) -> dict:
    """The GenEval metadata line asking for objects ``names`` in ``colors``: one object ->
    a ``colors`` line ("a photo of a blue diamond"), two -> a ``color_attr`` line ("a
    photo of a red star and a blue cross"), worded as GenEval's builder words them
    (:class:`cotgen.world.prompts.PromptBuilder`).

    Raises:
        ValueError: not one or two distinct objects, a colour count that is not the object
            count, or two equal colours (GenEval draws color_attr's colours without
            replacement).
    """
    from cotgen.world.prompts import with_article

    if len(names) not in (1, 2) or len(set(names)) != len(names):
        raise ValueError(f"need one or two distinct objects, got {list(names)}")
    if len(colors) != len(names) or len(set(colors)) != len(colors):
        raise ValueError(f"need {len(names)} distinct colours for {list(names)}, got {list(colors)}")
    include = [{"class": n, "count": 1, "color": c} for n, c in zip(names, colors)]
    phrases = [f"{with_article(c)} {n}" for n, c in zip(names, colors)]
    return {"tag": "colors" if len(names) == 1 else "color_attr", "include": include,
            "prompt": "a photo of " + " and ".join(phrases)}


def color_counterfactuals(
    traj: Trajectories,
    detections: Mapping[int, Mapping[str, Sequence]],
    exclude_prompts: set[str],
    per_image: int,
    seed: int = 0,
    objects: Sequence[int] = (1, 2),
) -> list[dict]:
    """Colour-word counterfactuals: a labelled final image asked about again as a
    ``colors`` or ``color_attr`` prompt on objects it shows, relabelled by the evaluator
    (GenEval's rules on the same detections), so the judge sees the same picture as "yes"
    for the colours it shows and "no" for others (issue 4: the judge's colour errors are
    bindings of the colour word to the object, on colour-shape pairs it never trained on).

    Per path (a row of ``detections``) whose prompt asks for single objects of one or two
    classes (``single_object``, ``colors``, ``two_object``, ``color_attr``, ``position``;
    not ``counting``) and whose objects the detector all finds, if their number is in
    ``objects``: up to ``per_image`` new prompts about those objects, in this order: the
    colours the detector sees on them ("yes"), the same colours swapped between two
    objects (a binding error: "no"), random distinct colours. Never the path's own prompt
    or one in ``exclude_prompts`` (the evaluation set; for training images also the
    held-out prompts).

    Measured (2026-12-01, ``metrics/judge.json``): with one-object counterfactuals too,
    which can only use the 17 ``colors`` pairs outside the evaluation set, and objects the
    detector finds in any image, held-out counterfactual AUROC rose from 0.49 to 0.96 but
    held-out outcome AUROC fell from 0.94 to 0.80 and PARM (N = 8) from 0.311 to 0.269;
    correct images of an unseen colour-shape pair ("a photo of a black star") fell to
    P(yes) 0.01: the judge memorised the 17 pairs.

    Args:
        traj: the trajectories (their ``paths`` metadata).
        detections: path row -> the final image's detections thresholded as for a
            ``colors`` prompt (GenEval's 0.3; :func:`final_detections`).
        exclude_prompts: prompt texts never to produce.
        per_image: counterfactual prompts per image (>= 0).
    Returns:
        dicts ``path``, ``split`` (the path's), ``metadata`` (the new line), ``prompt``,
        ``label`` (bool, the evaluator's), ``reason``; ordered by path.
    Raises:
        ValueError: ``per_image < 0``.
    """
    from cotgen.geneval.rules import evaluate
    from cotgen.world.vocab import COLORS

    if per_image < 0:
        raise ValueError(f"per_image must be >= 0, got {per_image}")
    rng = np.random.default_rng(seed)
    out = []
    for i in sorted(detections):
        meta, det = traj.paths[i]["metadata"], detections[i]
        names = [inc["class"] for inc in meta["include"]]
        if (per_image == 0 or len(names) not in objects or len(set(names)) != len(names)
                or any(inc["count"] != 1 for inc in meta["include"]) or not all(det.get(n) for n in names)):
            continue
        seen = tuple(det[n][0].color for n in names)
        options = [seen, seen[::-1]]
        options += [tuple(rng.choice(COLORS, size=len(names), replace=False).tolist()) for _ in range(3 * per_image)]
        made: set[str] = set()
        for colors in options:
            if len(made) == per_image:
                break
            if len(set(colors)) != len(colors):
                continue
            line = recolored_metadata(names, colors)
            if line["prompt"] in made or line["prompt"] == meta["prompt"] or line["prompt"] in exclude_prompts:
                continue
            made.add(line["prompt"])
            correct, reason = evaluate(det, line)
            out.append({"path": i, "split": traj.paths[i]["split"], "metadata": line, "prompt": line["prompt"],
                        "label": bool(correct), "reason": reason})
    return out


def counterfactual_examples(examples: Sequence[dict], counterfactuals: Sequence[dict]) -> list[dict]:
    """Judge examples of the counterfactuals: each path's ``outcome`` and ``potential``
    examples (same steps) asked again with the new ``prompt`` and its label (potential
    inherits the outcome from the first clear step on, as in :func:`judge_examples`),
    marked ``counterfactual: True`` with the new ``tag``. Clarity does not depend on the prompt and step
    labels would need new roll-outs, so neither is repeated."""
    by_path: dict[int, list[dict]] = {}
    for e in examples:
        if e["question"] in ("outcome", "potential"):
            by_path.setdefault(e["path"], []).append(e)
    return [{**e, "prompt": c["prompt"], "label": c["label"], "counterfactual": True, "tag": c["metadata"]["tag"]}
            for c in counterfactuals for e in by_path.get(c["path"], [])]


def final_detections(traj: Trajectories, image_tokenizer, detector, rows: Sequence[int], batch_size: int = 256,
                     progress: bool = True) -> dict[int, dict]:
    """Path row -> the detections of its final image, thresholded as GenEval thresholds
    them for a ``colors`` or ``color_attr`` prompt (score 0.3, at most 16 per class;
    :func:`cotgen.geneval.rules.threshold_detections`): the input of
    :func:`color_counterfactuals`."""
    from cotgen.geneval.rules import threshold_detections

    rows = list(rows)
    out = {}
    for start in tqdm(range(0, len(rows), batch_size), desc="final detections", disable=not progress):
        chunk = rows[start : start + batch_size]
        images = decode_steps(traj, image_tokenizer, [(r, traj.num_steps) for r in chunk])
        for r, image in zip(chunk, images):
            out[r] = threshold_detections(detector.detect(image), "colors")
    return out


def judge_counterfactuals(traj, examples, image_tokenizer, detector, eval_set: Sequence[dict], per_image: int,
                          seed: int = 0, progress: bool = True, objects: Sequence[int] = (1, 2),
                          heldout_per_image: int | None = None) -> tuple[list[dict], dict]:
    """The judge's colour-counterfactual examples (:func:`color_counterfactuals`) of the
    trajectories' final images, and their counts: ``per_image`` per training image (0 =
    none to train on), ``heldout_per_image`` (default ``per_image``) per held-out image.

    Training images never get an evaluation or a held-out prompt; held-out images never
    get an evaluation prompt (they may get a training prompt's text: every non-evaluation
    ``colors`` prompt is a training prompt), and are measured apart
    (``outcome_counterfactual`` in ``metrics/judge.json``: does the judge bind the colour
    word to the object on unseen images?).
    """
    heldout_per_image = per_image if heldout_per_image is None else heldout_per_image
    rows = [r for r, p in enumerate(traj.paths) if (per_image if p["split"] == "train" else heldout_per_image)]
    det = final_detections(traj, image_tokenizer, detector, rows, progress=progress)
    eval_prompts = {m["prompt"] for m in eval_set}
    heldout_prompts = {p["prompt"] for p in traj.paths if p["split"] == "heldout"}
    cfs = []
    for split, exclude, n in (("train", eval_prompts | heldout_prompts, per_image),
                              ("heldout", eval_prompts, heldout_per_image)):
        cfs += color_counterfactuals(traj, {r: det[r] for r in rows if traj.paths[r]["split"] == split}, exclude,
                                     n, seed, objects)
    cf_examples = counterfactual_examples(examples, cfs)
    summary = {}
    for split in ("train", "heldout"):
        part = [c for c in cfs if c["split"] == split]
        summary[split] = {"counterfactuals": len(part), "examples": sum(e["split"] == split for e in cf_examples),
                          "yes_rate": float(np.mean([c["label"] for c in part])) if part else None,
                          "by_tag": {t: sum(c["metadata"]["tag"] == t for c in part) for t in ("colors", "color_attr")}}
    return cf_examples, summary

"""Scoring images and folders with GenEval's rules, and GenEval's summary.

Result lines carry GenEval's official fields (``filename, tag, prompt, correct, reason,
metadata, details``); the summary follows GenEval's ``summary_scores.py``: tag score =
mean over that tag's images, overall = unweighted mean of the tag scores, plus % correct
images and % prompts with at least one correct image.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from cotgen.geneval.detector import Detector
from cotgen.geneval.layout import load_image, read_folder
from cotgen.geneval.metadata import load_metadata
from cotgen.geneval.rules import Detection, Thresholds, evaluate, threshold_detections
from cotgen.world.prompts import TAGS, content_key


class MissingPromptsError(ValueError):
    """A GenEval folder lacks prompts that the metadata file has."""


def judge_image(
    detector: Detector, image: Image.Image, metadata: dict, thresholds: Thresholds = Thresholds()
) -> tuple[bool, str, dict[str, list[Detection]]]:
    """Detect, threshold (GenEval's 0.3 / 0.9 for counting / 16 per class) and evaluate.

    Returns ``(correct, reason, detections)`` with the thresholded detections.
    """
    raw = detector.detect(image)
    detected = threshold_detections(raw, metadata["tag"], thresholds)
    correct, reason = evaluate(detected, metadata, thresholds.position_threshold)
    return correct, reason, detected


def result_line(filename: str, metadata: dict, correct: bool, reason: str, detected: dict) -> dict:
    """One line of GenEval's results file. ``metadata`` and ``details`` are JSON strings,
    as in the official file; ``details`` maps class -> list of ``[x1, y1, x2, y2, score,
    colour]``."""
    return {
        "filename": filename,
        "tag": metadata["tag"],
        "prompt": metadata["prompt"],
        "correct": bool(correct),
        "reason": reason,
        "metadata": json.dumps(metadata),
        "details": json.dumps(
            {name: [[*d.box, d.score, d.color] for d in dets] for name, dets in detected.items()}
        ),
    }


def score_images(
    detector: Detector,
    items: Iterable[tuple[str, Image.Image, dict]],
    thresholds: Thresholds = Thresholds(),
) -> list[dict]:
    """Score ``(filename, image, metadata)`` triples; returns GenEval result lines."""
    results = []
    for filename, image, metadata in items:
        correct, reason, detected = judge_image(detector, image, metadata, thresholds)
        results.append(result_line(filename, metadata, correct, reason, detected))
    return results


def summarize(results: Sequence[dict], missing_prompts: int = 0, n: int = 1) -> dict:
    """GenEval's summary of result lines.

    Args:
        n: candidates generated per final image (1 for plain sampling, N for best-of-N
            or a search); recorded, not used in the scores.
    Returns ``{"overall", "tags", "images", "prompts", "n", "images_per_prompt",
    "correct_images", "correct_prompts", "missing_prompts"}``: ``overall`` and ``tags`` in
    [0, 1] (``overall`` = unweighted mean over the tags present), ``correct_images`` and
    ``correct_prompts`` as fractions in [0, 1] (DESIGN section 5's metrics keys).

    Raises:
        ValueError: no result lines.
    """
    if not results:
        raise ValueError("no results to summarize")
    by_tag: dict[str, list[bool]] = defaultdict(list)
    by_prompt: dict[str, list[bool]] = defaultdict(list)
    for r in results:
        by_tag[r["tag"]].append(bool(r["correct"]))
        by_prompt[r["metadata"]].append(bool(r["correct"]))
    tags = {t: sum(v) / len(v) for t in TAGS if (v := by_tag.get(t))}
    tags.update({t: sum(v) / len(v) for t, v in by_tag.items() if t not in tags})
    return {
        "overall": sum(tags.values()) / len(tags),
        "tags": tags,
        "images": len(results),
        "prompts": len(by_prompt),
        "n": n,
        "images_per_prompt": len(results) / len(by_prompt),
        "correct_images": sum(bool(r["correct"]) for r in results) / len(results),
        "correct_prompts": sum(any(v) for v in by_prompt.values()) / len(by_prompt),
        "missing_prompts": missing_prompts,
    }


def check_complete(folder_metadata: Sequence[dict], expected: Sequence[dict]) -> list[tuple[int, str]]:
    """Prompts of ``expected`` (index, prompt) that have no folder with the same content."""
    present = {content_key(m) for m in folder_metadata}
    return [(i, m["prompt"]) for i, m in enumerate(expected) if content_key(m) not in present]


def score_folder(
    root: str | Path,
    detector: Detector,
    metadata_file: str | Path | None = None,
    allow_partial: bool = False,
    thresholds: Thresholds = Thresholds(),
    progress: bool = True,
) -> tuple[list[dict], dict]:
    """Score a GenEval folder; returns ``(result_lines, summary)``.

    Args:
        metadata_file: if given, every prompt in it must have a folder.
        allow_partial: score what is there instead; ``summary["missing_prompts"]`` counts
            the rest.
    Raises:
        LayoutError, ImageError: bad folder or image (message names the path).
        MissingPromptsError: prompts of ``metadata_file`` without a folder (all listed).
        ValueError: an image the detector rejects (message names the file).
    """
    prompts = read_folder(root)
    missing: list[tuple[int, str]] = []
    if metadata_file is not None:
        missing = check_complete([p.metadata for p in prompts], load_metadata(metadata_file))
        if missing and not allow_partial:
            listed = "\n".join(f"  {i:05d}: {p}" for i, p in missing)
            raise MissingPromptsError(
                f"{root} lacks {len(missing)} prompt(s) of {metadata_file} "
                f"(pass --allow-partial to score the rest):\n{listed}"
            )
    results = []
    samples = [(p, s) for p in prompts for s in p.samples]
    for prompt, path in tqdm(samples, desc="GenEval", disable=not progress, unit="img"):
        image = load_image(path)
        try:
            correct, reason, detected = judge_image(detector, image, prompt.metadata, thresholds)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        results.append(result_line(str(path), prompt.metadata, correct, reason, detected))
    return results, summarize(results, missing_prompts=len(missing))


def write_results(path: str | Path, results: Sequence[dict]) -> None:
    """Write result lines as JSON lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in results), encoding="utf-8")

"""GenEval's rules, exactly (DESIGN section 2; GenEval ``evaluation/evaluate_images.py``).

Everything here is pure Python/NumPy on detections; detectors live elsewhere and only
have to produce :class:`Detection` objects. All thresholds are module constants that
callers can override through :class:`Thresholds`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from cotgen.world.vocab import COLORS

#: GenEval's defaults.
THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
POSITION_THRESHOLD = 0.1


@dataclass
class Detection:
    """One detected object, GenEval style.

    Attributes:
        box: ``(x1, y1, x2, y2)`` in pixels, y pointing down, ``x2 >= x1``, ``y2 >= y1``.
        score: confidence on a probability scale, [0, 1] (class probability x mask quality).
        color: one of GenEval's ten colour names, or ``None`` when not classified.
        mask: optional boolean mask, shape ``(H, W)``, of the whole image.
        color_scores: optional colour name -> probability.
    """

    box: tuple[float, float, float, float]
    score: float
    color: str | None = None
    mask: np.ndarray | None = field(default=None, repr=False)
    color_scores: dict[str, float] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if len(self.box) != 4:
            raise ValueError(f"box must be (x1, y1, x2, y2), got {self.box!r}")
        x1, y1, x2, y2 = (float(v) for v in self.box)
        if x2 < x1 or y2 < y1:
            raise ValueError(f"box must have x2 >= x1 and y2 >= y1, got {self.box!r}")
        self.box = (x1, y1, x2, y2)
        self.score = float(self.score)
        if self.color is not None and self.color not in COLORS:
            raise ValueError(f"color {self.color!r} is not one of GenEval's ten: {', '.join(COLORS)}")


@dataclass(frozen=True)
class Thresholds:
    """GenEval's detection constants; override any of them.

    Attributes:
        threshold: minimum score (exclusive) for every tag but counting; GenEval 0.3.
        counting_threshold: minimum score (exclusive) for every class when the tag is
            ``counting``; GenEval 0.9.
        max_objects: at most this many detections per class, best first; GenEval 16.
        position_threshold: share of the summed box sizes an offset is shrunk by per
            axis in :func:`relative_position`; GenEval 0.1.
    """

    threshold: float = THRESHOLD
    counting_threshold: float = COUNTING_THRESHOLD
    max_objects: int = MAX_OBJECTS
    position_threshold: float = POSITION_THRESHOLD


def threshold_detections(
    raw: Mapping[str, Sequence[Detection]], tag: str, thresholds: Thresholds = Thresholds()
) -> dict[str, list[Detection]]:
    """GenEval's filtering: per class keep scores ``> threshold`` (``> counting_threshold``
    when ``tag == "counting"``), best first, at most ``max_objects``; no NMS. Classes with
    no detection left are absent from the result."""
    cut = thresholds.counting_threshold if tag == "counting" else thresholds.threshold
    out: dict[str, list[Detection]] = {}
    for name, dets in raw.items():
        kept = sorted((d for d in dets if d.score > cut), key=lambda d: -d.score)[: thresholds.max_objects]
        if kept:
            out[name] = kept
    return out


def relative_position(
    box_a: Sequence[float], box_b: Sequence[float], position_threshold: float = POSITION_THRESHOLD
) -> set[str]:
    """Relations in which box A stands to box B (GenEval ``relative_position``).

    Boxes are ``(x1, y1, x2, y2)`` in pixels, y down. The centre offset A - B is shrunk
    per axis by ``position_threshold x (size_A + size_B)`` (floored at 0, sign kept); if
    both shrunk components are below 1e-3 there is no relation; otherwise each is divided
    by the length of the *unshrunk* offset and compared with +-0.5. Two relations can
    hold at once. Returns a subset of ``{"left of", "right of", "above", "below"}``.
    """
    boxes = np.asarray([box_a[:4], box_b[:4]], dtype=np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - position_threshold * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def evaluate(
    detections: Mapping[str, Sequence[Detection]],
    metadata: Mapping,
    position_threshold: float = POSITION_THRESHOLD,
) -> tuple[bool, str]:
    """Whether an image's detections satisfy a GenEval metadata line (GenEval ``evaluate``).

    Args:
        detections: class name -> detections already thresholded and sorted best first
            (see :func:`threshold_detections`).
        metadata: one GenEval metadata line (``include`` and optional ``exclude``).
    Returns:
        ``(correct, reason)``: ``reason`` lists every failed requirement, one per line,
        in GenEval's wording; empty when correct.

    Rules: an include ``{class, count}`` holds when at least ``count`` detections exist;
    with ``color``, *all* of the top ``count`` must have that colour; with
    ``position: [rel, j]``, requirement ``j`` must have held and every found object must
    stand in ``rel`` to every object found for ``j``. An exclude ``{class, count}`` fails
    when at least ``count`` detections exist.
    """
    correct = True
    reason: list[str] = []
    matched_groups: list[list[Detection] | None] = []
    for req in metadata.get("include", []):
        classname = req["class"]
        matched = True
        found = list(detections.get(classname, []))[: req["count"]]
        if len(found) < req["count"]:
            correct = matched = False
            reason.append(f"expected {classname}>={req['count']}, found {len(found)}")
        else:
            if "color" in req:
                colors = [d.color for d in found]
                if colors.count(req["color"]) < req["count"]:
                    correct = matched = False
                    reason.append(
                        f"expected {req['color']} {classname}>={req['count']}, found "
                        f"{colors.count(req['color'])} {req['color']}; and "
                        + ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors)
                    )
            if "position" in req and matched:
                expected_rel, target_group = req["position"]
                if matched_groups[target_group] is None:
                    correct = matched = False
                    reason.append(f"no target for {classname} to be {expected_rel}")
                else:
                    for obj in found:
                        for target in matched_groups[target_group]:
                            true_rels = relative_position(obj.box, target.box, position_threshold)
                            if expected_rel not in true_rels:
                                correct = matched = False
                                reason.append(
                                    f"expected {classname} {expected_rel} target, found "
                                    f"{' and '.join(sorted(true_rels))} target"
                                )
                                break
                        if not matched:
                            break
        matched_groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        classname = req["class"]
        n_found = len(detections.get(classname, []))
        if n_found >= req["count"]:
            correct = False
            reason.append(f"expected {classname}<{req['count']}, found {n_found}")
    return correct, "\n".join(reason)

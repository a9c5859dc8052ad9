"""Edit-style right images for the self-correction groups (PARM++, issue 8).

A group's right image must depend on its wrong image and on the named fault, or the
corrector has nothing to learn from the reflection: with a right image drawn at random
from the prompt's correct samples, the best it can learn is p(right | prompt), whatever
the reflection says (measured in stop 23, ``scripts/corrector_inputs.py``). So the right
image here is the wrong image itself with the reflection's fault repaired, in pixels:

- ``missing``: draw the include's objects (its class, its colour or a random one) on free
  background, standing in the prompt's relation to the objects already there;
- ``count``: too few -> draw the missing ones; too many (GenEval's exclude) -> erase the
  surplus (the lowest-scored);
- ``color``: redraw the top-``count`` objects of the wrong colour in the asked colour,
  same place and size;
- ``position``: erase the object and draw it again where it stands in the asked relation
  to every object of its target.

A new or moved object with no free place in its relation moves its partners instead
(the target is drawn again where the relation holds).

Everything else keeps its pixels. Objects are drawn as the generator's training scenes
are (:data:`cotgen.world.render.CANONICAL`: no rotation, sides of 12-24 px, boxes on the
4-px token grid), :data:`EDIT_GAP` px clear of anything already drawn and with the
renderer's position margin; erasing paints the object's (dilated) mask with the image's
background colour.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from scipy import ndimage

from cotgen.geneval.rules import Detection
from cotgen.reflect.text import Failure
from cotgen.world.detector import background_color
from cotgen.world.render import (
    BORDER,
    CANONICAL,
    POSITION_MARGIN,
    SIZE_RANGE,
    RenderStyle,
    _draw_patch,
    _relation_ok,
    _side,
    composite,
)
from cotgen.world.vocab import COLOR_RGB, COLORS

#: A pixel is foreground (occupied) when its colour is this far (sRGB units) from the background.
OCCUPIED_DISTANCE = 30.0
#: Erased objects' masks are dilated by this many pixels first (their soft edges).
ERASE_DILATION = 2
#: Free space a new object keeps to anything on the image, pixels (the detector merges pieces
#: at most 2 px apart; the renderer's own scenes keep ``BOX_GAP``, which leaves no room in
#: many generated images).
EDIT_GAP = 4


class _Canvas:
    """A float copy of an image with its background colour and what is on it."""

    def __init__(self, image: np.ndarray):
        self.pixels = image.astype(np.float32).copy()
        self.background = background_color(image)

    def occupied(self) -> np.ndarray:
        return np.linalg.norm(self.pixels - self.background, axis=-1) > OCCUPIED_DISTANCE

    def erase(self, mask: np.ndarray) -> None:
        self.pixels[ndimage.binary_dilation(mask, iterations=ERASE_DILATION)] = self.background

    def draw(self, color: str, box: tuple[int, int, int, int], patch) -> None:
        """Paint ``patch`` (an object's coverage) in ``color`` with its tight box's corner at ``box[:2]``."""
        bx0, by0 = patch.box[:2]
        composite(self.pixels, patch.alpha, COLOR_RGB[color], box[0] - bx0, box[1] - by0)

    def image(self) -> np.ndarray:
        return np.clip(np.rint(self.pixels), 0, 255).astype(np.uint8)


def _snap_side(box: Sequence[float], style: RenderStyle) -> float:
    side = max(box[2] - box[0], box[3] - box[1])
    return float(min(style.sizes, key=lambda s: abs(s - side))) if style.sizes else float(side)


def _free_box(
    canvas: _Canvas,
    side: float,
    shape: str,
    rng: np.random.Generator,
    style: RenderStyle,
    constraints: Sequence[tuple[Sequence[float], str, bool]],
):
    """A random box for a new ``shape`` of ``side`` px on free background (at least
    :data:`EDIT_GAP` px from every occupied pixel, ``BORDER`` px inside the image, on the
    style's grid) that satisfies every constraint ``(other_box, rel, new_is_a)``: the new
    box stands in ``rel`` to ``other_box`` (or ``other_box`` to it), with the renderer's
    position margin. Returns ``(box, patch)`` or None when no place is free."""
    size = canvas.pixels.shape[0]
    patch = _draw_patch(shape, side, 0.0, rng, subpixel=False)
    bx0, by0, bx1, by1 = patch.box
    w, h = bx1 - bx0, by1 - by0
    grid = max(1, style.snap)
    near = ndimage.binary_dilation(canvas.occupied(), iterations=EDIT_GAP)
    options = []
    for y in range(-(-BORDER // grid) * grid, size - BORDER - h + 1, grid):
        for x in range(-(-BORDER // grid) * grid, size - BORDER - w + 1, grid):
            box = (x, y, x + w, y + h)
            if near[y:y + h, x:x + w].any():
                continue
            if all(
                _relation_ok(box, other, rel, True, POSITION_MARGIN)
                if new_is_a
                else _relation_ok(other, box, rel, True, POSITION_MARGIN)
                for other, rel, new_is_a in constraints
            ):
                options.append(box)
    if not options:
        return None
    return options[int(rng.integers(len(options)))], patch


def _relation_constraints(metadata: Mapping, include: int, found: Mapping[str, Sequence[Detection]]):
    """Constraints on a new object of ``include``, as ``(partner detection, partner class,
    rel, new_is_a)``: its own position (it stands in ``rel`` to every found object of its
    target) and every include positioned against it (each of their found objects stands
    in ``rel`` to it)."""
    reqs = metadata["include"]
    out = []
    if "position" in reqs[include]:
        rel, target = reqs[include]["position"]
        cls = reqs[target]["class"]
        out += [(d, cls, rel, True) for d in found.get(cls, [])[: reqs[target]["count"]]]
    for req in reqs:
        if "position" in req and req["position"][1] == include:
            partners = found.get(req["class"], [])[: req["count"]]
            out += [(d, req["class"], req["position"][0], False) for d in partners]
    return out


def _place_related(canvas: _Canvas, cls: str, color: str, side: float, constraints, rng: np.random.Generator,
                   style: RenderStyle) -> bool:
    """Draw a ``cls`` object where it satisfies ``constraints`` (:func:`_relation_constraints`);
    when no free place does, move its partners instead: erase them, draw the object on
    any free place, then draw each partner again where the relation holds (same shape,
    colour and size). Returns whether everything was drawn."""
    placed = _free_box(canvas, side, cls, rng, style, [(d.box, rel, a) for d, _, rel, a in constraints])
    if placed is None and constraints:
        for d, *_ in constraints:
            canvas.erase(d.mask)
        placed = _free_box(canvas, side, cls, rng, style, [])
        if placed is None:
            return False
        canvas.draw(color, *placed)
        for d, partner, rel, new_is_a in constraints:
            p_side = _snap_side(d.box, style)
            again = _free_box(canvas, p_side, partner, rng, style, [(placed[0], rel, not new_is_a)])
            if again is None:
                return False
            canvas.draw(d.color or COLORS[int(rng.integers(len(COLORS)))], *again)
        return True
    if placed is None:
        return False
    canvas.draw(color, *placed)
    return True


def _total_objects(found: Mapping[str, Sequence[Detection]]) -> int:
    return len({tuple(d.box) for dets in found.values() for d in dets})


def repair_image(
    image: np.ndarray,
    found: Mapping[str, Sequence[Detection]],
    metadata: Mapping,
    failure: Failure,
    rng: np.random.Generator,
    style: RenderStyle = CANONICAL,
) -> np.ndarray | None:
    """The wrong image with ``failure`` repaired (module docstring), everything else kept.

    Args:
        image: uint8 ``(64, 64, 3)``, the wrong image (decoded from its tokens).
        found: the evaluator's thresholded detections of it (class -> detections, best
            first, with masks; :func:`cotgen.geneval.scoring.judge_image`'s third value).
        metadata: the prompt's GenEval metadata line.
        failure: the fault to repair (:func:`cotgen.reflect.text.primary_failure` of the
            evaluator's reason).
        rng: NumPy generator (placement, colour of an uncoloured new object).
        style: how new objects are drawn (the generator's scene style).
    Returns:
        uint8 ``(64, 64, 3)``, or None when the repair has no room (no free place that
        satisfies the relations) or nothing to act on (e.g. a colour fault without
        detections). Whether the result is correct is for the evaluator to say.
    """
    reqs = metadata["include"]
    if not 0 <= failure.include < len(reqs):
        raise ValueError(f"failure include {failure.include} is not an include of {metadata.get('prompt')!r}")
    req = reqs[failure.include]
    cls, want = req["class"], int(req["count"])
    dets = list(found.get(cls, []))
    canvas = _Canvas(image)
    lo, hi = SIZE_RANGE[min(max(SIZE_RANGE), _total_objects(found) + max(1, want - len(dets)))]
    constraints = _relation_constraints(metadata, failure.include, found)  # on new or moved objects

    def add(n: int) -> bool:
        for _ in range(n):
            side = _side(lo, hi, style, rng)
            color = req.get("color") or COLORS[int(rng.integers(len(COLORS)))]
            if not _place_related(canvas, cls, color, side, constraints, rng, style):
                return False
        return True

    if failure.kind in ("missing", "count") and len(dets) < want:
        ok = add(want - len(dets))
    elif failure.kind == "count":  # too many: GenEval's exclude counts every detection of the class
        surplus = len(dets) - want
        if surplus <= 0:
            return None
        for d in dets[-surplus:]:
            canvas.erase(d.mask)
        ok = True
    elif failure.kind == "color":
        wrong = [d for d in dets[:want] if d.color != req.get("color")]
        if not wrong or "color" not in req:
            return None
        for d in wrong:
            x0, y0 = (int(round(v)) for v in d.box[:2])
            side = _snap_side(d.box, style)
            canvas.erase(d.mask)
            patch = _draw_patch(cls, side, 0.0, rng, subpixel=False)
            canvas.draw(req["color"], (x0, y0, x0, y0), patch)
        ok = True
    elif failure.kind == "position":
        movers = dets[:want]
        if not movers:
            return None
        for d in movers:
            canvas.erase(d.mask)
        ok = True
        for d in movers:
            color = d.color or req.get("color") or COLORS[int(rng.integers(len(COLORS)))]
            if not _place_related(canvas, cls, color, _snap_side(d.box, style), constraints, rng, style):
                ok = False
                break
    else:
        return None
    return canvas.image() if ok else None


def repair_until_correct(image: np.ndarray, detector, metadata: Mapping, rng: np.random.Generator,
                         style: RenderStyle = CANONICAL, max_edits: int = 3) -> tuple[np.ndarray | None, int]:
    """Repair the evaluator's primary failure of ``image`` (:func:`repair_image`), judge
    the result again and repeat until the evaluator finds it correct, at most
    ``max_edits`` edits. The reflection names the first fault; a wrong image often has a
    second one (a missing object and a wrongly coloured one), and a right image must be
    right.

    Args:
        image: uint8 ``(64, 64, 3)``.
        detector: the GenEval-Shapes detector (:class:`cotgen.world.detector.ShapesDetector`).
        metadata: the prompt's GenEval metadata line.
    Returns:
        ``(image, edits)``: the repaired uint8 image judged correct, or None (no room, an
        unparsed reason, or still wrong after ``max_edits``), and the edits made.
    """
    from cotgen.geneval.scoring import judge_image
    from cotgen.reflect.text import primary_failure

    current = image
    for edits in range(max_edits + 1):
        correct, reason, found = judge_image(detector, current, metadata)
        if correct:
            return (current if edits else None), edits
        failure = primary_failure(reason, metadata)
        if failure is None or edits == max_edits:
            return None, edits
        current = repair_image(current, found, metadata, failure, rng, style)
        if current is None:
            return None, edits
    return None, max_edits


def splice_tokens(wrong_tokens: torch.Tensor, edited_tokens: torch.Tensor, wrong_image: np.ndarray,
                  edited_image: np.ndarray, halo: int = 1, changed: float = 8.0) -> torch.Tensor:
    """The wrong image's codes with those of the edited cells replaced by the edited
    image's: a cell (one code's ``image_size / g`` px square) counts as edited when any of
    its pixels moved more than ``changed`` sRGB units in a channel, and so do cells within
    ``halo`` cells of one (the tokenizer's receptive field). The image tokenizer is not
    idempotent (decoding then encoding keeps about two thirds of a generated image's codes
    here), so encoding the whole edited image would change codes the edit never touched.

    Args:
        wrong_tokens, edited_tokens: long ``(g, g)``.
        wrong_image, edited_image: uint8 ``(H, W, 3)``, ``H`` a multiple of ``g``.
    Returns:
        long ``(g, g)``.
    """
    g = wrong_tokens.shape[-1]
    cell = wrong_image.shape[0] // g
    diff = np.abs(edited_image.astype(np.int16) - wrong_image.astype(np.int16)).max(-1) > changed
    cells = diff.reshape(g, cell, g, cell).any(axis=(1, 3))
    if halo:
        cells = ndimage.binary_dilation(cells, structure=np.ones((3, 3), bool), iterations=halo)
    return torch.where(torch.from_numpy(cells), edited_tokens, wrong_tokens)

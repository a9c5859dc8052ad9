"""Scene renderer of the GenEval-Shapes world (DESIGN section 3).

A scene is a ``size x size`` RGB image (uint8 sRGB) on the plain
:data:`~cotgen.world.vocab.BACKGROUND_RGB` background with a few shapes of the eight
:data:`~cotgen.world.vocab.SHAPES` classes, each in one of GenEval's ten colours
(:data:`~cotgen.world.vocab.COLOR_RGB` plus a small per-object jitter). Shapes are
polygons drawn at 4x supersampling and box-filtered down (anti-aliased edges), with a
varied size (bounding side 14-26 px at 64 px, down to 12 px with five or more objects), a
varied position and a slight rotation (+-12 degrees, small enough that a square never
looks like a diamond). Objects never overlap: their boxes keep :data:`BOX_GAP` pixels
apart, so every object stays a separate blob even after a blocky, blurry degradation.

Three kinds of image are made from a GenEval metadata line:

* :func:`render_scene`: the ground truth, satisfying the line *by GenEval's rules*
  (checked with :func:`cotgen.geneval.rules.evaluate` on detections built from the
  drawn boxes; positions with a safety margin of :data:`POSITION_MARGIN` pixels).
* :func:`render_near_miss`: a scene that breaks exactly one requirement
  (:func:`near_miss_kinds` lists which apply).
* :func:`degrade`: the blur, noise, colour jitter and block quantisation a small
  autoregressive generator produces.

Boxes are ``(x1, y1, x2, y2)`` in pixels, y down, end-exclusive: the object covers
pixels ``x1 <= x < x2``, ``y1 <= y < y2`` (those with anti-aliased coverage >=
:data:`BOX_ALPHA`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from cotgen.geneval.rules import Detection, evaluate, relative_position
from cotgen.world.vocab import BACKGROUND_RGB, COLOR_RGB, COLORS, IMAGE_SIZE, RELATIONS, SHAPES

#: Supersampling factor of the polygon rasteriser.
SUPERSAMPLE = 4
#: Coverage (0-1) from which a pixel counts as part of an object's box.
BOX_ALPHA = 0.25
#: Minimum gap in pixels between two objects' boxes (along x or y), at 64 px.
BOX_GAP = 6
#: Minimum gap in pixels between an object's box and the image border, at 64 px.
BORDER = 2
#: A required relation must still hold (a broken one still fail) when one box moves
#: this many pixels along x and/or y, so small detector box errors cannot flip it.
POSITION_MARGIN = 2.0
#: Largest rotation jitter, degrees.
MAX_ROTATION = 12.0
#: Largest per-channel colour jitter, sRGB units.
COLOR_JITTER = 10
#: Bounding side range (px, at 64 px) by the number of objects in the scene.
SIZE_RANGE: dict[int, tuple[float, float]] = {
    1: (14.0, 26.0),
    2: (14.0, 26.0),
    3: (14.0, 23.0),
    4: (14.0, 21.0),
    5: (12.0, 17.0),
    6: (12.0, 15.0),
}
MAX_OBJECTS = max(SIZE_RANGE)
#: Placement tries per object, and whole-scene restarts, before giving up.
PLACEMENT_TRIES = 60
SCENE_RESTARTS = 60

DEGRADATIONS: tuple[str, ...] = ("jitter", "blocks", "blur", "noise")
NEAR_MISS_KINDS: tuple[str, ...] = ("count", "color", "position", "missing")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


# --------------------------------------------------------------------------- shapes
def _circle(n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _crescent(d: float = 0.55, r: float = 0.8, n: int = 40) -> np.ndarray:
    """Unit disc minus a disc of radius ``r`` centred ``d`` to the right."""
    xi = (d * d + 1 - r * r) / (2 * d)
    t0 = math.atan2(math.sqrt(1 - xi * xi), xi)  # intersection angle on the outer circle
    outer = np.linspace(t0, 2 * np.pi - t0, n)
    p_outer = np.stack([np.cos(outer), np.sin(outer)], axis=1)
    s0 = math.atan2(math.sqrt(1 - xi * xi), xi - d)  # same points seen from the inner centre
    inner = np.linspace(2 * np.pi - s0, s0, n)
    p_inner = np.stack([d + r * np.cos(inner), r * np.sin(inner)], axis=1)
    return np.concatenate([p_outer, p_inner[1:-1]])


def _star(points: int = 5, inner: float = 0.48) -> np.ndarray:
    t = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    rad = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([rad * np.cos(t), rad * np.sin(t)], axis=1)


def _heart(n: int = 60) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y], axis=1) / 16.0


def _cross(w: float = 0.36) -> np.ndarray:
    return np.array(
        [
            (-w, -1),
            (w, -1),
            (w, -w),
            (1, -w),
            (1, w),
            (w, w),
            (w, 1),
            (-w, 1),
            (-w, w),
            (-1, w),
            (-1, -w),
            (-w, -w),
        ],
        dtype=np.float64,
    )


#: Each class's outline in unit coordinates (y down), before rotation and scaling.
OUTLINES: dict[str, np.ndarray] = {
    "circle": _circle(),
    "square": np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=np.float64),
    "triangle": np.array([(0, -1), (math.sqrt(3) / 2, 0.5), (-math.sqrt(3) / 2, 0.5)], dtype=np.float64),
    "diamond": np.array([(0, -1), (0.62, 0), (0, 1), (-0.62, 0)], dtype=np.float64),
    "star": _star(),
    "cross": _cross(),
    "heart": _heart(),
    "crescent": _crescent(),
}
assert set(OUTLINES) == set(SHAPES)


def shape_polygon(shape: str, side: float, rotation: float = 0.0) -> np.ndarray:
    """The outline of ``shape`` rotated by ``rotation`` degrees (clockwise on screen)
    and scaled so that its bounding box's longer side is ``side`` pixels, centred on
    its bounding box at (0, 0). Returns float64 ``(K, 2)`` (x, y) points.

    Raises:
        ValueError: unknown shape or ``side <= 0``.
    """
    if shape not in OUTLINES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    if not side > 0:
        raise ValueError(f"side must be > 0 pixels, got {side}")
    pts = OUTLINES[shape]
    a = math.radians(rotation)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    pts = pts @ rot.T
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    pts = pts - (lo + hi) / 2
    return pts * (side / float((hi - lo).max()))


def rasterize(
    polygons: Sequence[np.ndarray], height: int, width: int, holes: Sequence[np.ndarray] = ()
) -> np.ndarray:
    """Anti-aliased coverage of the union of ``polygons`` minus ``holes`` (pixel
    coordinates, continuous, pixel ``(i, j)`` spans ``[j, j+1) x [i, i+1)``).

    Returns float32 ``(height, width)`` coverage in [0, 1] (4x4 supersampling)."""
    s = SUPERSAMPLE
    canvas = Image.new("L", (width * s, height * s), 0)
    draw = ImageDraw.Draw(canvas)
    for fill, polys in ((255, polygons), (0, holes)):
        for poly in polys:
            draw.polygon([(float(x) * s - 0.5, float(y) * s - 0.5) for x, y in poly], fill=fill)
    arr = np.asarray(canvas, dtype=np.float32).reshape(height, s, width, s)
    return arr.mean(axis=(1, 3)) / 255.0


@dataclass
class _Patch:
    """One object's coverage on a small canvas, and its tight box on that canvas."""

    alpha: np.ndarray  # float32 (h, w)
    box: tuple[int, int, int, int]  # end-exclusive, patch coordinates


@dataclass(frozen=True)
class RenderStyle:
    """How freely objects are drawn.

    Attributes:
        rotation: largest rotation jitter, degrees.
        color_jitter: largest per-channel colour jitter, sRGB units.
        sizes: bounding sides to choose from (px at 64 px); ``None`` = uniform in
            :data:`SIZE_RANGE`. Sides outside the scene's range are not used.
        snap: align every object's box corner to this pixel grid (0 = free placement,
            with sub-pixel jitter).
    """

    rotation: float = MAX_ROTATION
    color_jitter: int = COLOR_JITTER
    sizes: tuple[float, ...] | None = None
    snap: int = 0


#: The world's scenes (evaluation renders, detector and tokenizer training).
VARIED = RenderStyle()
#: Sprite-like scenes: no rotation or colour jitter, sides 12-24 px in steps of 4, boxes
#: on the 4-px token grid. The generator is trained on these, so that a ~1M-parameter AR
#: model learns them on a CPU in minutes (the testbed's design, README).
CANONICAL = RenderStyle(rotation=0.0, color_jitter=0, sizes=(12.0, 16.0, 20.0, 24.0), snap=4)
STYLES = {"varied": VARIED, "canonical": CANONICAL}


def _draw_patch(shape: str, side: float, rotation: float, rng: np.random.Generator, subpixel: bool = True) -> _Patch:
    pad = 2
    n = math.ceil(side) + 2 * pad
    center = n / 2 + (rng.uniform(-0.5, 0.5, size=2) if subpixel else 0.0)  # sub-pixel placement
    alpha = rasterize([shape_polygon(shape, side, rotation) + center], n, n)
    return _Patch(alpha, _alpha_box(alpha))


def _alpha_box(alpha: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(alpha >= BOX_ALPHA)
    if len(xs) == 0:
        return (0, 0, 0, 0)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def jitter_color(color: str, rng: np.random.Generator, amount: int = COLOR_JITTER) -> tuple[int, int, int]:
    """``COLOR_RGB[color]`` plus uniform per-channel jitter in ``[-amount, amount]``,
    clipped to 0-255. Raises ValueError for an unknown colour."""
    if color not in COLOR_RGB:
        raise ValueError(f"unknown colour {color!r}; known: {', '.join(COLORS)}")
    base = np.asarray(COLOR_RGB[color], dtype=np.int64)
    return tuple(int(v) for v in np.clip(base + rng.integers(-amount, amount, size=3, endpoint=True), 0, 255))


def composite(canvas: np.ndarray, alpha: np.ndarray, rgb: Sequence[float], x: int, y: int) -> None:
    """Paint ``rgb`` with coverage ``alpha`` (float ``(h, w)``) onto float ``canvas``
    ``(H, W, 3)`` at top-left ``(x, y)``, in place; parts outside the canvas are cut."""
    h, w = alpha.shape
    H, W = canvas.shape[:2]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
    if x1 <= x0 or y1 <= y0:
        return
    a = alpha[y0 - y : y1 - y, x0 - x : x1 - x, None]
    region = canvas[y0:y1, x0:x1]
    region *= 1 - a
    region += a * np.asarray(rgb, dtype=np.float32)


# --------------------------------------------------------------------------- scenes
@dataclass
class _ObjectSpec:
    shape: str
    color: str
    group: int | None  # index of the include it belongs to (None for distractors)


@dataclass
class _Relation:
    group: int  # every object of this group ...
    rel: str  # ... stands (or, with holds=False, does not stand) in this relation ...
    target: int  # ... to every object of this group
    holds: bool = True


def _relation_ok(
    box_a: Sequence[float], box_b: Sequence[float], rel: str, holds: bool, margin: float
) -> bool:
    """``rel in relative_position(a, b)`` equals ``holds`` for A moved by 0 or
    +-margin along x and y (9 cases), so that small box errors cannot flip it."""
    for dx in (-margin, 0.0, margin):
        for dy in (-margin, 0.0, margin):
            moved = (box_a[0] + dx, box_a[1] + dy, box_a[2] + dx, box_a[3] + dy)
            if (rel in relative_position(moved, box_b)) != holds:
                return False
    return True


def _gap_ok(box: Sequence[int], others: Sequence[Sequence[int]], gap: int) -> bool:
    for o in others:
        if not (box[2] + gap <= o[0] or o[2] + gap <= box[0] or box[3] + gap <= o[1] or o[3] + gap <= box[1]):
            return False
    return True


def _side(lo: float, hi: float, style: RenderStyle, rng: np.random.Generator) -> float:
    if style.sizes is None:
        return rng.uniform(lo, hi)
    fits = [s for s in style.sizes if lo - 2 <= s <= hi] or [lo]
    return float(fits[int(rng.integers(len(fits)))])


def _place(
    specs: Sequence[_ObjectSpec],
    relations: Sequence[_Relation],
    rng: np.random.Generator,
    size: int,
    style: RenderStyle = VARIED,
) -> tuple[np.ndarray, list[dict]]:
    """Draw ``specs`` at random non-overlapping places that satisfy ``relations``.

    Objects are placed group by group in spec order; a relation is checked as soon as
    both of its groups are placed (the target group must come first). Bounded retries;
    raises ValueError when no placement is found."""
    n = len(specs)
    if n == 0:
        raise ValueError("a scene needs at least one object")
    if n > MAX_OBJECTS:
        raise ValueError(f"at most {MAX_OBJECTS} objects fit in a scene, got {n}")
    scale = size / IMAGE_SIZE
    lo, hi = SIZE_RANGE[n]
    gap, border = max(1, round(BOX_GAP * scale)), max(1, round(BORDER * scale))
    margin = POSITION_MARGIN * scale
    for _ in range(SCENE_RESTARTS):
        patches = [
            _draw_patch(
                s.shape,
                _side(lo, hi, style, rng) * scale,
                rng.uniform(-style.rotation, style.rotation) if style.rotation else 0.0,
                rng,
                subpixel=not style.snap,
            )
            for s in specs
        ]
        boxes: list[tuple[int, int, int, int]] = []
        offsets: list[tuple[int, int]] = []
        for i, (spec, patch) in enumerate(zip(specs, patches)):
            bx0, by0, bx1, by1 = patch.box
            xs = (border - bx0, size - border - bx1)
            ys = (border - by0, size - border - by1)
            if xs[1] < xs[0] or ys[1] < ys[0]:
                break
            checks = [r for r in relations if r.group == spec.group]
            for _ in range(PLACEMENT_TRIES):
                ox = int(rng.integers(xs[0], xs[1], endpoint=True))
                oy = int(rng.integers(ys[0], ys[1], endpoint=True))
                if style.snap:
                    ox = _snap(bx0 + ox, style.snap, xs[0] + bx0, xs[1] + bx0) - bx0
                    oy = _snap(by0 + oy, style.snap, ys[0] + by0, ys[1] + by0) - by0
                box = (bx0 + ox, by0 + oy, bx1 + ox, by1 + oy)
                if not _gap_ok(box, boxes, gap):
                    continue
                if all(
                    _relation_ok(box, boxes[k], r.rel, r.holds, margin)
                    for r in checks
                    for k in range(i)
                    if specs[k].group == r.target
                ):
                    break
            else:
                break
            boxes.append(box)
            offsets.append((ox, oy))
        else:
            canvas = np.empty((size, size, 3), dtype=np.float32)
            canvas[:] = BACKGROUND_RGB
            objects = []
            for spec, patch, (ox, oy), box in zip(specs, patches, offsets, boxes):
                composite(canvas, patch.alpha, jitter_color(spec.color, rng, style.color_jitter), ox, oy)
                objects.append({"class": spec.shape, "color": spec.color, "box": box, "include": spec.group})
            return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), objects
    raise ValueError(
        f"could not place {n} objects ({', '.join(s.shape for s in specs)}) with the required relations "
        f"after {SCENE_RESTARTS} tries"
    )


def check_metadata(metadata: Mapping) -> None:
    """Raise ValueError naming the problem unless ``metadata`` is a GenEval line the
    renderer can draw: known classes and colours, counts >= 1, at most
    :data:`MAX_OBJECTS` objects in all, no class in two includes, positions
    ``[relation, earlier include index]``, excludes that the includes do not break."""
    if not isinstance(metadata, Mapping):  # ValueError like every other bad-metadata case
        raise ValueError(f"metadata must be a mapping, got {type(metadata).__name__}")  # noqa: TRY004
    includes = metadata.get("include")
    if not isinstance(includes, Sequence) or not includes:
        raise ValueError("metadata needs a non-empty 'include' list")
    seen: set[str] = set()
    total = 0
    for i, req in enumerate(includes):
        cls = req.get("class")
        if cls not in SHAPES:
            raise ValueError(f"include {i}: unknown class {cls!r}; the shapes world has {', '.join(SHAPES)}")
        if cls in seen:
            raise ValueError(
                f"include {i}: class {cls!r} appears in two includes; the renderer cannot draw that"
            )
        seen.add(cls)
        count = req.get("count")
        if not isinstance(count, (int, np.integer)) or count < 1:
            raise ValueError(f"include {i}: count must be an integer >= 1, got {count!r}")
        total += int(count)
        if "color" in req and req["color"] not in COLORS:
            raise ValueError(f"include {i}: unknown colour {req['color']!r}; known: {', '.join(COLORS)}")
        if "position" in req:
            pos = req["position"]
            if (
                not isinstance(pos, Sequence)
                or len(pos) != 2
                or pos[0] not in RELATIONS
                or not isinstance(pos[1], (int, np.integer))
                or not 0 <= pos[1] < i
            ):
                raise ValueError(
                    f"include {i}: position must be [relation, earlier include index], got {pos!r}"
                )
    if total > MAX_OBJECTS:
        raise ValueError(f"metadata asks for {total} objects; at most {MAX_OBJECTS} fit in a scene")
    for req in metadata.get("exclude", []) or []:
        cls = req.get("class")
        if cls not in SHAPES:
            raise ValueError(f"exclude: unknown class {cls!r}; the shapes world has {', '.join(SHAPES)}")
        drawn = sum(int(r["count"]) for r in includes if r["class"] == cls)
        if drawn >= req.get("count", 0):
            raise ValueError(
                f"exclude {cls}<{req.get('count')} contradicts the includes, which ask for {drawn}"
            )


def _specs(
    metadata: Mapping, rng: np.random.Generator, counts: Sequence[int] | None = None
) -> list[_ObjectSpec]:
    specs = []
    for g, req in enumerate(metadata["include"]):
        n = req["count"] if counts is None else counts[g]
        for _ in range(n):
            color = req.get("color") or COLORS[int(rng.integers(len(COLORS)))]
            specs.append(_ObjectSpec(req["class"], color, g))
    return specs


def _relations(metadata: Mapping) -> list[_Relation]:
    return [
        _Relation(g, req["position"][0], int(req["position"][1]))
        for g, req in enumerate(metadata["include"])
        if "position" in req
    ]


def objects_to_detections(objects: Sequence[Mapping]) -> dict[str, list[Detection]]:
    """Ground-truth GenEval detections of placed objects (score 1, colour as drawn),
    class name -> detections in drawing order."""
    out: dict[str, list[Detection]] = {}
    for o in objects:
        out.setdefault(o["class"], []).append(Detection(box=o["box"], score=1.0, color=o["color"]))
    return out


def _snap(v: int, grid: int, lo: int, hi: int) -> int:
    """``v`` rounded to the nearest multiple of ``grid`` inside ``[lo, hi]`` (else ``v``)."""
    options = [m for m in range(-(-lo // grid) * grid, hi + 1, grid)]
    return min(options, key=lambda m: abs(m - v)) if options else v


def _to_image(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(arr, mode="RGB")


def render_scene(
    metadata: Mapping, rng: np.random.Generator, size: int = IMAGE_SIZE, style: RenderStyle = VARIED
) -> tuple[Image.Image, list[dict]]:
    """Draw a scene that satisfies a GenEval metadata line by GenEval's rules.

    Every include gets ``count`` objects of its class, in its colour if given, else a
    random colour per object; with ``position: [rel, j]`` every object of the include
    stands in ``rel`` to every object of include ``j`` by
    :func:`cotgen.geneval.rules.relative_position`, with a :data:`POSITION_MARGIN` px
    safety margin; nothing else is drawn (so excludes hold).

    Args:
        metadata: one GenEval metadata line (``include``, optional ``exclude``).
        rng: NumPy generator; the scene is a deterministic function of its state.
        size: image side in pixels (sizes and gaps scale with ``size / 64``).
        style: :data:`VARIED` (the world's scenes) or :data:`CANONICAL` (sprites).
    Returns:
        ``(image, objects)``: an RGB PIL image ``size x size`` and one dict per drawn
        object: ``class`` (str), ``color`` (str), ``box`` (``(x1, y1, x2, y2)`` int
        pixels, end-exclusive), ``include`` (index of its include).
    Raises:
        ValueError: the line cannot be drawn (see :func:`check_metadata`), or no
            placement satisfying it was found within the bounded retries.
    """
    check_metadata(metadata)
    for _ in range(5):
        arr, objects = _place(_specs(metadata, rng), _relations(metadata), rng, size, style)
        ok, reason = evaluate(objects_to_detections(objects), metadata)
        if ok:
            return _to_image(arr), objects
    raise ValueError(f"rendered scenes keep failing the metadata ({reason}); metadata: {dict(metadata)}")


# ----------------------------------------------------------------------- near misses
def near_miss_kinds(metadata: Mapping) -> list[str]:
    """The near-miss kinds that apply to a metadata line, in :data:`NEAR_MISS_KINDS`
    order: ``"count"`` for counting lines (or any include with count > 1),
    ``"color"`` when an include has a colour, ``"position"`` when one has a position,
    ``"missing"`` for every tag but counting."""
    includes = metadata.get("include", [])
    kinds = []
    if metadata.get("tag") == "counting" or any(r.get("count", 1) > 1 for r in includes):
        kinds.append("count")
    if any("color" in r for r in includes):
        kinds.append("color")
    if any("position" in r for r in includes):
        kinds.append("position")
    if metadata.get("tag") != "counting":
        kinds.append("missing")
    return kinds


def render_near_miss(
    metadata: Mapping, rng: np.random.Generator, kind: str, size: int = IMAGE_SIZE, style: RenderStyle = VARIED
) -> tuple[Image.Image, list[dict]]:
    """Draw a scene that breaks exactly one requirement of a metadata line.

    Kinds:
        ``"count"``: one include with count N >= 2 gets N-1 or N+1 objects.
        ``"color"``: one object of a coloured include gets another colour.
        ``"position"``: one positioned include does *not* stand in its relation to its
            target (half the time it stands in the opposite relation, otherwise
            anywhere the relation fails), with the :data:`POSITION_MARGIN` margin.
        ``"missing"``: one include's objects are left out; when the line has a single
            include, a distractor of another class (same colour, if coloured) is drawn
            instead so that the image is not empty.

    The result is checked to fail :func:`cotgen.geneval.rules.evaluate` on ground-truth
    detections. Arguments (``style`` included) and return value as :func:`render_scene`;
    distractor objects have ``include`` None.

    Raises:
        ValueError: ``kind`` is unknown or does not apply to the line
            (see :func:`near_miss_kinds`), or the line cannot be drawn.
    """
    check_metadata(metadata)
    if kind not in NEAR_MISS_KINDS:
        raise ValueError(f"unknown near-miss kind {kind!r}; known: {', '.join(NEAR_MISS_KINDS)}")
    if kind not in near_miss_kinds(metadata):
        raise ValueError(
            f"near-miss kind {kind!r} does not apply to a {metadata.get('tag')} line; "
            f"applicable: {', '.join(near_miss_kinds(metadata))}"
        )
    includes = list(metadata["include"])
    for _ in range(5):
        specs = _specs(metadata, rng)
        relations = _relations(metadata)
        if kind == "count":
            candidates = [g for g, r in enumerate(includes) if r["count"] > 1]
            g = candidates[int(rng.integers(len(candidates)))]
            n = includes[g]["count"] + (1 if rng.random() < 0.5 else -1)
            counts = [r["count"] for r in includes]
            counts[g] = n
            specs = _specs(metadata, rng, counts)
            if len(specs) > MAX_OBJECTS:  # cannot add one more: remove one instead
                counts[g] = includes[g]["count"] - 1
                specs = _specs(metadata, rng, counts)
        elif kind == "color":
            coloured = [i for i, s in enumerate(specs) if "color" in includes[s.group]]
            i = coloured[int(rng.integers(len(coloured)))]
            others = [c for c in COLORS if c != specs[i].color]
            specs[i].color = others[int(rng.integers(len(others)))]
        elif kind == "position":
            positioned = [g for g, r in enumerate(includes) if "position" in r]
            g = positioned[int(rng.integers(len(positioned)))]
            for r in relations:
                if r.group == g:
                    if rng.random() < 0.5:
                        r.rel = OPPOSITE[r.rel]
                    else:
                        r.holds = False
        else:  # missing
            g = int(rng.integers(len(includes)))
            if len(includes) == 1:
                req = includes[0]
                others = [s for s in SHAPES if s != req["class"]]
                color = req.get("color") or COLORS[int(rng.integers(len(COLORS)))]
                specs = [_ObjectSpec(others[int(rng.integers(len(others)))], color, None)]
            else:
                specs = [s for s in specs if s.group != g]
            relations = [r for r in relations if g not in (r.group, r.target)]
        arr, objects = _place(specs, relations, rng, size, style)
        ok, _ = evaluate(objects_to_detections(objects), metadata)
        if not ok:
            return _to_image(arr), objects
    raise ValueError(f"could not draw a {kind!r} near miss of {dict(metadata)}")


# ----------------------------------------------------------------------- degradation
def _blur(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.6, 1.0))))


def _noise(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    arr = np.asarray(img, dtype=np.float32)
    arr = arr + rng.normal(0.0, rng.uniform(8.0, 12.0), size=arr.shape)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="RGB")


def _jitter(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.9, 1.1)))
    img = ImageEnhance.Contrast(img).enhance(float(rng.uniform(0.9, 1.1)))
    img = ImageEnhance.Color(img).enhance(float(rng.uniform(0.9, 1.1)))
    hsv = np.asarray(img.convert("HSV")).copy()
    shift = round(rng.uniform(-0.02, 0.02) * 256)
    hsv[..., 0] = (hsv[..., 0].astype(np.int64) + shift) % 256
    return Image.fromarray(hsv, mode="HSV").convert("RGB")


def _blocks(img: Image.Image, rng: np.random.Generator, block: int = 4) -> Image.Image:
    w, h = img.size
    small = img.resize((max(1, w // block), max(1, h // block)), Image.Resampling.BOX)
    return small.resize((w, h), Image.Resampling.NEAREST)


_DEGRADERS = {"jitter": _jitter, "blocks": _blocks, "blur": _blur, "noise": _noise}


def random_degradation(rng: np.random.Generator) -> str:
    """A random non-empty combination of the four degradations, joined with ``"+"`` in
    the canonical order jitter, blocks, blur, noise (15 combos, ``"all"`` for all four,
    equally likely)."""
    while True:
        pick = [k for k in DEGRADATIONS if rng.random() < 0.5]
        if pick:
            return "all" if len(pick) == len(DEGRADATIONS) else "+".join(pick)


def degrade(image: Image.Image, rng: np.random.Generator, kind: str = "all") -> Image.Image:
    """Degrade an image the way a small, blurry, blocky AR generator would.

    Kinds: ``"blur"`` (Gaussian, radius 0.6-1.0 px), ``"noise"`` (Gaussian pixel noise,
    sigma 8-12 sRGB units), ``"jitter"`` (brightness, contrast, saturation x0.9-1.1;
    hue +-0.02 turn), ``"blocks"`` (average each 4x4 block: downsample 4x with a box
    filter, upsample nearest); ``"all"``: jitter, blocks, blur, noise in that order;
    ``"random"``: one of the four at random; or several joined with ``"+"``
    (``"blocks+noise"``), applied left to right.

    Args:
        image: a PIL image (converted to RGB).
        rng: NumPy generator drawing the strengths.
    Returns:
        A new RGB image of the same size.
    Raises:
        ValueError: unknown kind.
    """
    if kind == "all":
        steps = list(DEGRADATIONS)
    elif kind == "random":
        steps = [DEGRADATIONS[int(rng.integers(len(DEGRADATIONS)))]]
    else:
        steps = kind.split("+")
        bad = [s for s in steps if s not in _DEGRADERS]
        if bad:
            raise ValueError(
                f"unknown degradation {kind!r}; use one of {', '.join(DEGRADATIONS)}, 'all', 'random' "
                "or several joined with '+'"
            )
    img = image.convert("RGB")
    for step in steps:
        img = _DEGRADERS[step](img, rng)
    return img

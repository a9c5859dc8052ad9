"""GenEval detector of the GenEval-Shapes world (DESIGN sections 2-4).

:class:`ShapesDetector` implements :class:`cotgen.geneval.detector.Detector` for the
eight shapes in two stages:

1. **Segmentation** (no learning): the background colour is the median of the image
   border; the colour distance of a lightly smoothed image to it gives a foreground
   map, thresholded both absolutely (``fg_threshold`` sRGB units) and relative to the
   local peak contrast (``fg_relative`` x the 7x7 maximum, i.e. roughly "at least 40%
   covered"; this also cuts the faint bridges blur draws between close objects).
   Holes are filled; components are 4-connected after a 3x3 closing (so pieces at most
   2 px apart, e.g. an edge row that 4x4 blocks split off, stay one object), and
   components under ``min_area`` pixels are dropped.
2. **Classification**: each component is cut out by its (1-px dilated) mask onto grey
   #999 (GenEval's colour semantics), cropped to its square-padded box and resampled
   to ``crop_size`` x ``crop_size`` with two more channels (the mask, and the contrast
   relative to the component's peak). A small CNN (:class:`ShapesNet`, ~83k
   parameters) gives a softmax over the eight shapes plus ``"junk"`` (blobs,
   fragments, merged or cut-off shapes) and a softmax over GenEval's ten colours.

Scores follow GenEval's Mask2Former: ``score(c) = P(c) x mask quality``, where mask
quality is the mean foreground confidence ``min(1, distance / quality_full)``
inside the mask (1 for any clearly coloured blob, low for faint smudges). Each
component is reported under every class with ``P(c) > emit_threshold`` (one object can
appear under several classes); its colour is the arg-max colour.

Images must be ``image_size`` pixels square (64 by default): a detector trained on
64-px scenes would silently misjudge resized images, so other sizes raise ValueError
instead of being resized.

Training (:func:`train_shapes_detector`, ``python -m cotgen.world.detector --out DIR``)
uses only synthetic scenes from :mod:`cotgen.world.render`, passed through the same
segmentation, with heavy augmentation (every combination of the renderer's
degradations, background tints, wider size and rotation ranges) and junk objects.
Checkpoints are Hugging Face style: ``config.json`` + ``model.safetensors``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from scipy import ndimage
from torch import nn

from cotgen.geneval.rules import Detection
from cotgen.world import render
from cotgen.world.vocab import BACKGROUND_RGB, COLORS, IMAGE_SIZE, SHAPES

JUNK = "junk"
MODEL_TYPE = "cotgen-shapes-detector"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
#: GenEval's cut-out grey (#999), sRGB units.
CUTOUT_GREY = 153.0
IN_CHANNELS = 5


@dataclass
class DetectorConfig:
    """Everything a :class:`ShapesDetector` needs besides its weights (``config.json``).

    Attributes:
        image_size: side of accepted images, pixels.
        crop_size: side of the classifier input, pixels.
        classnames: shape classes, in classifier order (junk is an extra last class).
        colors: colour names, in classifier order.
        widths: channels of the three CNN stages.
        smooth_sigma: Gaussian sigma (px) applied before the colour distance.
        fg_threshold: minimum colour distance to the background (Euclidean, sRGB units).
        fg_relative: minimum share of the 7x7 local peak distance for foreground.
        min_area: components smaller than this many pixels are dropped.
        quality_full: colour distance at which a pixel's foreground confidence reaches 1
            (confidence = min(1, distance / quality_full); mask quality is its mean).
        emit_threshold: a component is reported under class c when P(c) exceeds this.
    """

    image_size: int = IMAGE_SIZE
    crop_size: int = 32
    classnames: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = COLORS
    widths: tuple[int, int, int] = (16, 32, 64)
    smooth_sigma: float = 0.8
    fg_threshold: float = 24.0
    fg_relative: float = 0.4
    min_area: int = 10
    quality_full: float = 36.0
    emit_threshold: float = 0.05

    def to_dict(self) -> dict:
        fields = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        return {"model_type": MODEL_TYPE, **fields}

    @classmethod
    def from_dict(cls, data: dict) -> DetectorConfig:
        if data.get("model_type") != MODEL_TYPE:
            raise ValueError(f"config model_type is {data.get('model_type')!r}, expected {MODEL_TYPE!r}")
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        return cls(**kwargs)


# ------------------------------------------------------------------- segmentation
@dataclass
class Component:
    """One foreground blob of an image.

    Attributes:
        mask: bool ``(H, W)``, the blob's pixels.
        box: ``(x1, y1, x2, y2)`` end-exclusive pixel box of ``mask``.
        quality: mean foreground confidence inside the mask, [0, 1].
    """

    mask: np.ndarray = field(repr=False)
    box: tuple[int, int, int, int]
    quality: float


def to_rgb_array(image: Image.Image | np.ndarray, size: int | None = None) -> np.ndarray:
    """An image as a uint8 ``(H, W, 3)`` array.

    Accepts a PIL image of any mode PIL can convert to RGB (RGBA: alpha dropped; L, P, ...) or a uint8
    array ``(H, W, 3)``. With ``size``, the image must be ``size x size``.

    Raises:
        ValueError: anything else, naming the problem (expected vs got for sizes).
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"array images must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
        arr = image
    elif isinstance(image, Image.Image):
        try:
            arr = np.asarray(image.convert("RGB"))
        except Exception as exc:  # PIL raises several types for odd modes
            raise ValueError(f"cannot convert image of mode {image.mode!r} to RGB: {exc}") from exc
    else:  # ValueError, not TypeError: the Detector protocol raises ValueError for every bad input
        raise ValueError(  # noqa: TRY004
            f"expected a PIL image or a uint8 (H, W, 3) array, got {type(image).__name__}"
        )
    if size is not None and arr.shape[:2] != (size, size):
        raise ValueError(
            f"expected a {size}x{size} image, got {arr.shape[1]}x{arr.shape[0]} (width x height); "
            "this detector does not resize"
        )
    return arr


def background_color(rgb: np.ndarray, ring: int = 2) -> np.ndarray:
    """Median colour of the outer ``ring`` pixels of a ``(H, W, 3)`` image, float32 (3,)."""
    border = np.concatenate(
        [
            rgb[:ring].reshape(-1, 3),
            rgb[-ring:].reshape(-1, 3),
            rgb[:, :ring].reshape(-1, 3),
            rgb[:, -ring:].reshape(-1, 3),
        ]
    )
    return np.median(border.astype(np.float32), axis=0)


def foreground_distance(rgb: np.ndarray, config: DetectorConfig) -> np.ndarray:
    """Colour distance (sRGB units, float32 ``(H, W)``) of the smoothed image to its
    border-median background."""
    img = rgb.astype(np.float32)
    smooth = ndimage.gaussian_filter(img, sigma=(config.smooth_sigma, config.smooth_sigma, 0), mode="nearest")
    return np.linalg.norm(smooth - background_color(rgb), axis=-1)


def segment(rgb: np.ndarray, config: DetectorConfig) -> tuple[list[Component], np.ndarray]:
    """Foreground components of a uint8 ``(H, W, 3)`` image, in raster order of their
    first pixel, and the distance map (float32 ``(H, W)``) they came from."""
    dist = foreground_distance(rgb, config)
    local_peak = ndimage.maximum_filter(dist, size=7, mode="nearest")
    fg = (dist > config.fg_threshold) & (dist > config.fg_relative * local_peak)
    fg = ndimage.binary_fill_holes(fg)
    # blocks can split an object's edge row off its body: pieces at most 2 px apart
    # share a label (found on the closed mask), but keep their own pixels
    labels, _ = ndimage.label(ndimage.binary_closing(fg, structure=np.ones((3, 3), bool), border_value=0))
    labels[~fg] = 0
    conf = np.clip(dist / config.quality_full, 0.0, 1.0)
    comps = []
    for idx, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        mask = labels == idx
        area = int(mask.sum())
        if area < config.min_area:
            continue
        box = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
        comps.append(Component(mask=mask, box=box, quality=float(conf[mask].mean())))
    return comps, dist


def crop_inputs(
    rgb: np.ndarray, dist: np.ndarray, comps: Sequence[Component], config: DetectorConfig
) -> torch.Tensor:
    """Classifier inputs of the components: float32 ``(N, 5, crop, crop)``.

    Channels: the cut-out (pixels of the 1-px dilated mask, #999 elsewhere) as
    ``(rgb - 153) / 64``; the mask; the distance relative to the component's 90th
    percentile distance, clipped to [0, 1.5], inside the dilated mask. The crop is the
    component's box padded to a square of side ``1.2 x max(w, h) + 4`` px around the
    box centre, resampled bilinearly; outside the image counts as #999 / 0."""
    if not comps:
        return torch.zeros((0, IN_CHANNELS, config.crop_size, config.crop_size))
    h, w = rgb.shape[:2]
    img = (rgb.astype(np.float32) - CUTOUT_GREY) / 64.0
    planes = np.zeros((len(comps), IN_CHANNELS, h, w), dtype=np.float32)
    theta = np.zeros((len(comps), 2, 3), dtype=np.float32)
    for i, c in enumerate(comps):
        region = ndimage.binary_dilation(c.mask)
        planes[i, :3] = np.where(region[None], img.transpose(2, 0, 1), 0.0)
        planes[i, 3] = c.mask
        peak = max(float(np.percentile(dist[c.mask], 90)), 1e-3)
        planes[i, 4] = np.where(region, np.clip(dist / peak, 0.0, 1.5), 0.0)
        x1, y1, x2, y2 = c.box
        side = 1.2 * max(x2 - x1, y2 - y1) + 4
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        theta[i] = [[side / w, 0, 2 * cx / w - 1], [0, side / h, 2 * cy / h - 1]]
    # sampling grid in grid_sample's normalised coordinates (align_corners=False)
    t = (np.arange(config.crop_size, dtype=np.float32) + 0.5) * (2.0 / config.crop_size) - 1.0
    gx = theta[:, 0, 0, None] * t[None] + theta[:, 0, 2, None]  # (N, S)
    gy = theta[:, 1, 1, None] * t[None] + theta[:, 1, 2, None]
    grid = np.stack(np.broadcast_arrays(gx[:, None, :], gy[:, :, None]), axis=-1)  # (N, S, S, 2)
    return F.grid_sample(
        torch.from_numpy(planes),
        torch.from_numpy(np.ascontiguousarray(grid)),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )


# --------------------------------------------------------------------------- model
def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ShapesNet(nn.Module):
    """Crop classifier: ``(N, 5, S, S)`` float32 -> (shape logits ``(N, n_shapes + 1)``
    with junk last, colour logits ``(N, n_colors)``). The colour head also sees the
    mask-weighted mean of the RGB channels."""

    def __init__(
        self, n_shapes: int = len(SHAPES), n_colors: int = len(COLORS), widths: Sequence[int] = (16, 32, 64)
    ):
        super().__init__()
        c1, c2, c3 = widths
        self.features = nn.Sequential(
            _conv(IN_CHANNELS, c1, 2),
            _conv(c1, c1),
            _conv(c1, c2, 2),
            _conv(c2, c2),
            _conv(c2, c3, 2),
            _conv(c3, c3),
        )
        self.shape_head = nn.Linear(2 * c3, n_shapes + 1)
        self.color_head = nn.Sequential(
            nn.Linear(2 * c3 + 3, 64), nn.ReLU(inplace=True), nn.Linear(64, n_colors)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        pooled = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)
        m = x[:, 3:4]
        mean_rgb = (x[:, :3] * m).sum(dim=(2, 3)) / m.sum(dim=(2, 3)).clamp_min(1e-3)
        return self.shape_head(pooled), self.color_head(torch.cat([pooled, mean_rgb], dim=1))


# ------------------------------------------------------------------------ detector
@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, then restore the old number."""
    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if before != n:
            torch.set_num_threads(before)


class ShapesDetector:
    """GenEval detector for the shapes world (see the module docstring).

    Args:
        config: detector settings; defaults to :class:`DetectorConfig`.
        model: a :class:`ShapesNet` matching ``config``; a fresh random one if None.
    """

    def __init__(self, config: DetectorConfig | None = None, model: ShapesNet | None = None):
        self.config = config or DetectorConfig()
        self.model = model or ShapesNet(
            len(self.config.classnames), len(self.config.colors), self.config.widths
        )
        self.model.eval()

    @property
    def classnames(self) -> tuple[str, ...]:
        return tuple(self.config.classnames)

    # -- inference -------------------------------------------------------------
    @torch.no_grad()
    def classify(self, crops: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Class and colour probabilities of classifier inputs ``(N, 5, S, S)``:
        float32 ``(N, n_classes + 1)`` (junk last) and ``(N, n_colors)``.

        Runs with one torch thread (restored afterwards): the crops are tiny, and
        OpenMP threads spinning on a busy machine make each call ~20x slower."""
        self.model.eval()
        if len(crops) == 0:
            n_classes, n_colors = len(self.classnames) + 1, len(self.config.colors)
            return np.zeros((0, n_classes), np.float32), np.zeros((0, n_colors), np.float32)
        with _torch_threads(1):
            shape_logits, color_logits = self.model(crops.float())
        return shape_logits.softmax(-1).numpy(), color_logits.softmax(-1).numpy()

    def detect(self, image: Image.Image | np.ndarray) -> dict[str, list[Detection]]:
        """Raw GenEval detections of one image.

        Args:
            image: ``image_size x image_size`` PIL image (any mode convertible to RGB)
                or uint8 ``(H, W, 3)`` array.
        Returns:
            Every class name -> detections (possibly empty), unthresholded, one per
            component whose ``P(class) > emit_threshold``: ``box`` end-exclusive pixels,
            ``score = P(class) x mask quality`` in [0, 1], ``color`` the arg-max colour,
            ``color_scores`` all ten, ``mask`` bool ``(H, W)``.
        Raises:
            ValueError: not an image, not convertible to RGB, or the wrong size.
        """
        return self.detect_batch([image])[0]

    def detect_batch(self, images: Sequence[Image.Image | np.ndarray]) -> list[dict[str, list[Detection]]]:
        """:meth:`detect` for several images with one classifier call (same results)."""
        arrays = [to_rgb_array(im, self.config.image_size) for im in images]
        per_image, crops = [], []
        for rgb in arrays:
            comps, dist = segment(rgb, self.config)
            per_image.append(comps)
            crops.append(crop_inputs(rgb, dist, comps, self.config))
        p_shape, p_color = self.classify(torch.cat(crops)) if crops else (None, None)
        out, k = [], 0
        for comps in per_image:
            dets: dict[str, list[Detection]] = {c: [] for c in self.classnames}
            for comp in comps:
                ps, pc = p_shape[k], p_color[k]
                k += 1
                color_scores = {c: float(p) for c, p in zip(self.config.colors, pc)}
                color = self.config.colors[int(pc.argmax())]
                for ci, name in enumerate(self.classnames):
                    if ps[ci] > self.config.emit_threshold:
                        dets[name].append(
                            Detection(
                                box=comp.box,
                                score=float(ps[ci]) * comp.quality,
                                color=color,
                                mask=comp.mask,
                                color_scores=color_scores,
                            )
                        )
            out.append(dets)
        return out

    # -- persistence -----------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        state = {k: v.detach().contiguous().clone() for k, v in self.model.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "model_type": MODEL_TYPE})
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> ShapesDetector:
        """Load a detector written by :meth:`save_pretrained` (safetensors, no pickle).

        Raises:
            FileNotFoundError: ``config.json`` or ``model.safetensors`` is missing.
            ValueError: the config is not a shapes-detector config, or the weights do
                not match it.
        """
        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(
                    f"{directory / name} not found; train one with "
                    f"`python -m cotgen.world.detector --out {directory}`"
                )
        config = DetectorConfig.from_dict(json.loads((directory / CONFIG_NAME).read_text()))
        model = ShapesNet(len(config.classnames), len(config.colors), config.widths)
        try:
            model.load_state_dict(load_file(str(directory / WEIGHTS_NAME)))
        except RuntimeError as exc:
            raise ValueError(f"weights in {directory} do not match its config: {exc}") from exc
        return cls(config, model)


# ------------------------------------------------------------------ training data
#: Training-scene object sizes (bounding side, px at 64) and rotations: a bit wider
#: than the renderer's so the classifier does not sit on the edge of its range.
TRAIN_SIZE = (11.0, 28.0)
TRAIN_ROTATION = 16.0
JUNK_KINDS = ("merged", "partial", "blob", "fragment")


@dataclass
class _Item:
    alpha: np.ndarray  # float32 (h, w) coverage patch
    colors: list[tuple[str, np.ndarray]]  # (name, coverage patch) per colour layer
    label: int  # shape index, or len(SHAPES) for junk


def _shape_patch(
    shape: str,
    side: float,
    rotation: float,
    rng: np.random.Generator,
    n: int | None = None,
    center: np.ndarray | None = None,
) -> np.ndarray:
    n = n or math.ceil(side) + 6
    if center is None:
        center = n / 2 + rng.uniform(-0.5, 0.5, size=2)
    return render.rasterize([render.shape_polygon(shape, side, rotation) + center], n, n)


def _junk_item(rng: np.random.Generator, junk: int) -> _Item:
    kind = JUNK_KINDS[int(rng.integers(len(JUNK_KINDS)))]
    color = COLORS[int(rng.integers(len(COLORS)))]
    if kind == "merged":  # two shapes overlapping or touching: one blob
        s1, s2 = rng.uniform(10, 20, size=2)
        n = int(s1 + s2) + 8
        c1 = np.array([n / 2, n / 2]) - rng.normal(0, 1, 2)
        ang = rng.uniform(0, 2 * np.pi)
        d = (s1 + s2) / 2 * rng.uniform(0.5, 0.9)
        c2 = c1 + d * np.array([math.cos(ang), math.sin(ang)])
        a1 = _shape_patch(SHAPES[int(rng.integers(len(SHAPES)))], s1, rng.uniform(-30, 30), rng, n, c1)
        a2 = _shape_patch(SHAPES[int(rng.integers(len(SHAPES)))], s2, rng.uniform(-30, 30), rng, n, c2)
        color2 = color if rng.random() < 0.5 else COLORS[int(rng.integers(len(COLORS)))]
        a1 = a1 * (1 - a2)
        return _Item(np.clip(a1 + a2, 0, 1), [(color, a1), (color2, a2)], junk)
    if kind == "partial":  # a shape with 30-60% cut off by a straight line
        side = rng.uniform(12, 26)
        alpha = _shape_patch(SHAPES[int(rng.integers(len(SHAPES)))], side, rng.uniform(-20, 20), rng)
        n = alpha.shape[0]
        ang = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:n, 0:n] + 0.5
        proj = (xx - n / 2) * math.cos(ang) + (yy - n / 2) * math.sin(ang)
        keep = rng.uniform(0.4, 0.7)
        vals = np.sort(proj[alpha > 0.5])
        cut = vals[int(keep * (len(vals) - 1))] if len(vals) else 0.0
        alpha = alpha * np.clip(cut - proj + 0.5, 0, 1)
        return _Item(alpha, [(color, alpha)], junk)
    if kind == "blob":  # irregular or elongated blob
        side = rng.uniform(10, 26)
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        amps = rng.uniform(0, 0.25, size=4)
        amps *= max(1.0, 0.35 / amps.sum())  # clearly irregular, never a near-circle
        r = 1 + sum(a * np.cos(k * t + rng.uniform(0, 2 * np.pi)) for k, a in zip(range(2, 6), amps))
        aspect = rng.uniform(0.3, 0.6) if rng.random() < 0.5 else 1.0
        pts = np.stack([r * np.cos(t), aspect * r * np.sin(t)], 1)
        a = rng.uniform(0, np.pi)
        pts = pts @ np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]).T
        pts = pts / np.abs(pts).max() * side / 2
        n = int(side) + 6
        alpha = render.rasterize([pts + n / 2], n, n)
        return _Item(alpha, [(color, alpha)], junk)
    # fragment: a tiny piece
    side = rng.uniform(3, 7)
    alpha = _shape_patch(SHAPES[int(rng.integers(len(SHAPES)))], side, rng.uniform(-45, 45), rng)
    return _Item(alpha, [(color, alpha)], junk)


def training_scene(
    rng: np.random.Generator, size: int = IMAGE_SIZE
) -> tuple[np.ndarray, list[np.ndarray], list[int], list[int], list[float]]:
    """A random training scene: 1-5 items (shapes, ~20% junk), sometimes cut by the
    border, drawn like the renderer, then degraded (70%: a random combination of the
    renderer's degradations; 30% of scenes also get a background tint).

    Returns ``(rgb uint8 (H, W, 3), alphas (float32 (H, W) per item), shape labels
    (index, junk = len(SHAPES)), colour labels (index or -100 when mixed), total
    coverage per item including what fell outside the image)``."""
    junk = len(SHAPES)
    bg = np.asarray(BACKGROUND_RGB, np.float32)
    if rng.random() < 0.3:
        bg = np.clip(bg + rng.uniform(-14, 14, 3), 0, 255)
    canvas = np.empty((size, size, 3), np.float32)
    canvas[:] = bg
    n_items = int(rng.integers(1, 6))
    boxes: list[tuple[int, int, int, int]] = []
    alphas, labels, colors, totals = [], [], [], []
    for _ in range(n_items):
        if rng.random() < 0.2:
            item = _junk_item(rng, junk)
        else:
            shape_idx = int(rng.integers(len(SHAPES)))
            color = COLORS[int(rng.integers(len(COLORS)))]
            side, rotation = rng.uniform(*TRAIN_SIZE), rng.uniform(-TRAIN_ROTATION, TRAIN_ROTATION)
            alpha = _shape_patch(SHAPES[shape_idx], side, rotation, rng)
            item = _Item(alpha, [(color, alpha)], shape_idx)
        bx = render._alpha_box(item.alpha)
        if bx[2] <= bx[0]:
            continue
        gap = int(rng.integers(3, 9))
        outside = rng.random() < 0.08  # let it hang over the border
        lo = -bx[0] - (bx[2] - bx[0]) // 2 if outside else -bx[0] + 1
        hi = size - bx[2] + (bx[2] - bx[0]) // 2 if outside else size - bx[2] - 1
        if hi < lo:
            continue
        for _try in range(30):
            ox, oy = int(rng.integers(lo, hi, endpoint=True)), int(rng.integers(lo, hi, endpoint=True))
            box = (bx[0] + ox, bx[1] + oy, bx[2] + ox, bx[3] + oy)
            if render._gap_ok(box, boxes, gap):
                break
        else:
            continue
        boxes.append(box)
        full = np.zeros((size, size, 1), np.float32)
        render.composite(full, item.alpha, (1.0,), ox, oy)
        for name, layer in item.colors:
            render.composite(canvas, layer, render.jitter_color(name, rng), ox, oy)
        alphas.append(full[..., 0])
        labels.append(item.label)
        names = {name for name, _ in item.colors}
        colors.append(COLORS.index(next(iter(names))) if len(names) == 1 else -100)
        totals.append(float(item.alpha.sum()))
    img = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), mode="RGB")
    if rng.random() < 0.7:
        img = render.degrade(img, rng, render.random_degradation(rng))
    return np.asarray(img), alphas, labels, colors, totals


def label_components(
    comps: Sequence[Component],
    alphas: Sequence[np.ndarray],
    labels: Sequence[int],
    colors: Sequence[int],
    totals: Sequence[float],
) -> list[tuple[int, int] | None]:
    """Training labels ``(shape, colour)`` of segmented components (None: skip).

    A component covering one item (its 2-px dilated mask holds >= 80% of the item's
    coverage) gets the item's labels; one touching several items, or none, is junk
    (colour kept only if all share it); one holding < 55% of its single item is a
    fragment: junk with the item's colour; in between is ambiguous and skipped."""
    junk = len(SHAPES)
    out: list[tuple[int, int] | None] = []
    for comp in comps:
        grown = ndimage.binary_dilation(comp.mask, iterations=2)
        inside = [float(a[comp.mask].sum()) for a in alphas]
        involved = [k for k, v in enumerate(inside) if v >= 2.0]
        if not involved:
            out.append((junk, -100))
        elif len(involved) > 1:
            cols = {colors[k] for k in involved}
            out.append((junk, cols.pop() if len(cols) == 1 else -100))
        else:
            k = involved[0]
            cover = float(alphas[k][grown].sum()) / max(totals[k], 1e-6)
            if labels[k] == junk or cover < 0.55:
                out.append((junk, colors[k]))
            elif cover >= 0.8:
                out.append((labels[k], colors[k]))
            else:
                out.append(None)
    return out


#: Scenes per data-generation chunk; chunk ``i`` draws from ``default_rng([seed, i])``,
#: so the data set does not depend on how many worker processes made it.
CHUNK_SCENES = 400


def _make_chunk(args: tuple[int, int, int, DetectorConfig]) -> tuple[torch.Tensor, list[int], list[int]]:
    seed, index, n_scenes, config = args
    torch.set_num_threads(1)
    rng = np.random.default_rng([seed, index])
    crops, ys, cs = [], [], []
    for _ in range(n_scenes):
        rgb, alphas, labels, colors, totals = training_scene(rng, config.image_size)
        comps, dist = segment(rgb, config)
        found = label_components(comps, alphas, labels, colors, totals)
        keep = [(c, lab) for c, lab in zip(comps, found) if lab]
        if not keep:
            continue
        crops.append(crop_inputs(rgb, dist, [c for c, _ in keep], config).half())
        ys += [lab[0] for _, lab in keep]
        cs += [lab[1] for _, lab in keep]
    empty = torch.zeros((0, IN_CHANNELS, config.crop_size, config.crop_size), dtype=torch.float16)
    return (torch.cat(crops) if crops else empty), ys, cs


class _Chunks(torch.utils.data.Dataset):
    def __init__(self, jobs: list) -> None:
        self.jobs = jobs

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int):
        return _make_chunk(self.jobs[i])


def make_training_set(
    n_scenes: int, seed: int, config: DetectorConfig, progress: bool = False, workers: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Classifier inputs and labels from ``n_scenes`` random training scenes
    (:func:`training_scene` -> :func:`segment` -> :func:`label_components` ->
    :func:`crop_inputs`), deterministic given ``seed`` whatever ``workers`` is.

    Returns ``(crops float16 (N, 5, S, S), shape labels int64 (N,), colour labels
    int64 (N,))`` (colour -100 = unknown; crops are half precision to save memory).
    ``workers > 1`` renders chunks in that many worker processes (a torch DataLoader)."""
    from tqdm.auto import tqdm

    sizes = [min(CHUNK_SCENES, n_scenes - i) for i in range(0, n_scenes, CHUNK_SCENES)]
    jobs = [(seed, i, n, config) for i, n in enumerate(sizes)]
    bar = tqdm(total=n_scenes, desc="training scenes", unit="scene", disable=not progress, mininterval=1.0)
    results = []
    if workers > 1 and len(jobs) > 1:
        # a DataLoader over chunks: ordered results, worker processes (fork on Linux)
        loader = torch.utils.data.DataLoader(
            _Chunks(jobs), batch_size=None, num_workers=min(workers, len(jobs))
        )
        for job, res in zip(jobs, loader):
            results.append(res)
            bar.update(job[2])
    else:
        for job in jobs:
            results.append(_make_chunk(job))
            bar.update(job[2])
    bar.close()
    x = torch.cat([r[0] for r in results])
    y = torch.tensor([v for r in results for v in r[1]], dtype=torch.int64)
    c = torch.tensor([v for r in results for v in r[2]], dtype=torch.int64)
    return x, y, c


# ------------------------------------------------------------------------ training
def fit_classifier(
    x: torch.Tensor,
    y: torch.Tensor,
    c: torch.Tensor,
    config: DetectorConfig,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool = False,
) -> ShapesNet:
    """Train a fresh :class:`ShapesNet` on crops ``x`` (``(N, 5, S, S)``), shape labels
    ``y`` and colour labels ``c`` (-100 = unknown): AdamW (weight decay 1e-4), one-cycle
    learning rate peaking at ``lr``, random horizontal flips (every class is mirror
    symmetric or, for the crescent, orientation-free), cross-entropy on both heads.
    Returns the model in eval mode."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    model = ShapesNet(len(config.classnames), len(config.colors), config.widths)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    order, pos = torch.randperm(len(y), generator=gen), 0
    bar = tqdm(range(steps), desc="training detector", disable=not progress, mininterval=1.0)
    for step in bar:
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(y), generator=gen), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        xb = x[idx].float()
        flip = torch.rand(len(idx), generator=gen) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        shape_logits, color_logits = model(xb)
        loss = F.cross_entropy(shape_logits, y[idx])
        if (c[idx] >= 0).any():
            loss = loss + F.cross_entropy(color_logits, c[idx], ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def _warn_if_busy(num_threads: int) -> None:
    """Warn when several torch threads would share a busy CPU with active spinning."""
    if num_threads < 2 or os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        return
    try:
        load = os.getloadavg()[0]
    except OSError:
        return
    cores = os.cpu_count() or 1
    if load > cores - 0.5:
        warnings.warn(
            f"the machine is busy (load {load:.1f} on {cores} cores): {num_threads} torch threads may "
            "spin and train several times slower; set OMP_WAIT_POLICY=PASSIVE before starting Python, "
            "or use 1 thread",
            RuntimeWarning,
            stacklevel=3,
        )


def train_shapes_detector(
    out_dir: str | Path | None,
    steps: int = 3000,
    seed: int = 0,
    batch_size: int = 128,
    n_scenes: int | None = None,
    lr: float = 3e-3,
    progress: bool = True,
    config: DetectorConfig | None = None,
    num_threads: int = 2,
    workers: int | None = None,
) -> ShapesDetector:
    """Train a :class:`ShapesDetector` from scratch on synthetic scenes.

    Deterministic given ``seed`` (NumPy data generator and torch init/shuffling), with
    ``torch.set_num_threads(num_threads)`` during training (restored afterwards).
    The defaults take about 4.5 minutes on 2 shared CPU cores (about 90 s rendering
    24000 scenes, ~60k crops; 180 s for 3000 steps); ``steps=40`` takes a few seconds.

    Args:
        out_dir: where to :meth:`~ShapesDetector.save_pretrained` the result (None: don't).
        steps: optimiser steps (AdamW, one-cycle learning rate).
        seed: seed of everything random.
        batch_size: crops per step.
        n_scenes: training scenes rendered up front (about 2.6 crops each); default
            ``min(24000, max(200, steps * batch_size // 12))``, so each crop is seen
            about four times.
        lr: peak learning rate.
        progress: show tqdm bars and a final accuracy line.
        config: detector settings (default :class:`DetectorConfig`).
        num_threads: torch CPU threads while training (use 1 on a busy machine:
            two spinning threads on two shared cores are several times slower).
        workers: processes rendering the training scenes; default ``num_threads``
            (1 when there are fewer than 2000 scenes). The data do not depend on it.
    Returns:
        The trained detector (in eval mode).
    Raises:
        ValueError: ``steps`` or ``batch_size`` < 1.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    config = config or DetectorConfig()
    n_scenes = n_scenes or min(24000, max(200, steps * batch_size // 12))
    if workers is None:
        workers = num_threads if n_scenes >= 2000 else 1
    _warn_if_busy(num_threads)
    with _torch_threads(num_threads):
        t0 = time.time()
        x, y, c = make_training_set(n_scenes, seed, config, progress, workers=workers)
        t_data = time.time() - t0
        model = fit_classifier(x, y, c, config, steps, batch_size, lr, seed, progress)
        detector = ShapesDetector(config, model)
        if progress:
            print(
                f"detector trained: {len(y)} crops from {n_scenes} scenes in {t_data:.0f}s, "
                f"{steps} steps, total {time.time() - t0:.0f}s"
            )
    if out_dir is not None:
        detector.save_pretrained(out_dir)
    return detector


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the GenEval-Shapes detector.")
    parser.add_argument("--out", required=True, help="output directory (config.json + model.safetensors)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--scenes", type=int, default=None, help="training scenes (default from steps)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--workers", type=int, default=None, help="data processes (default: --threads)")
    args = parser.parse_args(argv)
    train_shapes_detector(
        args.out,
        steps=args.steps,
        seed=args.seed,
        batch_size=args.batch_size,
        n_scenes=args.scenes,
        num_threads=args.threads,
        workers=args.workers,
    )


if __name__ == "__main__":
    main()

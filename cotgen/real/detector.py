"""Mask2Former + CLIP as a GenEval Detector, with GenEval's semantics (issue 9).

GenEval runs mmdetection's Mask2Former (Swin-S, COCO instance segmentation) and
open_clip's ViT-L/14 (``evaluation/evaluate_images.py``). The same checkpoints exist as
transformers classes (``Mask2FormerForUniversalSegmentation``
``facebook/mask2former-swin-small-coco-instance``; ``CLIPModel``
``openai/clip-vit-large-patch14``), and this module reproduces what mmdetection's
instance post-processing and GenEval's colour step do:

- **Scores**: class probabilities are the softmax over the 80 classes + "no object", the
  last dropped; every (query, class) pair is its own candidate and the ``top_k`` (100,
  mmdetection's ``max_per_image``) best by class probability are kept. A candidate's
  mask is its query's mask logits, bilinearly resized to the image; binary mask = logit >
  0; score = class probability x mean sigmoid mask probability inside the binary mask.
  No NMS. Thresholds (0.3; 0.9 for ``counting``) and the 16 per class are applied later by
  :func:`cotgen.geneval.rules.threshold_detections`, as in GenEval.
- **Boxes** tight around the binary mask: ``(min x, min y, max x + 1, max y + 1)``
  (mmdetection's ``mask2bbox``). Empty masks give no detection (their score is 0).
- **Names**: GenEval's 80 names (``object_names.txt``); COCO's ``mouse``, ``remote`` and
  ``keyboard`` are GenEval's ``computer mouse``, ``tv remote`` and ``computer keyboard``
  (:data:`GENEVAL_RENAMES`).
- **Colour**: the object is cut out by its mask onto grey ``#999`` (153, 153, 153),
  cropped to its box and classified zero-shot by CLIP among GenEval's ten colours with
  GenEval's three templates per colour (:data:`COLOR_TEMPLATES`), text embeddings
  normalised, averaged over templates and renormalised (clip_benchmark's
  ``zero_shot_classifier``); the colour is the argmax. Only detections that can reach
  GenEval's rules (score > ``color_min_score`` = 0.3 and among the 16 best of their class)
  are classified; the others keep ``color=None``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cotgen.geneval.rules import MAX_OBJECTS, THRESHOLD, Detection
from cotgen.world.vocab import COLORS

#: COCO names -> GenEval names (the three GenEval renamed)
GENEVAL_RENAMES = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}

#: GenEval's colour prompt templates (``{c}`` colour, ``{obj}`` class name)
COLOR_TEMPLATES = ("a photo of a {c} {obj}", "a photo of a {c}-colored {obj}", "a photo of a {c} object")

#: GenEval's cut-out background
CUTOUT_GREY = "#999"

GENEVAL_OBJECT_NAMES = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "geneval" / "object_names.txt"


def geneval_object_names(path: str | Path | None = None) -> list[str]:
    """GenEval's 80 class names (its ``object_names.txt``; default: the shared copy, else
    COCO's names with :data:`GENEVAL_RENAMES` applied)."""
    path = Path(path) if path else GENEVAL_OBJECT_NAMES
    if path.is_file():
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    from cotgen.real.tiny import coco_thing_names

    return [GENEVAL_RENAMES.get(n, n) for n in coco_thing_names()]


def geneval_classnames(id2label: dict, object_names: Sequence[str] | None = None) -> list[str]:
    """The detector's labels (index order) as GenEval names.

    Raises:
        ValueError: a label that is neither a GenEval name nor one of the renamed COCO
            names, or GenEval names the detector cannot produce (both listed).
    """
    names = set(object_names or geneval_object_names())
    labels = [str(id2label[i]) for i in sorted(int(k) for k in id2label)]
    out = [GENEVAL_RENAMES.get(n, n) for n in labels]
    unknown = [lab for lab, n in zip(labels, out) if n not in names]
    missing = sorted(names - set(out))
    if unknown or missing:
        raise ValueError(f"detector labels do not match GenEval's 80 names: unknown {unknown}, missing {missing}")
    return out


# ---------------------------------------------------------------------------- post-processing
def query_detections(class_logits: torch.Tensor, mask_logits: torch.Tensor, classnames: Sequence[str],
                     top_k: int = 100) -> list[tuple[str, float, np.ndarray, tuple[float, float, float, float]]]:
    """mmdetection's Mask2Former instance post-processing for one image.

    Args:
        class_logits: ``(Q, C + 1)`` (last column: no object).
        mask_logits: ``(Q, H, W)`` mask logits already at the image's size.
        classnames: ``C`` names.
        top_k: (query, class) pairs kept by class probability.
    Returns:
        ``(classname, score, mask (H, W) bool, box)`` per kept pair with a non-empty mask.
    """
    Q, C1 = class_logits.shape
    C = C1 - 1
    if len(classnames) != C:
        raise ValueError(f"{len(classnames)} class names for {C} classes")
    probs = class_logits.float().softmax(-1)[:, :C]
    scores, idx = probs.flatten().topk(min(top_k, Q * C))
    queries, classes = idx // C, idx % C
    masks = mask_logits.float()[queries]
    binary = masks > 0
    mask_quality = (masks.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    final = scores * mask_quality
    out = []
    for k in range(len(queries)):
        m = binary[k]
        if not bool(m.any()):
            continue
        ys, xs = torch.where(m)
        box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
        out.append((classnames[int(classes[k])], float(final[k]), m.cpu().numpy(), box))
    return out


def cutout(image: Image.Image, mask: np.ndarray, box: Sequence[float], background: str = CUTOUT_GREY) -> Image.Image:
    """GenEval's colour crop: the object cut out by ``mask`` onto ``background`` (#999),
    cropped to ``box``."""
    image = image.convert("RGB")
    if tuple(mask.shape) != (image.height, image.width):
        raise ValueError(f"mask {mask.shape} does not match the image {(image.height, image.width)}")
    blank = Image.new("RGB", image.size, color=background)
    return Image.composite(image, blank, Image.fromarray(np.asarray(mask, dtype=bool))).crop(tuple(box[:4]))


class ClipColorClassifier:
    """Zero-shot colour classification with a ``CLIPModel`` and GenEval's templates."""

    def __init__(self, model, processor, batch_size: int = 16) -> None:
        self.model, self.processor, self.batch_size = model.eval(), processor, batch_size
        self._classifiers: dict[str, torch.Tensor] = {}

    @staticmethod
    def prompts(classname: str) -> list[list[str]]:
        """Per colour (GenEval's order), its three template texts."""
        return [[t.format(c=c, obj=classname) for t in COLOR_TEMPLATES] for c in COLORS]

    @torch.no_grad()
    def _features(self, out) -> torch.Tensor:
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        return feats.float() / feats.float().norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def classifier(self, classname: str) -> torch.Tensor:
        """``(D, 10)``: per colour, the normalised mean of its normalised template embeddings."""
        if classname not in self._classifiers:
            device = next(self.model.parameters()).device
            cols = []
            for texts in self.prompts(classname):
                enc = self.processor(text=texts, return_tensors="pt", padding=True).to(device)
                emb = self._features(self.model.get_text_features(**enc)).mean(0)
                cols.append(emb / emb.norm())
            self._classifiers[classname] = torch.stack(cols, dim=1)
        return self._classifiers[classname]

    @torch.no_grad()
    def probabilities(self, crops: Sequence[Image.Image], classname: str) -> np.ndarray:
        """``(len(crops), 10)`` colour probabilities (softmax of 100 x cosine)."""
        if not crops:
            return np.zeros((0, len(COLORS)))
        clf = self.classifier(classname)
        device = clf.device
        out = []
        for i in range(0, len(crops), self.batch_size):
            enc = self.processor(images=list(crops[i : i + self.batch_size]), return_tensors="pt").to(device)
            feats = self._features(self.model.get_image_features(**enc))
            out.append((100.0 * feats @ clf).softmax(-1).cpu())
        return torch.cat(out).double().numpy()


class Mask2FormerClipDetector:
    """GenEval Detector: Mask2Former (instance) + CLIP colours (see the module).

    Args:
        model, processor: ``Mask2FormerForUniversalSegmentation`` (COCO instance labels)
            and its image processor.
        colors: a :class:`ClipColorClassifier`, or any callable ``(crops, classname) ->
            (n, 10) probabilities``.
        top_k: (query, class) pairs kept per image (mmdetection: 100).
        color_min_score: detections at or below it get no colour (GenEval drops them).
    """

    def __init__(self, model, processor, colors: ClipColorClassifier | Callable, top_k: int = 100,
                 color_min_score: float = THRESHOLD, max_objects: int = MAX_OBJECTS,
                 object_names: Sequence[str] | None = None) -> None:
        self.model, self.processor = model.eval(), processor
        self.colors = colors
        self.top_k, self.color_min_score, self.max_objects = top_k, color_min_score, max_objects
        self.labels = geneval_classnames(model.config.id2label, object_names)
        self.classnames = tuple(geneval_object_names() if object_names is None else object_names)

    def _color_probs(self, crops, classname) -> np.ndarray:
        if not crops:
            return np.zeros((0, len(COLORS)))
        if hasattr(self.colors, "probabilities"):
            return self.colors.probabilities(crops, classname)
        return np.asarray(self.colors(crops, classname), dtype=np.float64)

    @torch.no_grad()
    def raw_outputs(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        """``(class logits (Q, C+1), mask logits (Q, H, W) at the image's size)``."""
        device = next(self.model.parameters()).device
        enc = self.processor(images=[image.convert("RGB")], return_tensors="pt")
        pixel_values = enc["pixel_values"].to(device, next(self.model.parameters()).dtype)
        out = self.model(pixel_values=pixel_values)
        masks = out.masks_queries_logits[0].float()[None]
        masks = torch.nn.functional.interpolate(masks, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)
        masks = torch.nn.functional.interpolate(masks, size=(image.height, image.width), mode="bilinear",
                                                align_corners=False)[0]
        return out.class_queries_logits[0].float(), masks

    def detections(self, image: Image.Image, class_logits: torch.Tensor, mask_logits: torch.Tensor
                   ) -> dict[str, list[Detection]]:
        """GenEval detections from raw outputs (the post-processing, colours included)."""
        by_class: dict[str, list] = {}
        for name, score, mask, box in query_detections(class_logits, mask_logits, self.labels, self.top_k):
            by_class.setdefault(name, []).append((score, mask, box))
        result: dict[str, list[Detection]] = {}
        for name, items in by_class.items():
            items.sort(key=lambda t: -t[0])
            colored = [i for i, (s, _, _) in enumerate(items[: self.max_objects]) if s > self.color_min_score]
            probs = self._color_probs([cutout(image, items[i][1], items[i][2]) for i in colored], name)
            colors = {i: p for i, p in zip(colored, probs)}
            result[name] = [
                Detection(box=box, score=score, mask=mask,
                          color=COLORS[int(np.argmax(colors[i]))] if i in colors else None,
                          color_scores=dict(zip(COLORS, map(float, colors[i]))) if i in colors else None)
                for i, (score, mask, box) in enumerate(items)
            ]
        return result

    def detect(self, image: Image.Image) -> dict[str, list[Detection]]:
        """Raw GenEval detections per class (not thresholded)."""
        class_logits, mask_logits = self.raw_outputs(image)
        return self.detections(image, class_logits, mask_logits)

"""The Detector interface (DESIGN section 4): image in, GenEval detections per class out."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from PIL import Image

from cotgen.geneval.rules import Detection


@runtime_checkable
class Detector(Protocol):
    """Anything that finds GenEval objects in an image.

    ``classnames`` lists every class the detector can report. ``detect`` takes an RGB
    PIL image (any size the detector accepts; it raises ``ValueError`` naming the
    problem otherwise) and returns class name -> *raw* detections (not thresholded,
    any order), each with ``box`` in pixels of that image, ``score`` in [0, 1] and
    ``color`` set. Following GenEval's Mask2Former semantics one object may appear under
    several classes, each with its own score. Thresholding is the caller's
    (:func:`cotgen.geneval.rules.threshold_detections`).
    """

    classnames: tuple[str, ...]

    def detect(self, image: Image.Image) -> dict[str, list[Detection]]: ...

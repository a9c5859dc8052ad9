"""Edit-style right images (cotgen/reflect/edit.py): the wrong image with its fault
repaired in pixels, the rest kept. Judged with a learning-free template detector, so the
tests need no trained model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cotgen.geneval.rules import Detection, evaluate, relative_position, threshold_detections
from cotgen.geneval.scoring import judge_image
from cotgen.reflect.edit import repair_image, repair_until_correct, splice_tokens
from cotgen.reflect.text import primary_failure
from cotgen.world.detector import DetectorConfig, segment, to_rgb_array
from cotgen.world.render import CANONICAL, rasterize, render_near_miss, render_scene, shape_polygon
from cotgen.world.vocab import COLOR_RGB, COLORS, SHAPES


class TemplateDetector:
    """Canonical (unrotated, unjittered) renders only: segmentation as the real
    detector's, class by mask IoU with each shape drawn in the component's box, colour
    the nearest of GenEval's ten to the component's median pixel; score 1."""

    config = DetectorConfig()

    def detect(self, image) -> dict[str, list[Detection]]:
        rgb = to_rgb_array(image, 64)
        comps, _ = segment(rgb, self.config)
        out: dict[str, list[Detection]] = {s: [] for s in SHAPES}
        for c in comps:
            x0, y0, x1, y1 = c.box

            def iou(shape, mask=c.mask, center=((x0 + x1) / 2, (y0 + y1) / 2), side=max(x1 - x0, y1 - y0)):
                t = rasterize([shape_polygon(shape, side) + center], 64, 64) >= 0.5
                return (t & mask).sum() / max(1, (t | mask).sum())

            median = np.median(rgb[c.mask].astype(float), axis=0)
            color = min(COLORS, key=lambda k: np.linalg.norm(median - COLOR_RGB[k]))
            out[max(SHAPES, key=iou)].append(Detection(c.box, 1.0, color, mask=c.mask))
        return out


DETECTOR = TemplateDetector()

LINES = {
    "missing": {"tag": "two_object", "prompt": "a photo of a circle and a star",
                "include": [{"class": "circle", "count": 1}, {"class": "star", "count": 1}]},
    "count": {"tag": "counting", "prompt": "a photo of three squares",
              "include": [{"class": "square", "count": 3}], "exclude": [{"class": "square", "count": 4}]},
    "color": {"tag": "color_attr", "prompt": "a photo of a red heart and a blue cross",
              "include": [{"class": "heart", "count": 1, "color": "red"},
                          {"class": "cross", "count": 1, "color": "blue"}]},
    "position": {"tag": "position", "prompt": "a photo of a triangle left of a diamond",
                 "include": [{"class": "diamond", "count": 1},
                             {"class": "triangle", "count": 1, "position": ["left of", 0]}]},
}


def test_template_detector_reads_canonical_renders():
    rng = np.random.default_rng(0)
    for line in LINES.values():
        for _ in range(5):
            assert judge_image(DETECTOR, render_scene(line, rng, style=CANONICAL)[0], line)[0]


@pytest.mark.parametrize("kind", sorted(LINES))
def test_repair_fixes_the_named_fault_and_keeps_the_rest(kind):
    line, rng, repaired = LINES[kind], np.random.default_rng(1), 0
    for _ in range(10):
        image = np.asarray(render_near_miss(line, rng, kind, style=CANONICAL)[0])
        ok, reason, found = judge_image(DETECTOR, image, line)
        failure = primary_failure(reason, line)
        if ok or failure is None or len(reason.splitlines()) > 1:  # misread: not the one-fault scene drawn
            continue
        out = repair_image(image, found, line, failure, rng)
        if out is None:  # no room in this scene
            continue
        assert out.shape == image.shape and out.dtype == np.uint8 and not np.array_equal(out, image)
        ok, reason, after = judge_image(DETECTOR, out, line)
        if not ok:  # the template detector misreads small shapes now and then
            continue
        repaired += 1
        # objects the fault does not concern keep every pixel (a position repair may move the target instead)
        cls = line["include"][failure.include]["class"]
        for name, dets in found.items():
            for d in dets:
                if name != cls and kind != "position":
                    assert np.array_equal(out[d.mask], image[d.mask])
        if kind == "position":
            mover, target = after["triangle"][0], after["diamond"][0]
            assert "left of" in relative_position(mover.box, target.box)
        if kind == "color":
            assert [d.color for d in after[cls]] == [line["include"][failure.include]["color"]]
    assert repaired >= 6


def test_repair_until_correct_and_no_room():
    rng = np.random.default_rng(2)
    line = LINES["color"]
    image = np.asarray(render_scene({"tag": "single_object", "prompt": "a photo of a green heart",
                                     "include": [{"class": "heart", "count": 1, "color": "green"}]},
                                    rng, style=CANONICAL)[0])
    out, edits = repair_until_correct(image, DETECTOR, line, rng)  # recolour the heart, then add the cross
    assert out is not None and edits == 2 and judge_image(DETECTOR, out, line)[0]
    correct = np.asarray(render_scene(line, rng, style=CANONICAL)[0])
    assert repair_until_correct(correct, DETECTOR, line, rng) == (None, 0)  # nothing to repair
    crowded = np.full((64, 64, 3), 128, np.uint8)
    crowded[4:60, 4:60] = np.asarray(COLOR_RGB["red"], np.uint8)  # one big object fills the canvas
    missing = LINES["missing"]
    _, reason, found = judge_image(DETECTOR, crowded, missing)
    assert repair_image(crowded, found, missing, primary_failure(reason, missing), rng) is None
    with pytest.raises(ValueError, match="not an include"):
        from cotgen.reflect.text import Failure

        repair_image(crowded, found, missing, Failure("missing", include=5), rng)


def test_splice_keeps_the_codes_of_untouched_cells():
    g = 16
    wrong_t, edited_t = torch.zeros(g, g, dtype=torch.long), torch.ones(g, g, dtype=torch.long)
    image = np.full((64, 64, 3), 128, np.uint8)
    assert torch.equal(splice_tokens(wrong_t, edited_t, image, image.copy()), wrong_t)
    edited = image.copy()
    edited[20:22, 41:43] = 0  # cell (5, 10)
    out = splice_tokens(wrong_t, edited_t, image, edited)
    assert out[5, 10] == 1 and out[4:7, 9:12].sum() == 9 and out.sum() == 9  # the cell and its 1-cell halo
    assert splice_tokens(wrong_t, edited_t, image, edited, halo=0).sum() == 1

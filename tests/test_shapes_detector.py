"""The shapes detector: segmentation, GenEval detections, persistence, input checks.

A tiny detector (a few seconds of training) is shared by the tests; its class guesses
are weak, so tests on it check structure, not accuracy. Accuracy of the default
detector is measured by ``python -m cotgen.world.validate`` (and checked below when
``data/detector`` exists).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cotgen.geneval.detector import Detector
from cotgen.geneval.rules import Detection, evaluate, threshold_detections
from cotgen.world import render
from cotgen.world.detector import DetectorConfig, ShapesDetector, segment, train_shapes_detector
from cotgen.world.prompts import build_shapes_eval_set
from cotgen.world.validate import validate_evaluator
from cotgen.world.vocab import COLORS, SHAPES

EVAL_SET = build_shapes_eval_set()
DEFAULT_DIR = Path(__file__).resolve().parents[1] / "data" / "detector"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_detector")
    train_shapes_detector(out, steps=40, seed=0, batch_size=32, n_scenes=120, progress=False, num_threads=1)
    return out


@pytest.fixture(scope="session")
def tiny(tiny_dir) -> ShapesDetector:
    return ShapesDetector.from_pretrained(tiny_dir)


def _iou(a, b):
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_implements_protocol(tiny):
    assert isinstance(tiny, Detector)
    assert tiny.classnames == SHAPES


@pytest.mark.parametrize("degradation", [None, "all"])
def test_segmentation_finds_every_object(degradation):
    config = DetectorConfig()
    rng = np.random.default_rng(0)
    for md in EVAL_SET[::7]:
        image, objects = render.render_scene(md, rng)
        if degradation:
            image = render.degrade(image, rng, degradation)
        comps, _ = segment(np.asarray(image), config)
        assert len(comps) == len(objects), md["prompt"]
        for o in objects:
            best = max(comps, key=lambda c: _iou(o["box"], c.box))
            if degradation is None:  # masks cut faint anti-aliased edges: at most ~2 px per side
                assert max(abs(a - b) for a, b in zip(o["box"], best.box)) <= 2, (md["prompt"], o, best.box)
            else:
                assert _iou(o["box"], best.box) > 0.5, (md["prompt"], o, best.box)
        if degradation is None:
            assert all(c.quality > 0.95 for c in comps)


def test_empty_image_has_no_detections(tiny):
    dets = tiny.detect(Image.new("RGB", (64, 64), (128, 128, 128)))
    assert set(dets) == set(SHAPES) and not any(dets.values())


def test_detections_are_well_formed(tiny):
    rng = np.random.default_rng(1)
    md = next(m for m in EVAL_SET if m["tag"] == "color_attr")
    image, objects = render.render_scene(md, rng)
    dets = tiny.detect(image)
    found = [d for ds in dets.values() for d in ds]
    assert found, "every object is at least segmented and reported under some class"
    for d in found:
        assert isinstance(d, Detection)
        assert 0.0 <= d.score <= 1.0
        assert d.color in COLORS and set(d.color_scores) == set(COLORS)
        assert abs(sum(d.color_scores.values()) - 1) < 1e-4
        assert d.mask.shape == (64, 64) and d.mask.dtype == bool and d.mask.any()
        ys, xs = np.nonzero(d.mask)
        assert d.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    boxes = {d.box for d in found}
    for o in objects:
        assert max(_iou(o["box"], b) for b in boxes) > 0.75


def test_save_load_round_trip_gives_identical_outputs(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "copy")
    again = ShapesDetector.from_pretrained(tmp_path / "copy")
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == ["config.json", "model.safetensors"]
    rng = np.random.default_rng(2)
    images = [render.degrade(render.render_scene(md, rng)[0], rng, "all") for md in EVAL_SET[::40]]
    for a, b in zip(tiny.detect_batch(images), again.detect_batch(images)):
        assert a.keys() == b.keys()
        for name in a:
            assert [(d.box, d.score, d.color) for d in a[name]] == [
                (d.box, d.score, d.color) for d in b[name]
            ]
    for name, pa in tiny.model.state_dict().items():
        assert torch.equal(pa, again.model.state_dict()[name])


def test_detect_batch_equals_detect(tiny):
    rng = np.random.default_rng(3)
    images = [render.render_scene(md, rng)[0] for md in EVAL_SET[::50]]
    for image, batched in zip(images, tiny.detect_batch(images)):
        single = tiny.detect(image)
        for name in single:
            # Same boxes; scores equal up to float rounding (a batch takes other BLAS paths: rounding
            # to 5 decimals failed once on two scores a float's last bits either side of 0.214415).
            assert [d.box for d in single[name]] == [d.box for d in batched[name]]
            assert [d.score for d in single[name]] == pytest.approx(
                [d.score for d in batched[name]], abs=1e-5
            )


def test_training_is_deterministic(tiny_dir, tmp_path):
    again = train_shapes_detector(
        tmp_path, steps=40, seed=0, batch_size=32, n_scenes=120, progress=False, num_threads=1
    )
    ref = ShapesDetector.from_pretrained(tiny_dir)
    for name, p in ref.model.state_dict().items():
        assert torch.allclose(p, again.model.state_dict()[name], atol=1e-5), name


def test_accepts_other_modes(tiny):
    image, _ = render.render_scene(EVAL_SET[0], np.random.default_rng(4))
    for mode in ("RGBA", "L", "P"):
        dets = tiny.detect(image.convert(mode))
        assert set(dets) == set(SHAPES)
    assert set(tiny.detect(np.asarray(image))) == set(SHAPES)


@pytest.mark.parametrize(
    "bad, match",
    [
        (Image.new("RGB", (128, 128)), "expected a 64x64 image, got 128x128"),
        (Image.new("RGB", (64, 32)), "expected a 64x64 image, got 64x32"),
        ("image.png", "expected a PIL image"),
        (np.zeros((64, 64, 3), dtype=np.float32), "uint8"),
        (np.zeros((64, 64), dtype=np.uint8), "uint8"),
        (Image.new("I;16", (64, 64)), None),
    ],
)
def test_bad_inputs_raise(tiny, bad, match):
    if match is None:  # PIL may or may not convert exotic modes; either works or raises ValueError
        try:
            tiny.detect(bad)
        except ValueError:
            pass
        return
    with pytest.raises(ValueError, match=match):
        tiny.detect(bad)


def test_from_pretrained_errors(tmp_path, tiny_dir):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ShapesDetector.from_pretrained(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "something-else"}))
    (bad / "model.safetensors").write_bytes((tiny_dir / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="model_type"):
        ShapesDetector.from_pretrained(bad)
    wide = tmp_path / "wide"
    wide.mkdir()
    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg["widths"] = [8, 8, 8]
    (wide / "config.json").write_text(json.dumps(cfg))
    (wide / "model.safetensors").write_bytes((tiny_dir / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="do not match"):
        ShapesDetector.from_pretrained(wide)


def test_train_rejects_bad_arguments():
    with pytest.raises(ValueError, match="steps"):
        train_shapes_detector(None, steps=0, progress=False)


def test_validate_evaluator_reports_every_part(tiny):
    subset = [
        next(m for m in EVAL_SET if m["tag"] == tag)
        for tag in ("single_object", "two_object", "counting", "colors", "position", "color_attr")
    ]
    metrics = validate_evaluator(tiny, subset, images_per_prompt=1, seed=0, progress=False)
    for key in ("ground_truth_overall", "degraded_overall", "near_miss_overall"):
        assert 0.0 <= metrics[key] <= 1.0
    assert set(metrics["near_miss_correct_rate"]) == {m["tag"] for m in subset}
    assert metrics["counts"] == {"prompts": 6, "ground_truth": 6, "degraded": 6, "near_miss": 9}
    json.dumps(metrics)
    with pytest.raises(ValueError, match="empty"):
        validate_evaluator(tiny, [], progress=False)


@pytest.mark.skipif(
    not (DEFAULT_DIR / "model.safetensors").is_file(), reason="no trained default detector in data/detector"
)
def test_default_detector_judges_renders_right():
    detector = ShapesDetector.from_pretrained(DEFAULT_DIR)
    rng = np.random.default_rng(10)
    right = wrong = 0
    for md in EVAL_SET[::4]:
        image, _ = render.render_scene(md, rng)
        right += evaluate(threshold_detections(detector.detect(image), md["tag"]), md)[0]
        kind = render.near_miss_kinds(md)[0]
        near, _ = render.render_near_miss(md, rng, kind)
        wrong += evaluate(threshold_detections(detector.detect(near), md["tag"]), md)[0]
    n = len(EVAL_SET[::4])
    assert right / n >= 0.95 and wrong / n <= 0.05

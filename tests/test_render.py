"""The shapes renderer: scenes satisfy (near misses break) their metadata by GenEval's rules."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cotgen.geneval.rules import evaluate, relative_position
from cotgen.world import render
from cotgen.world.prompts import build_shapes_eval_set
from cotgen.world.render import (
    degrade,
    near_miss_kinds,
    objects_to_detections,
    random_degradation,
    render_near_miss,
    render_scene,
)
from cotgen.world.vocab import BACKGROUND_RGB, COLORS, IMAGE_SIZE, SHAPES

EVAL_SET = build_shapes_eval_set()


def _boxes_apart(objects, gap):
    for i, a in enumerate(objects):
        for b in objects[i + 1 :]:
            a_box, b_box = a["box"], b["box"]
            if not (
                a_box[2] + gap <= b_box[0]
                or b_box[2] + gap <= a_box[0]
                or a_box[3] + gap <= b_box[1]
                or b_box[3] + gap <= a_box[1]
            ):
                return False
    return True


def test_every_eval_prompt_renders_correct_by_geneval_rules():
    rng = np.random.default_rng(0)
    for md in EVAL_SET:
        image, objects = render_scene(md, rng)
        assert image.size == (IMAGE_SIZE, IMAGE_SIZE) and image.mode == "RGB"
        ok, reason = evaluate(objects_to_detections(objects), md)
        assert ok, (md["prompt"], reason)
        assert len(objects) == sum(r["count"] for r in md["include"])
        assert _boxes_apart(objects, render.BOX_GAP)
        for o in objects:
            x1, y1, x2, y2 = o["box"]
            assert render.BORDER <= x1 < x2 <= IMAGE_SIZE - render.BORDER
            assert render.BORDER <= y1 < y2 <= IMAGE_SIZE - render.BORDER
            assert o["class"] in SHAPES and o["color"] in COLORS


def test_position_holds_with_margin():
    rng = np.random.default_rng(1)
    for md in [m for m in EVAL_SET if m["tag"] == "position"][:30]:
        _, objects = render_scene(md, rng)
        rel, j = md["include"][1]["position"]
        a = next(o for o in objects if o["include"] == 1)
        b = next(o for o in objects if o["include"] == j)
        for dx in (-2, 0, 2):
            for dy in (-2, 0, 2):
                moved = (a["box"][0] + dx, a["box"][1] + dy, a["box"][2] + dx, a["box"][3] + dy)
                assert rel in relative_position(moved, b["box"])


def test_counts_colors_and_background():
    rng = np.random.default_rng(2)
    md = {
        "tag": "counting",
        "include": [{"class": "star", "count": 4, "color": "red"}],
        "exclude": [{"class": "star", "count": 5}],
        "prompt": "four red stars",
    }
    image, objects = render_scene(md, rng)
    assert [o["class"] for o in objects] == ["star"] * 4 and {o["color"] for o in objects} == {"red"}
    arr = np.asarray(image)
    assert tuple(arr[0, 0]) == BACKGROUND_RGB
    # object pixels are near the canonical red
    x1, y1, x2, y2 = objects[0]["box"]
    patch = arr[y1:y2, x1:x2].reshape(-1, 3).astype(int)
    reddest = patch[np.argmax(patch[:, 0] - patch[:, 1])]
    assert np.all(np.abs(reddest - np.array(render.COLOR_RGB["red"])) <= render.COLOR_JITTER + 1)


def test_render_is_deterministic():
    md = EVAL_SET[200]
    a, oa = render_scene(md, np.random.default_rng(7))
    b, ob = render_scene(md, np.random.default_rng(7))
    assert np.array_equal(np.asarray(a), np.asarray(b)) and oa == ob


@pytest.mark.parametrize(
    "tag, kinds",
    [
        ("single_object", ["missing"]),
        ("two_object", ["missing"]),
        ("counting", ["count"]),
        ("colors", ["color", "missing"]),
        ("position", ["position", "missing"]),
        ("color_attr", ["color", "missing"]),
    ],
)
def test_near_miss_kinds_by_tag(tag, kinds):
    md = next(m for m in EVAL_SET if m["tag"] == tag)
    assert near_miss_kinds(md) == kinds


def test_near_misses_fail_by_construction():
    rng = np.random.default_rng(3)
    seen = set()
    for md in EVAL_SET[::3]:
        for kind in near_miss_kinds(md):
            image, objects = render_near_miss(md, rng, kind)
            assert image.size == (IMAGE_SIZE, IMAGE_SIZE)
            ok, _ = evaluate(objects_to_detections(objects), md)
            assert not ok, (md["prompt"], kind)
            assert objects, "near misses are never empty"
            seen.add(kind)
    assert seen == set(render.NEAR_MISS_KINDS)


def test_near_miss_breaks_only_one_thing():
    rng = np.random.default_rng(4)
    md = {
        "tag": "counting",
        "include": [{"class": "heart", "count": 3}],
        "exclude": [{"class": "heart", "count": 4}],
        "prompt": "three hearts",
    }
    for _ in range(10):
        _, objects = render_near_miss(md, rng, "count")
        assert len(objects) in (2, 4) and {o["class"] for o in objects} == {"heart"}
    md = next(m for m in EVAL_SET if m["tag"] == "color_attr")
    for _ in range(10):
        _, objects = render_near_miss(md, rng, "color")
        wanted = [r["color"] for r in md["include"]]
        assert sorted(o["class"] for o in objects) == sorted(r["class"] for r in md["include"])
        assert sum(o["color"] != wanted[o["include"]] for o in objects) == 1
    md = next(m for m in EVAL_SET if m["tag"] == "single_object")
    _, objects = render_near_miss(md, rng, "missing")
    assert len(objects) == 1 and objects[0]["class"] != md["include"][0]["class"]
    md = next(m for m in EVAL_SET if m["tag"] == "position")
    for _ in range(10):
        _, objects = render_near_miss(md, rng, "position")
        rel = md["include"][1]["position"][0]
        a = next(o for o in objects if o["include"] == 1)
        b = next(o for o in objects if o["include"] == 0)
        assert rel not in relative_position(a["box"], b["box"])


@pytest.mark.parametrize(
    "metadata, match",
    [
        ({"tag": "single_object", "include": [{"class": "dog", "count": 1}]}, "unknown class"),
        ({"tag": "colors", "include": [{"class": "star", "count": 1, "color": "teal"}]}, "unknown colour"),
        ({"tag": "counting", "include": [{"class": "star", "count": 9}]}, "at most"),
        ({"tag": "counting", "include": [{"class": "star", "count": 0}]}, "count"),
        (
            {"tag": "position", "include": [{"class": "star", "count": 1, "position": ["left of", 0]}]},
            "position",
        ),
        (
            {
                "tag": "counting",
                "include": [{"class": "star", "count": 3}],
                "exclude": [{"class": "star", "count": 3}],
            },
            "contradicts",
        ),
        (
            {"tag": "two_object", "include": [{"class": "star", "count": 1}, {"class": "star", "count": 1}]},
            "two includes",
        ),
        ({"tag": "single_object", "include": []}, "include"),
        ("a photo of a star", "mapping"),
    ],
)
def test_bad_metadata_raises(metadata, match):
    with pytest.raises(ValueError, match=match):
        render_scene(metadata, np.random.default_rng(0))


def test_bad_near_miss_kind_raises():
    md = next(m for m in EVAL_SET if m["tag"] == "counting")
    with pytest.raises(ValueError, match="does not apply"):
        render_near_miss(md, np.random.default_rng(0), "position")
    with pytest.raises(ValueError, match="unknown near-miss"):
        render_near_miss(md, np.random.default_rng(0), "shape")


def test_impossible_relation_gives_up(monkeypatch):
    monkeypatch.setattr(render, "SCENE_RESTARTS", 3)
    md = {
        "tag": "position",
        "include": [
            {"class": "star", "count": 4},
            {"class": "heart", "count": 2, "position": ["left of", 0]},
        ],
    }
    with pytest.raises(ValueError, match="could not place"):
        render_scene(md, np.random.default_rng(0))


@pytest.mark.parametrize("kind", ["blur", "noise", "jitter", "blocks", "all", "random", "blocks+noise"])
def test_degrade_keeps_size_and_mode(kind):
    rng = np.random.default_rng(5)
    image, _ = render_scene(EVAL_SET[100], rng)
    out = degrade(image, rng, kind)
    assert out.size == image.size and out.mode == "RGB"
    assert not np.array_equal(np.asarray(out), np.asarray(image))


def test_blocks_are_4x4_averages():
    rng = np.random.default_rng(6)
    image, _ = render_scene(EVAL_SET[250], rng)
    arr = np.asarray(degrade(image, rng, "blocks")).astype(int)
    blocks = arr.reshape(16, 4, 16, 4, 3)
    assert np.all(blocks == blocks[:, :1, :, :1])
    src = np.asarray(image).astype(float).reshape(16, 4, 16, 4, 3).mean(axis=(1, 3))
    assert np.abs(blocks[:, 0, :, 0] - src).max() <= 1


def test_degrade_accepts_other_modes_and_rejects_unknown():
    rng = np.random.default_rng(8)
    gray = Image.new("L", (64, 64), 100)
    assert degrade(gray, rng, "noise").mode == "RGB"
    with pytest.raises(ValueError, match="unknown degradation"):
        degrade(gray, rng, "sharpen")


def test_random_degradation_covers_combos():
    rng = np.random.default_rng(9)
    combos = {random_degradation(rng) for _ in range(400)}
    assert "all" in combos and len(combos) == 15


def test_canonical_style_draws_sprites_on_the_token_grid():
    from cotgen.geneval.rules import evaluate
    from cotgen.world.render import CANONICAL, objects_to_detections, render_scene

    metas = [
        {"tag": "counting", "include": [{"class": "star", "count": 3}], "prompt": "a photo of three stars"},
        {"tag": "position", "include": [{"class": "circle", "count": 1, "color": "red"},
                                        {"class": "square", "count": 1, "color": "blue", "position": ["left of", 0]}],
         "prompt": "a photo of a blue square left of a red circle"},
    ]
    for meta in metas:
        for seed in range(5):
            image, objects = render_scene(meta, np.random.default_rng(seed), style=CANONICAL)
            assert evaluate(objects_to_detections(objects), meta)[0]
            for obj in objects:
                assert obj["box"][0] % 4 == 0 and obj["box"][1] % 4 == 0
            colours = {tuple(c) for c in np.asarray(image).reshape(-1, 3)}
            assert (128, 128, 128) in colours
    # same metadata and seed: the same sprite pixels (no jitter)
    a = np.asarray(render_scene(metas[0], np.random.default_rng(1), style=CANONICAL)[0])
    b = np.asarray(render_scene(metas[0], np.random.default_rng(1), style=CANONICAL)[0])
    assert np.array_equal(a, b)

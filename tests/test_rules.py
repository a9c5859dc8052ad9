import pytest

from cotgen.geneval.rules import Detection, Thresholds, evaluate, relative_position, threshold_detections


def det(x1, y1, x2, y2, score=0.95, color=None):
    return Detection((x1, y1, x2, y2), score, color)


def test_relative_position_basic():
    a, b = (0, 40, 10, 50), (40, 40, 50, 50)
    assert relative_position(a, b) == {"left of"}
    assert relative_position(b, a) == {"right of"}
    assert relative_position((40, 0, 50, 10), (40, 40, 50, 50)) == {"above"}
    assert relative_position((40, 60, 50, 70), (40, 0, 50, 10)) == {"below"}


def test_relative_position_diagonal_gives_two_relations():
    assert relative_position((0, 0, 10, 10), (50, 50, 60, 60)) == {"left of", "above"}


def test_relative_position_shrink_removes_close_offsets():
    # centres 3 px apart, boxes 20 wide: shrink 0.1*(20+20)=4 > 3 -> no relation
    assert relative_position((0, 0, 20, 20), (3, 0, 23, 20)) == set()


def test_relative_position_divides_by_unshrunk_length():
    # offset (30, 20); shrink 0.1*(10+10)=2 each -> (28, 18); /|(30,20)|=36.06 -> (0.78, 0.50)
    rels = relative_position((30, 20, 40, 30), (0, 0, 10, 10))
    assert rels == {"right of"}  # dy = 0.499.. is not > 0.5


def test_threshold_counting_uses_09_and_caps_16():
    raw = {"circle": [det(0, 0, 1, 1, s) for s in (0.95, 0.5, 0.91, 0.2)], "square": [det(0, 0, 1, 1, 0.35)]}
    out = threshold_detections(raw, "counting")
    assert [d.score for d in out["circle"]] == [0.95, 0.91] and "square" not in out
    out = threshold_detections(raw, "two_object")
    assert [d.score for d in out["circle"]] == [0.95, 0.91, 0.5] and len(out["square"]) == 1
    many = {"star": [det(0, 0, 1, 1, 0.5 + i / 100) for i in range(30)]}
    assert len(threshold_detections(many, "single_object")["star"]) == 16
    assert len(threshold_detections(many, "single_object", Thresholds(max_objects=3))["star"]) == 3
    assert "star" not in threshold_detections(many, "single_object", Thresholds(threshold=0.9))


def test_threshold_is_strict():
    assert threshold_detections({"a": [det(0, 0, 1, 1, 0.3)]}, "colors") == {}


def test_count_and_exclude():
    meta = {"tag": "counting", "include": [{"class": "star", "count": 3}], "exclude": [{"class": "star", "count": 4}]}
    assert evaluate({"star": [det(0, 0, 1, 1)] * 3}, meta) == (True, "")
    ok, reason = evaluate({"star": [det(0, 0, 1, 1)] * 2}, meta)
    assert not ok and reason == "expected star>=3, found 2"
    ok, reason = evaluate({"star": [det(0, 0, 1, 1)] * 4}, meta)
    assert not ok and reason == "expected star<4, found 4"


def test_color_must_hold_for_all_top_count():
    meta = {"tag": "colors", "include": [{"class": "heart", "count": 2, "color": "red"}]}
    good = {"heart": [det(0, 0, 1, 1, color="red"), det(0, 0, 1, 1, color="red"), det(0, 0, 1, 1, color="blue")]}
    assert evaluate(good, meta)[0]
    bad = {"heart": [det(0, 0, 1, 1, color="red"), det(0, 0, 1, 1, color="blue"), det(0, 0, 1, 1, color="red")]}
    ok, reason = evaluate(bad, meta)
    assert not ok and reason == "expected red heart>=2, found 1 red; and 1 red, 1 blue"


def test_position_against_every_target_object():
    meta = {
        "tag": "position",
        "include": [{"class": "square", "count": 1}, {"class": "circle", "count": 1, "position": ["left of", 0]}],
    }
    assert evaluate({"square": [det(40, 0, 50, 10)], "circle": [det(0, 0, 10, 10)]}, meta) == (True, "")
    ok, reason = evaluate({"square": [det(0, 0, 10, 10)], "circle": [det(40, 0, 50, 10)]}, meta)
    assert not ok and reason == "expected circle left of target, found right of target"
    ok, reason = evaluate({"circle": [det(0, 0, 10, 10)]}, meta)
    assert not ok and reason.splitlines() == ["expected square>=1, found 0", "no target for circle to be left of"]


def test_position_skipped_when_colour_failed():
    meta = {
        "tag": "position",
        "include": [
            {"class": "square", "count": 1},
            {"class": "circle", "count": 1, "color": "red", "position": ["left of", 0]},
        ],
    }
    ok, reason = evaluate({"square": [det(0, 0, 10, 10)], "circle": [det(40, 0, 50, 10, color="blue")]}, meta)
    assert not ok and reason.count("\n") == 0 and "expected red circle" in reason


def test_detection_validates():
    with pytest.raises(ValueError, match="x2 >= x1"):
        Detection((10, 0, 0, 10), 0.5)
    with pytest.raises(ValueError, match="ten"):
        Detection((0, 0, 1, 1), 0.5, color="grey")

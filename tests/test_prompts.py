import json

import pytest

from cotgen.world.prompts import (
    build_geneval_prompts,
    build_shapes_eval_set,
    build_shapes_train_set,
    make_plural,
    with_article,
)
from cotgen.world.vocab import SHAPES


def test_reproduces_official_geneval_prompts_line_for_line(geneval_data):
    names = [line.strip() for line in (geneval_data / "object_names.txt").read_text().splitlines() if line.strip()]
    ours = build_geneval_prompts(names, seed=43, n=100)
    ref = [json.loads(line) for line in (geneval_data / "evaluation_metadata.jsonl").read_text().splitlines()]
    assert len(ours) == len(ref) == 553
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert a == b, f"line {i + 1} differs"


def test_another_seed_gives_another_set(geneval_data):
    names = [line.strip() for line in (geneval_data / "object_names.txt").read_text().splitlines() if line.strip()]
    assert build_geneval_prompts(names, seed=44) != build_geneval_prompts(names, seed=43)


def test_articles_and_plurals():
    assert with_article("apple") == "an apple" and with_article("cross") == "a cross"
    assert make_plural("cross") == "crosses" and make_plural("bench") == "benchs" and make_plural("star") == "stars"


def test_shapes_eval_set_is_geneval_procedure_over_shapes():
    ev = build_shapes_eval_set()
    tags = {s["tag"] for s in ev}
    assert tags == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    assert sum(s["tag"] == "single_object" for s in ev) == len(SHAPES)
    assert len({json.dumps(s, sort_keys=True) for s in ev}) == len(ev)
    assert ev == build_shapes_eval_set()  # deterministic


def test_training_set_is_disjoint_and_covers_counts():
    ev = build_shapes_eval_set()
    train = build_shapes_train_set(ev, 3000)
    assert len(train) == 3000
    assert not {s["prompt"] for s in train} & {s["prompt"] for s in ev}
    assert len({s["prompt"] for s in train}) == len(train)
    counts = {inc["count"] for s in train for inc in s["include"]}
    assert counts == {1, 2, 3, 4}
    for s in train:
        if s["tag"] == "counting":
            assert s["exclude"][0]["count"] == s["include"][0]["count"] + 1


def test_training_set_size_errors():
    ev = build_shapes_eval_set()
    with pytest.raises(ValueError, match=">= 1"):
        build_shapes_train_set(ev, 0)

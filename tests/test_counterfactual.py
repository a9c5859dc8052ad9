"""Colour-word counterfactuals of the judge's data (cotgen/reward/counterfactual.py):
GenEval's wording, the evaluator's labels, the exclusions, and how they enter training."""

import hashlib

import numpy as np
import pytest
import torch

from cotgen.geneval.rules import Detection
from cotgen.reward.counterfactual import (
    color_counterfactuals, judge_counterfactuals, recolored_metadata,
)
from cotgen.reward.data import Trajectories, judge_examples
from cotgen.reward.train import train_judge, with_word_rows
from cotgen.world.prompts import PromptBuilder
from cotgen.world.vocab import COLORS, SHAPES
from tests.test_reward import traj  # noqa: F401  (module fixture)


class ColourHashDetector:
    """Finds every shape of the tiny prompts, in a colour decided by the pixels."""

    def detect(self, image):
        h = int.from_bytes(hashlib.sha256(image.tobytes()).digest()[:2], "little")
        return {s: [Detection(box=(1, 1, 10, 10), score=0.9, color=COLORS[(h + k) % len(COLORS)])]
                for k, s in enumerate(SHAPES[:6])}


def test_recolored_metadata_words_prompts_as_genevals_builder():
    builder, rng = PromptBuilder(SHAPES), np.random.default_rng(0)
    for _ in range(20):
        one, two = builder.colors_sample(rng), builder.color_attr(rng)
        assert recolored_metadata([one["include"][0]["class"]], [one["include"][0]["color"]]) == one
        assert recolored_metadata([i["class"] for i in two["include"]], [i["color"] for i in two["include"]]) == two
    assert recolored_metadata(["circle"], ["orange"])["prompt"] == "a photo of an orange circle"
    with pytest.raises(ValueError, match="distinct colours"):
        recolored_metadata(["star", "cross"], ["red", "red"])
    with pytest.raises(ValueError, match="one or two distinct objects"):
        recolored_metadata(["star", "cross", "heart"], ["red", "blue", "pink"])


def _paths(*metas):
    return Trajectories(torch.zeros(len(metas), 16, dtype=torch.long),
                        [{"prompt": m["prompt"], "tag": m["tag"], "metadata": m, "split": "train"} for m in metas], [], 4)


def _det(**objects):
    return {name: [Detection(box=box, score=0.9, color=color)] for name, (color, box) in objects.items()}


def test_counterfactuals_ask_about_what_the_image_shows_and_relabel_by_the_rules():
    t = _paths(
        {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}], "prompt": "a photo of a red circle"},
        {"tag": "two_object", "include": [{"class": "star", "count": 1}, {"class": "cross", "count": 1}],
         "prompt": "a photo of a star and a cross"},
        {"tag": "counting", "include": [{"class": "square", "count": 3}], "exclude": [{"class": "square", "count": 4}],
         "prompt": "a photo of three squares"},
        {"tag": "single_object", "include": [{"class": "heart", "count": 1}], "prompt": "a photo of a heart"},
        {"tag": "two_object", "include": [{"class": "star", "count": 1}, {"class": "heart", "count": 1}],
         "prompt": "a photo of a star and a heart"},
    )
    det = {0: _det(circle=("blue", (0, 0, 9, 9))),
           1: _det(star=("red", (0, 0, 9, 9)), cross=("blue", (20, 20, 29, 29))),
           2: _det(square=("pink", (0, 0, 9, 9))),   # counting: never rewritten
           3: {},                                    # the asked object is not found: skipped
           4: _det(star=("green", (0, 0, 9, 9)))}    # one of two asked objects missing: skipped
    cf = color_counterfactuals(t, det, exclude_prompts=set(), per_image=3, seed=0)
    by_path = {i: [c for c in cf if c["path"] == i] for i in range(5)}
    assert [len(by_path[i]) for i in range(5)] == [3, 3, 0, 0, 0]
    assert by_path[0][0]["prompt"] == "a photo of a blue circle" and by_path[0][0]["label"]
    assert by_path[0][0]["metadata"]["tag"] == "colors" and by_path[1][0]["metadata"]["tag"] == "color_attr"
    assert by_path[1][0]["prompt"] == "a photo of a red star and a blue cross" and by_path[1][0]["label"]
    assert by_path[1][1]["prompt"] == "a photo of a blue star and a red cross" and not by_path[1][1]["label"]
    assert "expected blue star>=1" in by_path[1][1]["reason"]
    for c in cf:  # only the colours shown are "yes"; never the path's own prompt
        assert c["label"] == (c["prompt"] in {"a photo of a blue circle", "a photo of a red star and a blue cross"})
        assert c["prompt"] != t.paths[c["path"]]["prompt"]
    assert color_counterfactuals(t, det, set(), 3, seed=0) == cf  # seeded
    assert {c["path"] for c in color_counterfactuals(t, det, set(), 3, seed=0, objects=(2,))} == {1}
    excluded = color_counterfactuals(t, det, {"a photo of a blue circle"}, 3, seed=0)
    assert "a photo of a blue circle" not in {c["prompt"] for c in excluded}
    assert color_counterfactuals(t, det, set(), 0) == []
    with pytest.raises(ValueError, match="per_image"):
        color_counterfactuals(t, det, set(), -1)


def test_counterfactual_examples_train_apart_and_are_measured_apart(traj, tmp_path):  # noqa: F811
    gen, t = traj
    ex = judge_examples(t, clarity_boundary=2)
    eval_set = [{"prompt": "a photo of a red circle"}]
    cex, summary = judge_counterfactuals(t, ex, gen.image_tokenizer, ColourHashDetector(), eval_set, per_image=2, progress=False)
    held_prompts = {p["prompt"] for p in t.paths if p["split"] == "heldout"}
    assert cex and all(e["counterfactual"] and e["question"] in ("outcome", "potential") for e in cex)
    assert not {e["prompt"] for e in cex} & {"a photo of a red circle"}
    assert not {e["prompt"] for e in cex if e["split"] == "train"} & held_prompts
    for split in ("train", "heldout"):  # outcome + potential (steps 2, 3) of each counterfactual
        assert summary[split]["examples"] == 3 * summary[split]["counterfactuals"] == sum(e["split"] == split for e in cex)
    texts, rows = with_word_rows(t, ex + cex)
    assert all(texts[e["words_row"]] == e.get("prompt", t.paths[e["path"]]["prompt"]) for e in rows)
    size = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
    _, plain = train_judge(tmp_path / "a", t, ex, gen.image_tokenizer, gen.text_tokenizer, model_size=size, steps=2,
                           batch_size=8, progress=False)
    _, with_cf = train_judge(tmp_path / "b", t, ex + cex, gen.image_tokenizer, gen.text_tokenizer, model_size=size,
                             steps=2, batch_size=8, progress=False)
    assert with_cf["train_examples"] == plain["train_examples"] + summary["train"]["examples"]
    assert with_cf["outcome"]["n"] == plain["outcome"]["n"]  # the held-out outcome metric is the same examples
    assert with_cf["outcome_counterfactual"]["n"] == summary["heldout"]["counterfactuals"] > 0
    assert "outcome_counterfactual" not in plain
    # measured only: no counterfactual to train on, the same held-out ones
    only_held, s2 = judge_counterfactuals(t, ex, gen.image_tokenizer, ColourHashDetector(), eval_set, per_image=0,
                                          heldout_per_image=2, progress=False)
    assert s2["train"]["counterfactuals"] == 0 and only_held == [e for e in cex if e["split"] == "heldout"]

"""Reward-model data (trajectories, ORM / PRM / clarity / potential labels) and the
object-centric judge, on a tiny random generator and a scripted detector."""

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from cotgen.generator.sampling import SamplingConfig
from cotgen.geneval.rules import Detection
from cotgen.reward.data import (
    Trajectories, concat_trajectories, judge_examples, label_images, render_trajectories, sample_trajectories, split_prompts,
)
from cotgen.reward.object_judge import ObjectJudge, ObjectJudgeConfig, ObjectJudgeModel, image_features
from cotgen.reward.train import auroc_by_ranks, auroc_ci95, train_judge
from cotgen.world.render import render_scene
from cotgen.world.vocab import SHAPES
from tests.test_generator import tiny_generator

PROMPTS = [
    {"tag": "single_object", "include": [{"class": s, "count": 1}], "prompt": f"a photo of a {s}"} for s in SHAPES[:6]
]


class HashDetector:
    """Sees the prompt's object in about half of the images (decided by the pixels)."""

    def detect(self, image):
        h = int.from_bytes(hashlib.sha256(image.tobytes()).digest()[:2], "little")
        dets = {s: [] for s in SHAPES}
        if h % 2:
            dets[SHAPES[(h // 2) % 6]].append(Detection(box=(1, 1, 10, 10), score=0.9, color="red"))
        return dets


@pytest.fixture(scope="module")
def traj():
    gen = tiny_generator()
    cfg = SamplingConfig(n=1, cfg_scale=1.0, tokens_per_step=16)
    return gen, sample_trajectories(gen, HashDetector(), PROMPTS, paths_per_prompt=4, sampling=cfg,
                                    heldout_fraction=0.34, prm_steps=[2], prm_rollouts=3, progress=False)


def test_split_is_seeded_and_disjoint():
    prompts = [f"p{i}" for i in range(20)] * 2
    a, b = split_prompts(prompts, 0.25, 0), split_prompts(prompts, 0.25, 0)
    assert a == b and sum(v == "heldout" for v in a.values()) == 5
    assert split_prompts(prompts, 0.25, 1) != a
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_prompts(prompts, 1.0, 0)


def test_trajectories_and_labels(traj, tmp_path):
    gen, t = traj
    assert t.tokens.shape == (24, gen.num_image_tokens) and t.num_steps == 4
    assert {p["split"] for p in t.paths} == {"train", "heldout"}
    for prompt in {p["prompt"] for p in t.paths}:  # a prompt's paths share a split
        assert len({p["split"] for p in t.paths if p["prompt"] == prompt}) == 1
    assert 0 < sum(p["correct"] for p in t.paths) < 24
    # PRM: the first path of each prompt, from step 2, k = 3
    assert len(t.prm) == 6 and all(r["step"] == 2 and 0 <= r["rollouts_correct"] <= 3 for r in t.prm)
    assert all(r["correct"] == (r["rollouts_correct"] > 0) for r in t.prm)
    t.save(tmp_path)
    back = Trajectories.load(tmp_path)
    assert torch.equal(back.tokens, t.tokens) and back.paths == t.paths and back.prm == t.prm
    with pytest.raises(FileNotFoundError, match="prm.jsonl"):
        (tmp_path / "prm.jsonl").unlink()
        Trajectories.load(tmp_path)


def test_more_heldout_paths_leave_the_training_data_alone(traj):
    gen, t = traj
    cfg = SamplingConfig(n=1, cfg_scale=1.0, tokens_per_step=16)
    more = sample_trajectories(gen, HashDetector(), PROMPTS, paths_per_prompt=4, sampling=cfg, heldout_fraction=0.34,
                               prm_steps=[2], prm_rollouts=3, progress=False, heldout_paths_per_prompt=7)
    n = len(t.paths)  # the first paths, their tokens and the PRM labels are exactly those without extra paths
    assert more.paths[:n] == t.paths and torch.equal(more.tokens[:n], t.tokens) and more.prm == t.prm
    held = {p["prompt"] for p in t.paths if p["split"] == "heldout"}
    extra = more.paths[n:]
    assert len(extra) == 3 * len(held) and {p["prompt"] for p in extra} == held
    assert all(p["split"] == "heldout" and p["candidate"] in (4, 5, 6) for p in extra)
    train = [e for e in judge_examples(t, 2, steps_per_path=2) if e["split"] == "train"]
    assert [e for e in judge_examples(more, 2, steps_per_path=2) if e["split"] == "train"] == train
    with pytest.raises(ValueError, match="heldout_paths_per_prompt"):
        sample_trajectories(gen, HashDetector(), PROMPTS, paths_per_prompt=4, sampling=cfg,
                            heldout_paths_per_prompt=2, progress=False)


def test_tag_paths_per_prompt_adds_paths_to_one_tag(traj):
    gen, t = traj
    cfg = SamplingConfig(n=1, cfg_scale=1.0, tokens_per_step=16)
    two = [{"tag": "two_object", "include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1}],
            "prompt": "a photo of a circle and a square"}]
    more = sample_trajectories(gen, HashDetector(), PROMPTS + two, paths_per_prompt=4, sampling=cfg,
                               heldout_fraction=0.34, progress=False, tag_paths_per_prompt={"two_object": 6},
                               heldout_paths_per_prompt=5)
    counts = {}
    for p in more.paths:
        counts[p["prompt"]] = counts.get(p["prompt"], 0) + 1
    split = {p["prompt"]: p["split"] for p in more.paths}
    assert counts[two[0]["prompt"]] == 6  # its own count, above the held-out top-up (5)
    assert all(counts[m["prompt"]] == (5 if split[m["prompt"]] == "heldout" else 4) for m in PROMPTS)
    # candidate j of a prompt is the same path whatever the number of paths
    row = {(p["prompt"], p["candidate"]): i for i, p in enumerate(t.paths)}
    for i, p in enumerate(more.paths):
        if (p["prompt"], p["candidate"]) in row:
            assert torch.equal(more.tokens[i], t.tokens[row[(p["prompt"], p["candidate"])]])
    with pytest.raises(ValueError, match="tag_paths_per_prompt"):
        sample_trajectories(gen, HashDetector(), PROMPTS, paths_per_prompt=4, sampling=cfg, progress=False,
                            tag_paths_per_prompt={"colors": 0})


def test_judge_examples_follow_the_rules(traj):
    _, t = traj
    ex = judge_examples(t, clarity_boundary=2)
    by_q = {q: [e for e in ex if e["question"] == q] for q in ("outcome", "clarity", "potential", "step")}
    assert len(by_q["outcome"]) == 24 and all(e["step"] == 4 for e in by_q["outcome"])
    assert all(e["label"] == (e["step"] >= 2) for e in by_q["clarity"])
    assert len(by_q["clarity"]) == 24 * 3
    # potential from the first clear step on, inheriting the path's outcome label
    assert sorted({e["step"] for e in by_q["potential"]}) == [2, 3]
    assert all(e["label"] == t.paths[e["path"]]["correct"] for e in by_q["potential"])
    assert len(by_q["step"]) == 6
    with pytest.raises(ValueError, match="clarity_boundary"):
        judge_examples(t, clarity_boundary=9)


def test_image_features_find_the_objects():
    meta = {"tag": "counting", "include": [{"class": "star", "count": 3}], "prompt": "a photo of three stars"}
    image, objects = render_scene(meta, np.random.default_rng(0))
    f = image_features([image, Image.new("RGB", (64, 64), (128, 128, 128))], ObjectJudgeConfig())
    assert f["object_mask"][0].sum() == 3 and f["object_mask"][1].sum() == 0
    assert f["crops"].shape == (2, 8, 5, 16, 16)
    assert (f["geometry"][0, :3, :2] > 0).all() and (f["geometry"][0, :3, :2] < 1).all()


def test_train_judge_and_reload(traj, tmp_path):
    gen, t = traj
    ex = judge_examples(t, clarity_boundary=2)
    judge, metrics = train_judge(tmp_path, t, ex, gen.image_tokenizer, gen.text_tokenizer,
                                 model_size={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                                             "intermediate_size": 32},
                                 steps=3, batch_size=8, progress=False)
    assert metrics["heldout_examples"] > 0 and {"outcome", "clarity", "potential"} <= metrics.keys()
    assert 0 <= metrics["clarity"]["accuracy"] <= 1
    images = gen.decode(t.tokens[:3])
    prompts = [p["prompt"] for p in t.paths[:3]]
    a = judge.score("outcome", prompts, images)
    b = ObjectJudge.from_pretrained(tmp_path).score("outcome", prompts, images)
    assert a.shape == (3,) and ((a >= 0) & (a <= 1)).all()
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_judge_rejects_bad_input(traj):
    gen, _ = traj
    judge = ObjectJudge(ObjectJudgeModel(ObjectJudgeConfig(text_vocab=len(gen.text_tokenizer), hidden_size=16,
                                                           num_attention_heads=2)), gen.text_tokenizer)
    img = Image.new("RGB", (64, 64))
    with pytest.raises(ValueError, match="unknown question 'beauty'"):
        judge.score("beauty", ["a photo of a star"], [img])
    with pytest.raises(ValueError, match="1 prompts but 2 images"):
        judge.score("outcome", ["a photo of a star"], [img, img])
    with pytest.raises(ValueError, match="zebra"):
        judge.score("outcome", ["a photo of a zebra"], [img])
    with pytest.raises(ValueError, match="64x64"):
        judge.score("outcome", ["a photo of a star"], [Image.new("RGB", (32, 32))])


def test_render_trajectories_label_decoded_scenes_and_concatenate(traj):
    gen, t = traj
    metas = [{"tag": "counting", "include": [{"class": "star", "count": 3}], "prompt": "a photo of three stars"},
             PROMPTS[0]]
    r = render_trajectories(gen.image_tokenizer, HashDetector(), metas, near_misses=2, tokens_per_step=16,
                            progress=False)
    assert r.tokens.shape == (6, gen.num_image_tokens) and r.num_steps == t.num_steps
    assert [p["render"] for p in r.paths][::3] == ["scene", "scene"]
    assert {p["split"] for p in r.paths} == {"train"} and {p["source"] for p in r.paths} == {"render"}
    # labelled by the evaluator on the decoded image, not by construction
    decoded = gen.image_tokenizer.decode_images(r.tokens)
    expected = label_images(HashDetector(), decoded, [p["metadata"] for p in r.paths])
    assert [(p["correct"], p["reason"]) for p in r.paths] == expected
    both = concat_trajectories(t, r)
    assert len(both.paths) == len(t.paths) + 6 and both.prm == t.prm
    assert torch.equal(both.tokens[len(t.paths):], r.tokens)
    shifted = concat_trajectories(r, t)
    assert [x["path"] for x in shifted.prm] == [x["path"] + 6 for x in t.prm]
    with pytest.raises(ValueError, match="near_misses"):
        render_trajectories(gen.image_tokenizer, HashDetector(), metas, -1, 16)


def test_perception_targets_follow_the_labeller_and_enter_the_loss():
    from cotgen.world.detector import ShapesDetector

    meta = {"tag": "counting", "include": [{"class": "star", "count": 3}], "prompt": "a photo of three stars"}
    image, _ = render_scene(meta, np.random.default_rng(0))
    labeller = ShapesDetector()  # random weights: any labeller with the world's segmentation
    config = ObjectJudgeConfig(text_vocab=44, hidden_size=16, num_attention_heads=2, intermediate_size=32)
    f = image_features([image], config, labeller)
    dets = labeller.detect(image)
    assert f["shape_targets"].shape == (1, 8, 9) and f["color_targets"].shape == (1, 8, 10)
    np.testing.assert_allclose(f["shape_targets"][0, :3].sum(-1), 1, atol=1e-5)
    assert (f["shape_targets"][0, 3:] == 0).all()  # empty slots carry no target
    # slot order is the detector's component order: same boxes, same colour
    colors = [max(d.color_scores, key=d.color_scores.get) for d in dets[SHAPES[0]]] if dets[SHAPES[0]] else []
    if colors:
        assert [labeller.config.colors[i] for i in f["color_targets"][0, :3].argmax(-1)] == colors
    plain = image_features([image], config)
    assert "shape_targets" not in plain and torch.equal(plain["crops"], f["crops"])
    model = ObjectJudgeModel(config)
    inputs = {k: v for k, v in plain.items()}
    common = dict(words=torch.ones(1, 12, dtype=torch.long), question=torch.tensor([0]), progress=torch.tensor([1.0]),
                  labels=torch.tensor([1]))
    without = model(**inputs, **common).loss
    with_targets = model(**f, **common).loss
    assert with_targets > without  # the perception term is added
    assert torch.equal(model(**inputs, **common).logits, model(**f, **common).logits)  # targets never change scores


def test_auroc_interval_brackets_the_estimate_and_narrows_with_data():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    widths = []
    for positives in (18, 180):
        y = np.r_[np.ones(positives), np.zeros(10 * positives)].astype(int)
        s = rng.normal(size=len(y)) + 1.5 * y
        low, high = auroc_ci95(y, s)
        assert low < roc_auc_score(y, s) < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2
    assert auroc_ci95(np.array([1, 1, 0, 0, 0, 0, 0, 0]), rng.normal(size=8)) is None  # too few of a label


def test_auroc_by_ranks_is_sklearns_auroc_for_every_resample():
    from scipy.stats import bootstrap
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    y = (rng.random((20, 30)) < 0.3).astype(int)
    s = np.round(rng.normal(size=(20, 30)) + y, 1)  # rounded: ties between and within labels
    both = [0 < row.sum() < len(row) for row in y]
    expected = [roc_auc_score(a, b) if ok else np.nan for a, b, ok in zip(y, s, both)]
    np.testing.assert_allclose(auroc_by_ranks(y, s), expected, rtol=0, atol=1e-12)
    assert np.isnan(auroc_by_ranks(np.ones(5, dtype=int), np.arange(5.0)))  # one label: no AUROC
    # the interval is the bootstrap of sklearn's AUROC, resample for resample
    yy, ss = y.ravel(), s.ravel()

    def one_at_a_time(a, b):
        return roc_auc_score(a, b) if 0 < a.sum() < len(a) else np.nan

    slow = bootstrap((yy, ss), one_at_a_time, paired=True, vectorized=False, n_resamples=200,
                     method="percentile", rng=np.random.default_rng(0)).confidence_interval
    assert auroc_ci95(yy, ss, n_resamples=200) == pytest.approx([slow.low, slow.high], abs=1e-12)


def test_perception_agreement_and_the_reflector_share_the_object_tokens():
    from cotgen.reflect.judge import reflector_from_judge
    from cotgen.reward.train import perception_agreement
    from cotgen.world.detector import ShapesDetector

    images = []
    for color in ("red", "blue"):
        meta = {"tag": "colors", "include": [{"class": "star", "count": 1, "color": color}],
                "prompt": f"a photo of a {color} star"}
        images.append(render_scene(meta, np.random.default_rng(0))[0])
    config = ObjectJudgeConfig(text_vocab=44, hidden_size=16, num_attention_heads=2, intermediate_size=32)
    model = ObjectJudgeModel(config).eval()
    f = image_features(images, config, ShapesDetector())
    with torch.no_grad():
        tokens = model.object_tokens(f["crops"], f["geometry"], f["object_mask"])
    obj, shape_logits, color_logits, p = tokens
    assert obj.shape == (2, 8, 16) and shape_logits.shape == (2, 8, 9) and color_logits.shape == (2, 8, 10)
    assert p.shape == (2, 8, 19)
    torch.testing.assert_close(p[..., :9].sum(-1), torch.ones(2, 8))  # shape and colour distributions
    torch.testing.assert_close(p[..., 9:].sum(-1), torch.ones(2, 8))
    # agreement with the detector: 1.0 against the model's own arg-max, counted over real objects only
    own = {**f, "shape_targets": torch.nn.functional.one_hot(shape_logits.argmax(-1), 9).float(),
           "color_targets": torch.nn.functional.one_hot(color_logits.argmax(-1), 10).float()}
    assert perception_agreement(model, own) == {"objects": 2, "shape": 1.0, "color": 1.0}
    wrong = {**own, "color_targets": torch.roll(own["color_targets"], 1, dims=-1)}
    assert perception_agreement(model, wrong)["color"] == 0.0
    reflector = reflector_from_judge(ObjectJudge(model, None))
    with torch.no_grad():
        again = reflector.object_tokens(f["crops"], f["geometry"], f["object_mask"])
        for a, b in zip(again, tokens, strict=True):
            assert torch.equal(a, b)


def test_word_grounding_binds_colour_words_to_the_objects_that_have_them(tmp_path):
    from cotgen.reflect.judge import reflector_from_judge
    from cotgen.reward.object_judge import GROUNDING, percept, word_classes
    from cotgen.tokenizer.text import build_text_tokenizer
    from cotgen.world.vocab import COLORS

    tok = build_text_tokenizer()
    classes = word_classes(tok)
    vocab = tok.get_vocab()
    assert classes[vocab["circle"]] == classes[vocab["circles"]] == SHAPES.index("circle")
    assert classes[vocab["crosses"]] == SHAPES.index("cross")
    assert classes[vocab["blue"]] == len(SHAPES) + 1 + COLORS.index("blue")  # after the junk class
    assert classes[vocab["photo"]] == classes[vocab["three"]] == -1
    with pytest.raises(ValueError, match="lacks the class names"):
        word_classes(tok, shapes=("circle", "dog"))
    with pytest.raises(ValueError, match="word_classes has 3 entries"):
        ObjectJudgeConfig(text_vocab=len(tok), word_classes=[-1, 0, 1])

    config = ObjectJudgeConfig(text_vocab=len(tok), hidden_size=16, num_attention_heads=2, intermediate_size=32,
                               word_classes=classes)
    model = ObjectJudgeModel(config).eval()
    # two objects seen with certainty: a red circle on the left, a blue square on the right
    shape_logits = torch.full((1, 8, 9), -30.0)
    color_logits = torch.full((1, 8, 10), -30.0)
    shape_logits[0, 0, SHAPES.index("circle")] = shape_logits[0, 1, SHAPES.index("square")] = 30.0
    color_logits[0, 0, COLORS.index("red")] = color_logits[0, 1, COLORS.index("blue")] = 30.0
    geometry = torch.zeros(1, 8, 6)
    geometry[0, 0, :2] = torch.tensor([0.25, 0.5])
    geometry[0, 1, :2] = torch.tensor([0.75, 0.5])
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, :2] = True
    judge = ObjectJudge(model, tok)

    p = percept(shape_logits, color_logits)

    def features(prompt):
        g = model.word_grounding(p, geometry, mask, judge.encode_prompts([prompt]))
        assert g.shape == (1, 12, GROUNDING)
        return g[0, -2:]  # the last two words: "<colour> <shape>"

    right = features("a photo of a red circle and a blue square")
    swapped = features("a photo of a blue circle and a red square")
    assert right[1, 3] == pytest.approx(1.0) and swapped[1, 3] == pytest.approx(0.0)  # "square" with "blue" / "red"
    assert right[0, 4] == pytest.approx(1.0) and swapped[0, 4] == pytest.approx(0.0)  # "blue" with "square"
    assert right[:, 1].tolist() == swapped[:, 1].tolist() == [1.0, 1.0]  # each word alone is in the image
    assert right[1, 5] == pytest.approx(0.75)  # where the square is
    mask[0, 1] = False  # the square is gone: nothing matches "square"
    assert features("a photo of a red circle and a blue square")[1, 1] == pytest.approx(0.0, abs=1e-6)
    # the reflector computes the same grounding (it inherits the judge's config)
    assert reflector_from_judge(judge).config.word_classes == classes
    judge.save_pretrained(tmp_path / "judge")
    loaded = ObjectJudge.from_pretrained(tmp_path / "judge").model
    assert loaded.config.word_classes == classes
    words = judge.encode_prompts(["a photo of a red circle and a blue square"])
    torch.testing.assert_close(loaded.word_grounding(p, geometry, mask, words),
                               model.word_grounding(p, geometry, mask, words))

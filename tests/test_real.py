"""Real-model adapters (issue 9) on tiny randomly initialised configs of the real classes:
Janus-Pro (search, DPO), LLaVA-OneVision / Qwen2-VL judges, Mask2Former + CLIP detector,
and the params / missing-model handling. No weights are downloaded."""

import numpy as np
import pytest
import torch
from PIL import Image

from cotgen.generator.sampling import SamplingConfig
from cotgen.geneval.rules import COUNTING_THRESHOLD, evaluate, threshold_detections
from cotgen.search import SearchConfig, search
from tests.test_search import ScriptedJudge

PROMPTS = ["a photo of a computer mouse", "a photo of two red dogs left of a tv remote"]
STEP = 16  # the tiny Janus: 8x8 codes in 4 steps


@pytest.fixture(scope="module")
def janus():
    from cotgen.real.tiny import tiny_janus

    return tiny_janus()


def sampling(n=4, seed=0, cfg_scale=2.0):
    return SamplingConfig(n=n, cfg_scale=cfg_scale, seed=seed, tokens_per_step=STEP)


@pytest.fixture(scope="module")
def full_run(janus):
    """Both prompts, 2 paths each, CFG, run to the end."""
    sampler = janus.stepwise_sampler(PROMPTS, sampling(n=2))
    sampler.run()
    return sampler


# ---------------------------------------------------------------------------- Janus
def test_janus_prompt_in_batch_gives_what_it_gives_alone(janus, full_run):
    batch = full_run
    alone = janus.stepwise_sampler(PROMPTS[1:], sampling(n=2))
    alone.run()
    assert [p.tokens for p in batch.paths if p.prompt_index == 1] == [p.tokens for p in alone.paths]
    assert all(len(p.tokens) == janus.num_image_tokens for p in batch.paths)
    # Janus's CFG: the unconditional row keeps only BOS and <begin_of_image>
    ids = janus.prompt_ids(PROMPTS[:1])[0]
    assert ids[0] == janus.bos_id and ids[-1] == janus.boi_id
    assert set(janus.unconditional(ids)) == {janus.bos_id, janus.boi_id, janus.pad_id}


@torch.no_grad()
def test_janus_kv_cache_matches_recompute_and_drop_frees_rows(janus, full_run):
    s = janus.stepwise_sampler(PROMPTS, sampling(n=1, cfg_scale=0.0))
    s.run()
    codes = torch.tensor([p.tokens for p in s.paths])
    # the sampler's cached logits give the same log-probabilities as one full forward
    full = janus.image_logprobs([PROMPTS[p.prompt_index] for p in s.paths], codes)
    step = janus.stepwise_sampler(PROMPTS, sampling(n=1, cfg_scale=0.0))
    total = torch.zeros(len(step.paths))
    for t in range(janus.num_image_tokens):
        logp = torch.log_softmax(step._next_logits.float().cpu(), -1)
        total += logp[torch.arange(len(step.paths)), codes[:, t]]
        if t == janus.num_image_tokens - 1:
            break
        ids = codes[:, t][:, None]
        step._mask = torch.cat([step._mask, torch.ones(len(ids), 1, dtype=torch.long)], 1)
        logits, _ = janus.forward(janus.embed(codes=ids), step._mask, step._next_pos[:, None], step._cache)
        step._next_pos += 1
        step._next_logits = logits[:, -1]
    torch.testing.assert_close(total, full, rtol=1e-4, atol=1e-3)
    # dropping: rows leave the batch and the cache; survivors continue unchanged
    d = janus.stepwise_sampler(PROMPTS, sampling(n=2))
    d.step()
    d.drop([0, 3])
    assert d.batch_rows == 4 and d._cache.layers[0].keys.shape[0] == 4
    d.run()
    ref = full_run
    assert d.paths[1].tokens == ref.paths[1].tokens and d.paths[2].tokens == ref.paths[2].tokens
    assert [len(p.tokens) for p in d.paths] == [STEP, 64, 64, STEP]
    assert d.paths[0].forward_passes < d.paths[1].forward_passes
    # intermediate image: VQ-decoded, cells not generated yet painted grey
    im = np.asarray(d.images([0])[0])
    assert im.shape == (32, 32, 3)
    assert (im[8:] == 128).all() and not (im[:8] == 128).all()


def test_parm_search_with_janus_end_to_end(janus):
    judge = ScriptedJudge()
    results = search(janus, judge, PROMPTS, sampling(n=4), SearchConfig("parm"))
    assert len(results) == 2
    for r in results:
        assert r.image.size == (32, 32) and len(r.paths) == 4
        survivors = [t for t in r.paths if t.cut_at_step is None]
        assert survivors and r.paths[r.chosen].cut_at_step is None
        assert r.score == max(t.outcome for t in survivors)
        for t in r.paths:
            assert t.clear_step == 1
            if t.cut_at_step is not None:
                assert t.cut_at_step == 1 and t.image_tokens == STEP and t.potential < 0.5
    tokens = sum(r.compute["image_tokens"] for r in results)
    assert tokens < 2 * 4 * janus.num_image_tokens  # paths were cut: compute was saved
    assert {q for q, _ in judge.calls} == {"clarity", "potential", "outcome"}


def test_dpo_step_through_janus(janus, tmp_path):
    from cotgen.align.dpo import dpo_config
    from cotgen.real.janus import JanusGenerator, build_janus_trainer, janus_lora_config, pair_margins, train_janus_dpo

    gen = torch.Generator().manual_seed(0)
    pairs = [{"prompt": p, "chosen": torch.randint(0, 64, (64,), generator=gen).tolist(),
              "rejected": torch.randint(0, 64, (64,), generator=gen).tolist()} for p in PROMPTS * 2]
    # trl's per-token log-probabilities through the generation head equal image_logprobs
    import copy

    trainer = build_janus_trainer(JanusGenerator(copy.deepcopy(janus.model), janus.processor), pairs,
                                  dpo_config(tmp_path / "probe", steps=1, batch_size=4, progress=False),
                                  janus_lora_config(2, 4))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    chosen, rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    with torch.no_grad():
        expect = janus.image_logprobs([p["prompt"] for p in pairs], torch.tensor([p["chosen"] for p in pairs]))
    torch.testing.assert_close(chosen, expect, rtol=1e-5, atol=1e-3)

    before = pair_margins(janus, pairs)
    aligned, metrics = train_janus_dpo(janus, pairs, tmp_path / "dpo", steps=3, batch_size=4, learning_rate=5e-3,
                                       lora_rank=4, lora_alpha=8, progress=False)
    assert metrics["steps"] == 3 and metrics["log"][0]["loss"] == pytest.approx(np.log(2), abs=1e-4)
    assert metrics["log"][-1]["loss"] < metrics["log"][0]["loss"]
    assert (pair_margins(aligned, pairs) > before).all()
    np.testing.assert_allclose(pair_margins(janus, pairs), before)  # the input model is untouched
    reloaded = JanusGenerator.from_pretrained(tmp_path / "dpo" / "generator")
    np.testing.assert_allclose(pair_margins(reloaded, pairs), pair_margins(aligned, pairs), rtol=1e-5, atol=1e-3)
    assert (tmp_path / "dpo" / "adapter" / "adapter_config.json").is_file()


# ---------------------------------------------------------------------------- judges
def judge_images():
    return [Image.new("RGB", (32, 32), (200, 20, 20)), Image.new("RGB", (48, 40), (20, 20, 200))]


@pytest.mark.parametrize("kind", ["llava_onevision", "qwen2_vl"])
def test_vlm_judge_yes_no_scoring_and_lora_step(kind, tmp_path):
    from cotgen.real.judge import PretrainedVLMJudge
    from cotgen.real.tiny import tiny_llava_onevision, tiny_qwen2vl
    from cotgen.reward.vlm_judge import finetune_vlm_judge

    model, processor = (tiny_llava_onevision if kind == "llava_onevision" else tiny_qwen2vl)()
    judge = PretrainedVLMJudge(model, processor)
    text = judge.prompt_texts("outcome", PROMPTS[:1])[0]
    assert "<|im_start|>assistant" in text and PROMPTS[0] in text
    ims = judge_images()
    scores = judge.score("outcome", PROMPTS, ims)
    assert scores.shape == (2,) and ((scores > 0) & (scores < 1)).all()
    np.testing.assert_allclose(judge.score("outcome", PROMPTS[1:], ims[1:]), scores[1:], rtol=1e-4)  # batch = alone
    # yes/no at the first answer position, summed over spellings, normalised
    inputs = processor(images=ims[:1], text=judge.prompt_texts("outcome", PROMPTS[:1]), return_tensors="pt")
    with torch.no_grad():
        p = model(**inputs).logits[0, -1].float().softmax(-1)
    yes, no = p[judge.spelling_ids["yes"]].sum(), p[judge.spelling_ids["no"]].sum()
    assert scores[0] == pytest.approx(float(yes / (yes + no)), rel=1e-4)
    examples = [("outcome", PROMPTS[0], ims[0], True), ("outcome", PROMPTS[1], ims[1], False)]
    tuned, metrics = finetune_vlm_judge(judge, examples, tmp_path, lora_rank=2, lora_alpha=4, steps=2, batch_size=2,
                                        learning_rate=1e-2)
    assert metrics["steps"] == 2 and (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert tuned.score("outcome", PROMPTS, ims).shape == (2,)


# ---------------------------------------------------------------------------- detector
def _detector(colors):
    from cotgen.real.detector import Mask2FormerClipDetector
    from cotgen.real.tiny import tiny_mask2former

    model, processor = tiny_mask2former()
    return Mask2FormerClipDetector(model, processor, colors)


def test_geneval_names_include_the_renamed_classes():
    from cotgen.real.detector import GENEVAL_RENAMES, geneval_classnames, geneval_object_names
    from cotgen.real.tiny import coco_thing_names

    names = geneval_object_names()
    assert len(names) == 80 and {"computer mouse", "tv remote", "computer keyboard"} <= set(names)
    assert set(GENEVAL_RENAMES) == {"mouse", "remote", "keyboard"}
    mapped = geneval_classnames(dict(enumerate(coco_thing_names())))
    assert mapped == names  # COCO order, GenEval names
    with pytest.raises(ValueError, match="unknown .*'sofa'"):
        geneval_classnames({**dict(enumerate(coco_thing_names())), 57: "sofa"})


def test_detector_postprocessing_on_synthetic_masks():
    """Known answers: 2 confident computer mice (red / blue), one weak one, a query that is
    both dog and cat, a tv remote, GenEval's score and tight boxes."""
    from cotgen.real.detector import CUTOUT_GREY, COLOR_TEMPLATES, ClipColorClassifier, query_detections
    from cotgen.world.vocab import COLORS

    H = W = 40
    image = Image.new("RGB", (W, H), (0, 200, 0))
    pixels = image.load()
    seen = []

    def colors(crops, classname):  # the crop's dominant non-grey pixel colour
        out = []
        for crop in crops:
            seen.append((classname, crop))
            arr = np.asarray(crop).reshape(-1, 3)
            obj = arr[(arr != 153).any(1)]
            col = "red" if obj[:, 0].mean() > obj[:, 2].mean() else "blue"
            out.append(np.eye(10)[COLORS.index(col)])
        return np.stack(out)

    det = _detector(colors)
    labels = list(det.labels)
    C = len(labels)
    boxes = {0: (2, 2, 10, 8), 1: (20, 4, 30, 12), 2: (5, 20, 12, 30), 3: (25, 25, 35, 35), 4: (14, 30, 18, 38)}
    for (x1, y1, x2, y2), rgb in zip(boxes.values(), [(220, 0, 0), (0, 0, 220), (220, 0, 0), (120, 60, 0), (0, 0, 0)]):
        for x in range(x1, x2):
            for y in range(y1, y2):
                pixels[x, y] = rgb
    Q = 6
    cls = torch.full((Q, C + 1), -20.0)
    masks = torch.full((Q, H, W), -8.0)
    mouse, remote, dog, cat = (labels.index(n) for n in ("computer mouse", "tv remote", "dog", "cat"))

    def obj(q, box, logit):
        x1, y1, x2, y2 = box
        masks[q, y1:y2, x1:x2] = logit

    cls[0, mouse] = 10.0; obj(0, boxes[0], 8.0)   # confident: ~1.0
    cls[1, mouse] = 10.0; obj(1, boxes[1], 8.0)   # confident: ~1.0
    cls[2, mouse] = 10.0; obj(2, boxes[2], 1.0)   # mask quality sigmoid(1) = 0.73: passes 0.3, not 0.9
    cls[3, dog] = 10.0; cls[3, cat] = 10.0 + np.log(0.5); obj(3, boxes[3], 8.0)  # one query, two classes
    cls[4, remote] = 10.0; obj(4, boxes[4], 8.0)
    cls[5, -1] = 10.0; obj(5, boxes[0], 8.0)      # "no object"
    raw = det.detections(image, cls, masks)

    assert {"computer mouse", "tv remote", "dog", "cat"} <= set(raw) and "mouse" not in raw
    mice = sorted(raw["computer mouse"], key=lambda d: -d.score)[:3]
    assert [m.box for m in mice[:2]] in ([(2, 2, 10, 8), (20, 4, 30, 12)], [(20, 4, 30, 12), (2, 2, 10, 8)])
    sig8, sig1 = float(torch.sigmoid(torch.tensor(8.0))), float(torch.sigmoid(torch.tensor(1.0)))
    assert mice[0].score == pytest.approx(sig8, abs=2e-3) and mice[2].score == pytest.approx(sig1, abs=2e-3)
    assert mice[2].box == (5, 20, 12, 30)
    assert {m.color for m in mice[:2]} == {"red", "blue"} and mice[2].color == "red"
    # (query, class) pairs are separate detections: the dog/cat query is both
    assert raw["dog"][0].box == raw["cat"][0].box == (25, 25, 35, 35)
    assert raw["dog"][0].score == pytest.approx(2 * raw["cat"][0].score, rel=0.02)
    # counting threshold 0.9: the weak mouse does not count there; 0.3 elsewhere it does
    two = {"tag": "counting", "include": [{"class": "computer mouse", "count": 2}],
           "exclude": [{"class": "computer mouse", "count": 3}]}
    assert evaluate(threshold_detections(raw, "counting"), two)[0]
    assert len(threshold_detections(raw, "counting")["computer mouse"]) == 2 and COUNTING_THRESHOLD == 0.9
    assert len(threshold_detections(raw, "two_object")["computer mouse"]) == 3
    colour = {"tag": "colors", "include": [{"class": "tv remote", "count": 1, "color": "black"}]}
    assert evaluate(threshold_detections(raw, "colors"), colour) == (False, "expected black tv remote>=1, found 0 black; and 1 blue")
    # colour crops: cut out onto #999, cropped to the box
    crops = {c.size: np.asarray(c) for name, c in seen if name == "computer mouse"}
    red = crops[(8, 6)]
    assert (red == (220, 0, 0)).all()
    weak = crops[(7, 10)]
    assert (weak == (220, 0, 0)).all()
    assert CUTOUT_GREY == "#999"
    # GenEval's three templates per colour, averaged
    assert COLOR_TEMPLATES == ("a photo of a {c} {obj}", "a photo of a {c}-colored {obj}", "a photo of a {c} object")
    texts = ClipColorClassifier.prompts("tv remote")
    assert len(texts) == 10 and texts[0] == ["a photo of a red tv remote", "a photo of a red-colored tv remote",
                                             "a photo of a red object"]
    # a mask that is not a full box: pixels outside it are #999 in the crop
    from cotgen.real.detector import cutout

    m = np.zeros((H, W), dtype=bool)
    m[2:8, 2:10] = True
    m[2, 2] = False
    cut = np.asarray(cutout(image, m, (2, 2, 10, 8)))
    assert tuple(cut[0, 0]) == (153, 153, 153) and tuple(cut[1, 1]) == (220, 0, 0)
    assert len(query_detections(cls, masks, labels, top_k=3)) == 3


def test_detector_end_to_end_with_tiny_mask2former_and_clip():
    from cotgen.real.detector import ClipColorClassifier
    from cotgen.real.tiny import tiny_clip
    from cotgen.world.vocab import COLORS

    clip, clip_processor = tiny_clip()
    classifier = ClipColorClassifier(clip, clip_processor)
    det = _detector(classifier)
    assert len(det.classnames) == 80
    raw = det.detect(Image.new("RGB", (48, 40), (200, 30, 30)))
    dets = [d for ds in raw.values() for d in ds]
    assert dets and set(raw) <= set(det.classnames)
    for d in dets:
        assert 0 <= d.score <= 1 and d.mask.shape == (40, 48)
        x1, y1, x2, y2 = d.box
        assert 0 <= x1 < x2 <= 48 and 0 <= y1 < y2 <= 40
        assert d.color is None or d.color in COLORS
    clf = classifier.classifier("dog")
    assert clf.shape == (16, 10)
    torch.testing.assert_close(clf.norm(dim=0), torch.ones(10))


# ---------------------------------------------------------------------------- config
def test_params_select_world_and_missing_model_names_what_to_fetch(tmp_path, monkeypatch):
    from cotgen.pipeline.params import load_params
    from cotgen.real.config import MissingModelError, RealConfig, resolve_model, sampling_config

    params = load_params()
    cfg = RealConfig.from_params(params)
    assert cfg.world in ("shapes", "coco") and cfg.generator["source"].endswith("Janus-Pro-7B")
    assert sampling_config(cfg).tokens_per_step == 72  # 576 codes in 8 steps
    assert RealConfig.from_params({"real": {"world": "coco"}}).is_real
    with pytest.raises(ValueError, match="real.world"):
        RealConfig.from_params({"real": {"world": "mars"}})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(MissingModelError) as err:
        resolve_model("deepseek-community/Janus-Pro-7B", "Janus-Pro generator", tmp_path / "models")
    msg = str(err.value)
    assert "huggingface-cli download deepseek-community/Janus-Pro-7B" in msg and str(tmp_path / "models") in msg
    with pytest.raises(MissingModelError, match="does not exist"):
        resolve_model(str(tmp_path / "nowhere"), "judge")
    # a local folder is used as it is
    from cotgen.real.tiny import tiny_janus

    tiny_janus().save_pretrained(tmp_path / "janus")
    assert resolve_model(str(tmp_path / "janus" / "model")) == str(tmp_path / "janus" / "model")

"""PARM++ (cotgen/reflect): reflections from the evaluator's reasons, the judge's
reflection head, the self-correction layout and generator, the parm_pp strategy and
`cotgen generate --strategy parm_pp`. Tiny random models throughout (~1 min)."""

import json

import numpy as np
import pytest
import torch

from cotgen.generator.sampling import SamplingConfig, StepwiseSampler
from cotgen.geneval.rules import Detection, evaluate
from cotgen.reflect.corrector import SelfCorrector, corrector_from_generator, train_corrector
from cotgen.reflect.judge import (ObjectReflectorModel, ReflectiveJudge, evaluate_reflections, failure_targets,
                                  reflector_from_judge, train_reflector)
from cotgen.reflect.text import (KINDS, TEMPLATES, Failure, parse_prompt, parse_reason, reflection_examples,
                                 reflection_text, reflection_words)
from cotgen.reward.object_judge import ObjectJudge, ObjectJudgeConfig, ObjectJudgeModel
from cotgen.search import STRATEGIES, SearchConfig, search
from tests.test_generator import tiny_generator

STEP = 16  # the tiny tokenizer's 8x8 grid in 4 steps


def det(box, color=None, score=0.95):
    return Detection(box, score, color)


#: (metadata, detections, expected kind, expected fields): one per failure kind.
CASES = [
    (parse_prompt("a photo of a star and a heart"), {"star": [det((0, 0, 10, 10))]}, "missing",
     {"include": 1, "count_seen": 0}),
    (parse_prompt("a photo of three stars"), {"star": [det((0, 0, 10, 10)), det((20, 0, 30, 10))]}, "count",
     {"include": 0, "count_seen": 2}),
    (parse_prompt("a photo of a red circle"), {"circle": [det((0, 0, 10, 10), "blue")]}, "color",
     {"include": 0, "color_seen": "blue"}),
    (parse_prompt("a photo of a cross left of a square"),
     {"square": [det((0, 0, 10, 10))], "cross": [det((40, 0, 50, 10))]}, "position",
     {"include": 1, "relation_seen": "right of"}),
]


@pytest.mark.parametrize("meta, dets, kind, fields", CASES, ids=[c[2] for c in CASES])
def test_reflection_text_from_evaluator_reasons(meta, dets, kind, fields):
    correct, reason = evaluate(dets, meta)
    assert not correct
    failure = parse_reason(reason, meta)[0]
    assert failure.kind == kind
    for k, v in fields.items():
        assert getattr(failure, k) == v
    texts = {reflection_text(False, reason, meta, np.random.default_rng(s)) for s in range(12)}
    assert len(texts) >= 2  # varied wording
    assert texts == {reflection_text(False, reason, meta, np.random.default_rng(s)) for s in range(12)}  # seeded
    vocab = set(reflection_words())
    for t in texts:
        assert set(t.split()) <= vocab and t != "yes"
        assert meta["include"][failure.include]["class"] in t  # names the failed object
    if kind == "count":
        assert any("two" in t and "three" in t for t in texts)
    if kind == "color":
        assert all("blue" in t and "red" in t for t in texts)
    if kind == "position":
        assert all("left of" in t and "square" in t for t in texts)
    assert reflection_text(True, "", meta) == "yes"


def test_reasons_of_exclude_and_missing_target_and_examples_mix():
    meta = parse_prompt("a photo of two hearts")
    assert meta["exclude"] == [{"class": "heart", "count": 3}]
    dets = {"heart": [det((i * 12, 0, i * 12 + 10, 10)) for i in range(3)]}
    assert parse_reason(evaluate(dets, meta)[1], meta)[0] == Failure("count", 0, count_seen=3)
    pos = parse_prompt("a photo of a cross left of a square")
    kinds = [f.kind for f in parse_reason(evaluate({"cross": [det((0, 0, 5, 5))]}, pos)[1], pos)]
    assert kinds == ["missing", "missing"]
    paths = [{"split": "train", "correct": i < 5, "reason": "" if i < 5 else "expected star>=1, found 0",
              "metadata": parse_prompt("a photo of a star")} for i in range(25)]
    ex = reflection_examples(paths, negative_fraction=0.8, seed=0)
    assert sum(e["kind"] == "ok" for e in ex) == 5 and len(ex) == 25
    ex = reflection_examples(paths[:10] + paths[20:], negative_fraction=0.8, seed=0)  # 5 yes, 10 no -> 2 yes kept
    assert sum(e["kind"] == "ok" for e in ex) == 2 and {e["text"] for e in ex if e["kind"] == "ok"} == {"yes"}
    assert len({e["text"] for e in reflection_examples(paths, 0.8, 0)}) > 2
    with pytest.raises(ValueError, match="not a GenEval-Shapes prompt"):
        parse_prompt("a painting of a star")
    assert set(TEMPLATES) >= set(KINDS[1:])


@pytest.fixture(scope="module")
def gen():
    return tiny_generator()


def tiny_judge(gen, seed=0):
    torch.manual_seed(seed)
    cfg = ObjectJudgeConfig(text_vocab=len(gen.text_tokenizer), hidden_size=16, num_hidden_layers=1,
                            num_attention_heads=2, intermediate_size=32)
    return ObjectJudge(ObjectJudgeModel(cfg), gen.text_tokenizer)


@pytest.fixture(scope="module")
def traj(gen):
    """Rendered scenes and near misses, labelled by a random-ish detector (reasons of every kind)."""
    from cotgen.reward.data import render_trajectories
    from tests.test_reward import HashDetector

    metas = [parse_prompt(p) for p in ("a photo of three stars", "a photo of a red circle",
                                       "a photo of a cross left of a square", "a photo of a star and a heart",
                                       "a photo of a blue heart and a green square", "a photo of two crosses")]
    t = render_trajectories(gen.image_tokenizer, HashDetector(), metas, near_misses=3, tokens_per_step=STEP,
                            progress=False)
    for i, p in enumerate(t.paths):
        p["split"] = "heldout" if p["prompt"] == metas[-1]["prompt"] else "train"
    return t


def test_reflector_training_lowers_loss_and_reflects(gen, traj, tmp_path):
    judge = tiny_judge(gen)
    ex = reflection_examples(traj.paths, negative_fraction=0.5, seed=0)
    assert {e["kind"] for e in ex} - {"ok"}
    model = reflector_from_judge(judge)
    # the reflector is the judge plus a head: its yes/no answers are the judge's
    from cotgen.reward.object_judge import image_features

    images = gen.image_tokenizer.decode_images(traj.tokens[:4].view(-1, 8, 8))
    feats = image_features(images, model.config)
    words = judge.encode_prompts([p["prompt"] for p in traj.paths[:4]])
    common = dict(words=words, question=torch.zeros(4, dtype=torch.long), progress=torch.ones(4))
    assert torch.allclose(model(**feats, **common).logits, judge.model(**feats, **common).logits)
    trained, metrics = train_reflector(judge, traj, ex, gen.image_tokenizer, steps=30, batch_size=8,
                                       learning_rate=3e-3, progress=False)
    assert metrics["last_loss"] < metrics["first_loss"]
    rj = ReflectiveJudge(judge, trained)
    prompts = [p["prompt"] for p in traj.paths[:4]]
    texts = rj.reflect(prompts, images)
    forced = rj.reflect(prompts, images, force=True)
    assert len(texts) == 4 and all(t != "yes" for t in forced)
    assert all(set(t.split()) <= set(reflection_words()) for t in texts + forced)
    np.testing.assert_allclose(rj.score("outcome", prompts, images), judge.score("outcome", prompts, images))
    rj.save_pretrained(tmp_path / "rj")
    again = ReflectiveJudge.from_pretrained(tmp_path / "rj")
    assert again.reflect(prompts, images, force=True) == forced
    held = [e for e in ex if e["split"] == "heldout"]
    m = evaluate_reflections(rj, traj, held, gen.image_tokenizer)
    assert 0 <= m.get("kind_accuracy", 0) <= 1 and "yes_accuracy" in m
    with pytest.raises(FileNotFoundError, match="reflector"):
        ReflectiveJudge.from_pretrained(tmp_path / "nothing")
    t = failure_targets(Failure("color", 1, color_seen="blue"))
    assert t["kind"] == KINDS.index("color") and t["count"] == -100 and t["include"] == 1
    assert isinstance(trained, ObjectReflectorModel)


@pytest.fixture(scope="module")
def corrector(gen):
    return corrector_from_generator(gen, reflection_len=16)


def test_self_correction_layout_round_trips(gen, corrector):
    g2 = corrector.generator
    T, T2 = gen.text_vocab, g2.text_vocab
    assert T2 > T and g2.codebook_size == gen.codebook_size
    # world words keep their ids; every reflection word is known
    vocab, vocab2 = gen.text_tokenizer.get_vocab(), g2.text_tokenizer.get_vocab()
    assert all(vocab2[w] == i for w, i in vocab.items())
    assert set(reflection_words()) <= set(vocab2)
    # the widened model scores the base layout exactly as the base generator
    codes = torch.randint(0, gen.codebook_size, (2, gen.num_image_tokens))
    prompts = ["a photo of three stars", "a photo of a red circle"]
    with torch.no_grad():
        torch.testing.assert_close(g2.image_logprobs(prompts, codes), gen.image_logprobs(prompts, codes))
    # the reflection block decodes back to its words; the condition is [refl][<boi>][previous]
    text = "there are two stars but the prompt asks for three"
    cond = corrector.condition([text, ""], codes)
    assert cond.shape == (2, corrector.condition_length) == (2, 16 + 1 + gen.num_image_tokens)
    assert g2.text_tokenizer.decode(cond[0, :16].tolist(), skip_special_tokens=True) == text
    assert (cond[1, :16] == g2.pad_id).all() and (cond[:, 16] == g2.boi_id).all()
    assert torch.equal(cond[:, 17:] - T2, codes)
    assert g2.model.config.max_position_embeddings >= gen.prompt_len + corrector.condition_length + 1 + gen.num_image_tokens
    with pytest.raises(ValueError, match="at most 16 fit"):
        corrector.encode_reflections([" ".join(["star"] * 17)])
    with pytest.raises(ValueError, match="zebra"):
        corrector.encode_reflections(["the zebra is missing"])
    # sampling with the condition: the KV-cached first step equals a full forward of the layout
    cfg = SamplingConfig(n=2, cfg_scale=0.0, seed=0, tokens_per_step=STEP)
    sampler = StepwiseSampler(g2, prompts, cfg, condition=cond)
    seq = torch.cat([g2.prefix(torch.cat([g2.encode_prompts(prompts), cond], 1))], 1)
    with torch.no_grad():
        full = g2.model(input_ids=seq).logits[:, -1, T2:].float()
    torch.testing.assert_close(sampler._next_logits[::2], full, rtol=1e-4, atol=1e-4)
    sampler.run()
    assert all(len(p.tokens) == gen.num_image_tokens and max(p.tokens) < gen.codebook_size for p in sampler.paths)
    # log-probs of the full layout agree with the sampler's view (teacher forcing)
    new = torch.tensor([sampler.paths[0].tokens, sampler.paths[2].tokens])
    with torch.no_grad():
        lp = corrector.image_logprobs(prompts, [text, ""], codes, new)
    assert lp.shape == (2,) and torch.isfinite(lp).all()
    with pytest.raises(ValueError, match="null_condition"):
        StepwiseSampler(g2, prompts, SamplingConfig(n=1, cfg_scale=1.0, tokens_per_step=STEP), condition=cond,
                        null_condition=cond[:, :5])


def test_aligned_positions_sampler_matches_full_forward(gen, tmp_path):
    """The new image takes the previous image's RoPE positions; the KV-cached sampler passes
    them at every step (its last logits equal a full forward), and they survive a reload."""
    c = corrector_from_generator(gen, reflection_len=16, aligned_positions=True)
    g2, n = c.generator, gen.num_image_tokens
    start = gen.prompt_len + c.condition_length + 1  # first new-image index
    assert g2.position_shift == (start - 1, 1 + n)
    prompts, refl = ["a photo of three stars", "a photo of a red circle"], ["the star is missing", ""]
    codes = torch.randint(0, gen.codebook_size, (2, n))
    sampler = StepwiseSampler(g2, prompts, SamplingConfig(n=1, cfg_scale=0.0, seed=0, tokens_per_step=STEP),
                              condition=c.condition(refl, codes))
    sampler.run()
    new = torch.tensor([p.tokens for p in sampler.paths])
    seq = c.sequences(prompts, refl, codes, new)
    pos = g2.position_ids(0, seq.shape[1])
    assert torch.equal(pos[: start - 1], torch.arange(start - 1))
    assert torch.equal(
        pos[start:], pos[start - 1 - n : start - 1]
    )  # new cell k at previous cell k's position
    with torch.no_grad():  # without a cache, as in training
        full = g2.model(
            input_ids=seq[:, :-1], use_cache=False, **g2.position_kwargs(0, seq.shape[1] - 1, 2)
        ).logits
        plain = g2.model(input_ids=seq[:, :-1], use_cache=False).logits[:, -1, g2.text_vocab :]
        blank = c.sequences(prompts, refl, c.blank_tokens(2), new)  # another previous image
        other = g2.model(
            input_ids=blank[:, :-1], use_cache=False, **g2.position_kwargs(0, seq.shape[1] - 1, 2)
        ).logits
    torch.testing.assert_close(
        sampler._next_logits, full[:, -1, g2.text_vocab :].float(), rtol=1e-4, atol=1e-4
    )
    assert not torch.allclose(full[:, -1, g2.text_vocab :], plain, atol=1e-3)  # the positions are in effect
    assert not torch.allclose(
        full[:, start:], other[:, start:], atol=1e-3
    )  # the new image still reads the previous one
    c.save_pretrained(tmp_path / "aligned")
    again = SelfCorrector.from_pretrained(tmp_path / "aligned")
    assert again.aligned_positions and again.generator.position_shift == g2.position_shift
    with torch.no_grad():
        torch.testing.assert_close(
            again.image_logprobs(prompts, refl, codes, new), c.image_logprobs(prompts, refl, codes, new)
        )
    assert corrector_from_generator(gen, reflection_len=16).generator.position_shift is None


def test_copy_input_sampler_matches_full_forward_and_reloads(gen, tmp_path):
    """The copy input: zero at the start (the widened generator unchanged); once set, the
    KV-cached sampler (with a dropped path, so its rows are reordered) gives a full
    forward's logits, and the copy embedding survives a reload."""
    plain = corrector_from_generator(gen, reflection_len=16, aligned_positions=True)
    c = corrector_from_generator(gen, reflection_len=16, aligned_positions=True, copy_input=True)
    g2, n = c.generator, gen.num_image_tokens
    assert g2.copy_split == gen.prompt_len + c.condition_length and plain.generator.copy_embedding is None
    prompts, refl = ["a photo of three stars", "a photo of a red circle"], ["the star is missing", ""]
    codes = torch.randint(0, gen.codebook_size, (2, n), generator=torch.Generator().manual_seed(0))
    new = codes.roll(1, 1)
    with torch.no_grad():
        torch.testing.assert_close(c.code_logprobs(prompts, refl, codes, new),
                                   plain.code_logprobs(prompts, refl, codes, new))
        torch.nn.init.normal_(g2.copy_embedding.weight, std=1.0)
        moved = c.code_logprobs(prompts, refl, codes, new)
    assert not torch.allclose(moved, plain.code_logprobs(prompts, refl, codes, new), atol=1e-3)
    sampler = StepwiseSampler(g2, prompts, SamplingConfig(n=2, cfg_scale=1.5, seed=0, tokens_per_step=STEP),
                              condition=c.condition(refl, codes), null_condition=c.null_condition(codes))
    sampler.step()
    sampler.drop([0])  # the first prompt's first path
    sampler.run()
    kept = [p for p in sampler.paths if p.alive]
    new = torch.tensor([p.tokens for p in kept])
    rows = [p.prompt_index for p in kept]
    with torch.no_grad():
        cond = c.new_image_logits(c.sequences([prompts[i] for i in rows], [refl[i] for i in rows], codes[rows], new))
        uncond = c.new_image_logits(c.layout(g2.null_prompts(len(rows)), c.encode_reflections([""] * len(rows)),
                                             codes[rows], new))
    torch.testing.assert_close(sampler._guided(), (cond + 1.5 * (cond - uncond))[:, -1].float(), rtol=1e-4, atol=1e-4)
    c.save_pretrained(tmp_path / "copy")
    again = SelfCorrector.from_pretrained(tmp_path / "copy")
    assert again.copy_input and again.generator.copy_split == g2.copy_split
    with torch.no_grad():
        torch.testing.assert_close(again.code_logprobs(prompts, refl, codes, new[:2]),
                                   c.code_logprobs(prompts, refl, codes, new[:2]))
    (tmp_path / "copy" / "copy_embedding.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="copy_embedding"):
        SelfCorrector.from_pretrained(tmp_path / "copy")


def test_copy_input_learns_to_copy(gen, tmp_path):
    """On a pure copy task (right image = previous image, random codes), the copy input
    makes the corrector copy: the held-out right codes get a far higher log p given their
    previous image than given another image."""
    c = corrector_from_generator(gen, reflection_len=16, aligned_positions=True, copy_input=True)
    g, n = c.generator, gen.num_image_tokens
    rng = np.random.default_rng(0)
    prompts = ["a photo of three stars", "a photo of a red circle"]

    def groups(k):
        out = []
        for i in range(k):
            codes = rng.integers(0, g.codebook_size, n).tolist()
            out.append({"prompt": prompts[i % 2], "wrong_tokens": codes, "reflection": "", "right_tokens": codes})
        return out

    trained, m = train_corrector(c, groups(64), tmp_path / "c", lora_rank=2, lora_alpha=4, steps=60, batch_size=8,
                                 learning_rate=3e-2, warmup_steps=0, first_round_fraction=0.0, progress=False)
    held = groups(4)
    prev = torch.tensor([h["wrong_tokens"] for h in held])
    with torch.no_grad():
        own = trained.code_logprobs([h["prompt"] for h in held], [""] * 4, prev, prev).mean()
        other = trained.code_logprobs([h["prompt"] for h in held], [""] * 4, prev.roll(1, 0), prev).mean()
    assert own > other + 2.0, (float(own), float(other))


def test_corrector_training_lowers_loss_and_reloads(corrector, tmp_path):
    g = corrector.generator
    rng = np.random.default_rng(0)
    groups = [{"prompt": p, "wrong_tokens": rng.integers(0, g.codebook_size, g.num_image_tokens).tolist(),
               "reflection": r, "right_tokens": [i % 4 for i in range(g.num_image_tokens)]}
              for p, r in [("a photo of three stars", "there are two stars but the prompt asks for three"),
                           ("a photo of a red circle", "the circle is blue but should be red")]]
    trained, m = train_corrector(corrector, groups, tmp_path / "c", lora_rank=2, lora_alpha=4, steps=30, batch_size=4,
                                 learning_rate=1e-2, warmup_steps=0, progress=False)
    assert m["last_loss"] < m["first_loss"] and m["merge_max_abs_diff"] < 1e-3
    with pytest.raises(ValueError, match="prompt_dropout"):
        train_corrector(corrector, groups, tmp_path / "bad", steps=1, prompt_dropout=1.5, progress=False)
    assert (tmp_path / "c" / "adapter").is_dir()
    again = SelfCorrector.from_pretrained(tmp_path / "c")
    args = ([gr["prompt"] for gr in groups], [gr["reflection"] for gr in groups],
            torch.tensor([gr["wrong_tokens"] for gr in groups]), torch.tensor([gr["right_tokens"] for gr in groups]))
    with torch.no_grad():
        torch.testing.assert_close(again.image_logprobs(*args), trained.image_logprobs(*args))
    with pytest.raises(FileNotFoundError, match="corrector"):
        SelfCorrector.from_pretrained(tmp_path)


class ReflectingJudge:
    """Clarity yes from 25 %, potential yes, outcome a fixed score; reflections scripted."""

    def __init__(self, outcome=0.1):
        self.outcome, self.reflected = outcome, []

    def score(self, question, prompts, images, progress=None):
        if question == "clarity":
            return np.array([float(p >= 0.25) for p in progress])
        return np.full(len(prompts), 0.9 if question == "potential" else self.outcome)

    def reflect(self, prompts, images, force=False):
        self.reflected.append(list(prompts))
        return ["the star is missing" for _ in prompts]


def test_parm_pp_rounds_are_bounded_and_traced(gen, corrector, max_rounds=3):
    assert "parm_pp" in STRATEGIES
    judge = ReflectingJudge(outcome=0.1)  # never accepted: every round runs
    prompts = ["a photo of three stars", "a photo of a red circle"]
    cfg = SamplingConfig(n=2, cfg_scale=1.0, seed=0, tokens_per_step=STEP)
    results = search(gen, judge, prompts, cfg, SearchConfig("parm_pp", max_rounds=max_rounds), keep_steps=True,
                     corrector=corrector)
    for r in results:
        assert len(r.rounds) == max_rounds and r.compute["rounds"] == max_rounds
        assert [rd["round"] for rd in r.rounds] == list(range(1, max_rounds + 1))
        assert all(rd["image"] is not None and rd["reflection"] == "the star is missing" for rd in r.rounds)
        assert r.rounds[0]["condition_reflection"] is None
        assert all(rd["condition_reflection"] == "the star is missing" for rd in r.rounds[1:])
        assert r.image is r.rounds[-1]["image"] and r.tokens == r.rounds[-1]["tokens"]
        assert len(r.paths) == 2 * max_rounds and all(len(rd["steps"]) == 2 for rd in r.rounds)
        assert r.compute["image_tokens"] == sum(rd["compute"]["image_tokens"] for rd in r.rounds)
        trace = json.loads(json.dumps(r.trace()))
        assert len(trace["rounds"]) == max_rounds and "image" not in trace["rounds"][0]
    assert len(judge.reflected) == max_rounds
    # accepted at once: one round, no reflection
    happy = search(gen, ReflectingJudge(outcome=0.9), prompts, cfg, SearchConfig("parm_pp"), corrector=corrector)
    assert all(len(r.rounds) == 1 and r.rounds[0]["accepted"] and r.rounds[0]["reflection"] is None for r in happy)
    # without reflection: regenerated from the previous image with an empty reflection
    bare = search(gen, ReflectingJudge(), prompts[:1], cfg, SearchConfig("parm_pp", max_rounds=2, reflection=False),
                  corrector=corrector)[0]
    assert len(bare.rounds) == 2 and bare.rounds[1]["condition_reflection"] == ""
    one = search(gen, ReflectingJudge(), prompts[:1], cfg, SearchConfig("parm_pp", max_rounds=1), corrector=corrector)[0]
    assert len(one.rounds) == 1 and one.rounds[0]["reflection"] == "the star is missing"
    assert all(r.compute["returned_round"] == max_rounds for r in results)  # final_round "last": the paper's loop
    with pytest.raises(ValueError, match="final_round"):
        search(gen, judge, prompts, cfg, SearchConfig("parm_pp", final_round="first"), corrector=corrector)
    with pytest.raises(ValueError, match="corrector"):
        search(gen, judge, prompts, cfg, SearchConfig("parm_pp"))
    with pytest.raises(ValueError, match="max_rounds"):
        search(gen, judge, prompts, cfg, SearchConfig("parm_pp", max_rounds=0), corrector=corrector)


class FadingJudge(ReflectingJudge):
    """Never accepts; each round's outcome is 0.1 lower than the round before (0.3, 0.2, 0.1)."""

    def score(self, question, prompts, images, progress=None):
        if question == "outcome":
            return np.full(len(prompts), 0.3 - 0.1 * len(self.reflected))
        return super().score(question, prompts, images, progress)


@pytest.mark.parametrize("final_round, returned", [("best", 1), ("last", 3)])
def test_parm_pp_returns_the_best_or_the_last_round(gen, corrector, final_round, returned):
    cfg = SamplingConfig(n=2, cfg_scale=1.0, seed=0, tokens_per_step=STEP)
    r = search(gen, FadingJudge(), ["a photo of three stars"], cfg,
               SearchConfig("parm_pp", max_rounds=3, final_round=final_round), corrector=corrector)[0]
    assert [round(rd["score"], 6) for rd in r.rounds] == [0.3, 0.2, 0.1]
    assert r.compute["returned_round"] == returned and r.score == pytest.approx(r.rounds[returned - 1]["score"])
    assert r.image is r.rounds[returned - 1]["image"] and r.tokens == r.rounds[returned - 1]["tokens"]


def test_cli_generate_parm_pp_shows_rounds(gen, corrector, tmp_path):
    from typer.testing import CliRunner

    from cotgen.cli import app

    gen.save_pretrained(tmp_path / "gen")
    corrector.save_pretrained(tmp_path / "corrector")
    judge = tiny_judge(gen)
    model = reflector_from_judge(judge)
    with torch.no_grad():  # outcome always "no": every round runs
        judge.model.head.bias.copy_(torch.tensor([20.0, -20.0]))
    ReflectiveJudge(judge, model).save_pretrained(tmp_path / "judge")
    out = tmp_path / "out"
    args = ["generate", "a photo of three stars", "-n", "2", "--strategy", "parm_pp", "--generator",
            str(tmp_path / "gen"), "--judge", str(tmp_path / "judge"), "--corrector", str(tmp_path / "corrector"),
            "--max-rounds", "2", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    trace = json.loads((out / "trace.json").read_text())
    assert trace["strategy"] == "parm_pp" and len(trace["rounds"]) == 2
    assert trace["rounds"][1]["condition_reflection"] == trace["rounds"][0]["reflection"] != "yes"
    assert "round 2" in result.output and "2 round(s)" in result.output
    from PIL import Image

    grid = Image.open(out / "grid.png")
    assert (out / "round1.png").is_file() and (out / "round2.png").is_file() and (out / "chosen.png").is_file()
    assert grid.height > 4 * 8  # 2 rounds x 2 candidates as rows
    bad = CliRunner().invoke(app, args[:-4] + ["--corrector", str(tmp_path / "none"), "--out", str(out)])
    assert bad.exit_code == 2 and "corrector" in bad.output
    assert "<- returned" in result.output and trace["compute"]["returned_round"] in (1, 2)
    odd = CliRunner().invoke(app, args[:-2] + ["--final-round", "Best", "--out", str(tmp_path / "odd")])
    assert odd.exit_code == 2 and "final-round" in odd.output and not (tmp_path / "odd").exists()


def test_reflect_stages_on_the_tiny_pipeline(tiny_run, tmp_path):
    """reflect_data -> reflect_judge -> corrector -> the Table-5 rows, on a copy of the tiny pipeline's root."""
    import copy
    import shutil

    from cotgen.pipeline.stages import run_stage
    from cotgen.reflect.stages import TABLE5

    src, params, _ = tiny_run
    root = tmp_path / "root"
    shutil.copytree(src, root)
    params = copy.deepcopy(params)
    params["reflect"]["eval"].update(max_prompts=6, n=2)
    data = run_stage("reflect_data", params, root)
    assert data["examples"] > 0 and (root / "data/reflect/examples.jsonl").is_file()
    judge = run_stage("reflect_judge", params, root)
    assert "heldout" in judge and (root / "data/reflect/judge/reflector/config.json").is_file()
    if data["groups"] == 0:  # an untrained tiny detector finds few right images: pair wrong paths with others
        from cotgen.reflect.data import write_groups
        from cotgen.reward.data import Trajectories

        t = Trajectories.load(root / "data/reward/trajectories")
        ex = [json.loads(x) for x in (root / "data/reflect/examples.jsonl").read_text().splitlines()]
        wrong = [e for e in ex if e["kind"] != "ok"][:8]
        write_groups(root / "data/reflect/reflections.jsonl", [
            {"prompt": t.paths[e["path"]]["prompt"], "wrong_tokens": t.tokens[e["path"]].tolist(),
             "reflection": e["text"], "right_tokens": t.tokens[(e["path"] + 1) % len(t.paths)].tolist(),
             "metadata": t.paths[e["path"]]["metadata"]} for e in wrong])
    run_stage("corrector", params, root)
    assert SelfCorrector.from_pretrained(root / "data/reflect/corrector").reflection_len == 16
    table = run_stage("reflect_table", params, root)
    assert set(table["rows"]) == set(TABLE5)
    for name in TABLE5:
        m = json.loads((root / f"metrics/geneval_{name}.json").read_text())
        assert {"overall", "tags", "images", "prompts", "n", "image_tokens_per_image"} <= set(m)
        assert m["eval_prompts"] == 6  # one per tag
    assert json.loads((root / "metrics/geneval_parm_pp.json").read_text())["rounds_per_image"] <= 2
    # the same row at another eval section (ablations/dvc.yaml table5_n20): its own files, the main ones untouched
    params["reflect"]["eval_n20"] = {"n": 3}  # overrides of reflect.eval
    assert run_stage("table5_n20_parm_pp", params, root)["n"] == 3
    n20 = json.loads((root / "metrics/geneval_parm_pp_n20.json").read_text())
    assert n20["n"] == 3 and n20["eval_prompts"] == 6  # reflect.eval's subset and rounds, eval_n20's N
    assert n20["rounds_per_image"] <= 2
    assert (root / "data/traces/parm_pp_n20.jsonl").is_file() and (root / "data/samples/parm_pp_n20").is_dir()
    assert json.loads((root / "metrics/geneval_parm_pp.json").read_text())["n"] == 2

    # package_parm_pp: PARM++ added to the promoted model, behind its gate
    from cotgen.pipeline.gate import GateFailedError
    from cotgen.registry import load_verified, promoted_model

    with pytest.raises(FileNotFoundError, match="promote a verified generator first"):
        run_stage("package_parm_pp", params, root)
    run_stage("package", params, root)  # the main job's promotion (tiny root: no bentofile, no Bento)
    base = str(promoted_model().tag)
    gain = table["rows"]["parm_pp"]["overall"] - table["rows"]["parm_pp_corrector_parm"]["overall"]
    params["reflect"]["package"] = {"min_gain": gain + 0.01}
    with pytest.raises(GateFailedError, match="nothing promoted"):
        run_stage("package_parm_pp", params, root)
    assert str(promoted_model().tag) == base and load_verified().corrector is None
    params["reflect"]["package"] = {"min_gain": gain - 0.01}
    record = run_stage("package_parm_pp", params, root)
    assert record["base"] == base and str(promoted_model().tag) == record["promoted"] != base
    verified = load_verified()
    assert isinstance(verified.corrector, SelfCorrector) and isinstance(verified.judge, ReflectiveJudge)
    assert verified.info["parm_pp_overall"] == table["rows"]["parm_pp"]["overall"]
    e = params["reflect"]["eval"]  # the service's parm_pp runs as the gated row did
    assert (verified.search.max_rounds, verified.search.accept_threshold, verified.search.final_round) == (
        e["max_rounds"], e["accept_threshold"], e["final_round"])
    # the judge's own answers are the promoted judge's
    base_judge = load_verified(base).judge
    image = verified.generator.decode(torch.zeros(1, verified.generator.num_image_tokens, dtype=torch.long))[0]
    assert np.allclose(verified.judge.score("outcome", ["a photo of a red circle"], [image], [1.0]),
                       base_judge.score("outcome", ["a photo of a red circle"], [image], [1.0]))
    from safetensors.torch import load_file, save_file

    weights = root / "data/reflect/judge/model/model.safetensors"  # a reflector trained from another judge
    tensors = load_file(str(weights))
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="another judge"):
        run_stage("package_parm_pp", params, root)


def test_vlm_judge_generates_reflections():
    """The real-model route: a VLM judge answers the reflection question in text."""
    from PIL import Image

    from cotgen.reflect.judge import REFLECTION_QUESTION, vlm_reflect, vlm_reflection_rows
    from cotgen.reward.vlm_judge import tiny_llava_judge

    judge = tiny_llava_judge()
    image = Image.new("RGB", (64, 64), (128, 128, 128))
    texts = vlm_reflect(judge, ["a photo of a star", "a photo of two hearts"], [image, image], max_new_tokens=4)
    assert len(texts) == 2 and all(isinstance(t, str) and t for t in texts)
    row = vlm_reflection_rows(["a photo of a star"], [image], ["the star is missing"])[0]
    assert REFLECTION_QUESTION in row["prompt"][0]["content"][1]["text"]
    assert row["completion"][0]["content"][0]["text"] == "the star is missing"

"""Search strategies on a tiny random generator and a scripted judge whose answers are
a fixed function of the image, so that every decision can be checked afterwards."""

import hashlib

import numpy as np
import pytest

from cotgen.generator.sampling import SamplingConfig
from cotgen.search import SearchConfig, search
from tests.test_generator import PROMPTS, tiny_generator


def image_hash(image) -> float:
    """A stable number in [0, 1) from the pixels."""
    return int.from_bytes(hashlib.sha256(image.tobytes()).digest()[:4], "little") / 2**32


class ScriptedJudge:
    """clarity: yes from ``clear_from`` of the image generated; potential / outcome /
    step: ``scale * image_hash``."""

    def __init__(self, clear_from=0.25, scale=1.0):
        self.clear_from, self.scale, self.calls = clear_from, scale, []

    def score(self, question, prompts, images, progress=None):
        self.calls.append((question, len(prompts)))
        if question == "clarity":
            return np.array([float(p >= self.clear_from) for p in progress])
        return np.array([self.scale * image_hash(im) for im in images])


@pytest.fixture(scope="module")
def gen():
    return tiny_generator()


STEP = 16  # the tiny tokenizer's 8x8 grid in 4 steps of 16 tokens


def sampling(n=6, seed=0):
    return SamplingConfig(n=n, cfg_scale=2.0, seed=seed, tokens_per_step=STEP)


def test_parm_cuts_paths_without_potential(gen):
    judge = ScriptedJudge()
    results = search(gen, judge, PROMPTS, sampling(), SearchConfig("parm"))
    full = gen.num_image_tokens
    cut_any = False
    for r in results:
        assert len(r.paths) == 6
        # potentials are hashes of the pixels: when all 6 fall below 0.5 (1 prompt in 64, and which
        # prompts depends on the CPU's float rounding), the fallback keeps the highest one
        kept = max(r.paths, key=lambda t: t.potential) if all(t.potential < 0.5 for t in r.paths) else None
        for t in r.paths:
            assert t.clear_step == 1  # clear from 25 % = after step 1 of 4
            if t.potential < 0.5 and t is not kept:
                cut_any = True
                assert t.cut_at_step == 1 and t.image_tokens == STEP and t.outcome is None
            else:
                assert t.cut_at_step is None and t.image_tokens == full and t.outcome is not None
        survivors = [t for t in r.paths if t.cut_at_step is None]
        assert r.score == max(t.outcome for t in survivors)
        assert r.paths[r.chosen].cut_at_step is None
        assert r.compute["image_tokens"] == sum(t.image_tokens for t in r.paths) < 6 * full
        # one clarity + one potential per path, one outcome per survivor
        assert r.compute["judge_calls"] == 6 + 6 + len(survivors)
    assert cut_any


def test_parm_with_no_potential_left_keeps_lowest_p_no(gen):
    judge = ScriptedJudge(scale=0.4)  # every potential below 0.5
    results = search(gen, judge, PROMPTS, sampling(), SearchConfig("parm"))
    for r in results:
        survivors = [t for t in r.paths if t.cut_at_step is None]
        assert len(survivors) == 1
        assert survivors[0].potential == max(t.potential for t in r.paths)
        assert survivors[0].image_tokens == gen.num_image_tokens
        assert r.paths[r.chosen] is survivors[0]


def test_parm_waits_for_clarity(gen):
    judge = ScriptedJudge(clear_from=0.75)
    results = search(gen, judge, PROMPTS[:1], sampling(), SearchConfig("parm"))
    for t in results[0].paths:
        assert t.clear_step == 3 and t.clarity_calls == 3


def test_best_of_n_picks_highest_outcome_and_spends_all(gen):
    judge = ScriptedJudge()
    results = search(gen, judge, PROMPTS, sampling(), SearchConfig("best_of_n"))
    for r in results:
        outcomes = [t.outcome for t in r.paths]
        assert r.chosen == int(np.argmax(outcomes)) and r.score == max(outcomes)
        assert r.compute["image_tokens"] == 6 * gen.num_image_tokens
        assert image_hash(r.image) == pytest.approx(r.score)


def test_prm_halves_paths_each_step(gen):
    judge = ScriptedJudge()
    results = search(gen, judge, PROMPTS, sampling(n=8), SearchConfig("prm"))
    for r in results:
        cut_steps = sorted(t.cut_at_step for t in r.paths if t.cut_at_step is not None)
        assert cut_steps == [1, 1, 1, 1, 2, 2, 3]  # 8 -> 4 -> 2 -> 1
        finished = [t for t in r.paths if t.cut_at_step is None]
        assert len(finished) == 1 and r.paths[r.chosen] is finished[0]


def test_sample_is_plain_sampling_and_needs_no_judge(gen):
    r = search(gen, None, PROMPTS, sampling(), SearchConfig("sample"))
    assert all(len(x.paths) == 1 and x.score is None for x in r)
    assert all(x.compute["image_tokens"] == gen.num_image_tokens and x.compute["judge_calls"] == 0 for x in r)


def test_search_is_reproducible_and_keeps_steps(gen):
    a = search(gen, ScriptedJudge(), PROMPTS, sampling(seed=3), SearchConfig("parm"), keep_steps=True)
    b = search(gen, ScriptedJudge(), PROMPTS, sampling(seed=3), SearchConfig("parm"))
    for x, y in zip(a, b):
        assert x.chosen == y.chosen and x.image.tobytes() == y.image.tobytes()
        assert [t.potential for t in x.paths] == [t.potential for t in y.paths]
        for cand, t in enumerate(x.paths):
            lived = 4 if t.cut_at_step is None else t.cut_at_step
            assert len(x.steps[cand]) == lived
        assert x.trace()["paths"][0].keys() >= {"clear_step", "potential", "cut_at_step", "outcome", "image_tokens"}


def test_bad_strategy_and_missing_judge(gen):
    with pytest.raises(ValueError, match="unknown strategy 'beam'"):
        search(gen, ScriptedJudge(), PROMPTS, sampling(), SearchConfig("beam"))
    with pytest.raises(ValueError, match="needs a judge"):
        search(gen, None, PROMPTS, sampling(), SearchConfig("parm"))


def test_cli_generate_with_parm_writes_grid_and_trace(gen, tmp_path):
    import json

    from typer.testing import CliRunner

    from cotgen.cli import app
    from cotgen.reward.object_judge import ObjectJudge, ObjectJudgeConfig, ObjectJudgeModel

    gen.save_pretrained(tmp_path / "gen")
    cfg = ObjectJudgeConfig(text_vocab=len(gen.text_tokenizer), hidden_size=16, num_attention_heads=2)
    ObjectJudge(ObjectJudgeModel(cfg), gen.text_tokenizer).save_pretrained(tmp_path / "judge")
    out = tmp_path / "out"
    args = ["generate", "a photo of three stars", "-n", "4", "--strategy", "parm", "--generator",
            str(tmp_path / "gen"), "--judge", str(tmp_path / "judge"), "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    trace = json.loads((out / "trace.json").read_text())
    assert len(trace["paths"]) == 4 and trace["strategy"] == "parm"
    assert (out / "grid.png").is_file() and (out / "chosen.png").is_file()
    bad = CliRunner().invoke(app, args[:4] + ["--strategy", "beam"])
    assert bad.exit_code == 2 and "unknown strategy 'beam'" in bad.output

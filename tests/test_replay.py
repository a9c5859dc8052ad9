"""Search strategies replayed from one recording of all N paths (cotgen/search/replay.py)."""

from __future__ import annotations

import json
import shutil

import pytest

from cotgen.search.replay import calibrate_parm, judge_on_records, read_records, replay

#: three paths, four steps of four tokens; scores after steps 1-3
RECORD = {"num_steps": 4, "tokens_per_step": 4, "paths": [
    {"candidate": 0, "clarity": [0.1, 0.9, 0.9], "potential": [0.0, 0.1, 0.0], "step": [0.9, 0.1, 0.5],
     "outcome": 0.4, "correct": False},
    {"candidate": 1, "clarity": [0.6, 0.9, 0.9], "potential": [0.7, 0.9, 0.0], "step": [0.2, 0.9, 0.5],
     "outcome": 0.9, "correct": True},
    {"candidate": 2, "clarity": [0.1, 0.2, 0.9], "potential": [0.0, 0.0, 0.3], "step": [0.5, 0.5, 0.5],
     "outcome": 0.95, "correct": False},
]}


def test_replay_rules_on_a_scripted_record():
    assert replay(RECORD, "sample", 3) == {"chosen": 0, "correct": False, "image_tokens": 16, "cut": {}}
    assert replay(RECORD, "best_of_n", 3)["chosen"] == 2
    assert replay(RECORD, "best_of_n", 2) == {"chosen": 1, "correct": True, "image_tokens": 32, "cut": {}}
    # PRM halves by step score: path 1 out after step 1, path 0 after step 2
    assert replay(RECORD, "prm", 3) == {"chosen": 2, "correct": False, "image_tokens": 4 + 8 + 16, "cut": {1: 1, 0: 2}}
    # PARM: path 1 clear at step 1 with potential; 0 clear at 2 without (cut); 2 clear at 3 without (cut)
    assert replay(RECORD, "parm", 3) == {"chosen": 1, "correct": True, "image_tokens": 8 + 16 + 12, "cut": {0: 2, 2: 3}}
    # a threshold nobody passes: the last path standing is kept (lowest P(no)) and finishes
    strict = replay(RECORD, "parm", 3, potential_threshold=0.99)
    assert strict["cut"] == {1: 1, 0: 2} and strict["chosen"] == 2 and strict["image_tokens"] == 4 + 8 + 16
    assert replay(RECORD, "parm_top_k", 3, k=1)["cut"] == {0: 2, 2: 3}
    with pytest.raises(ValueError, match="n must be in"):
        replay(RECORD, "best_of_n", 4)
    with pytest.raises(ValueError, match="unknown strategy"):
        replay(RECORD, "beam", 3)


def test_oracle_picks_a_correct_path_when_there_is_one():
    assert replay(RECORD, "oracle", 3) == {"chosen": 1, "correct": True, "image_tokens": 48, "cut": {}}
    assert replay(RECORD, "oracle", 1)["correct"] is False  # path 0 alone is wrong: no ceiling above it


def test_judge_on_records_measures_the_recorded_scores():
    wrong = {**RECORD, "tag": "colors", "paths": [{**p, "correct": not p["correct"]} for p in RECORD["paths"]]}
    out = judge_on_records([{**RECORD, "tag": "counting"}, wrong], ci=False)
    # counting: the correct path (0.9) is outscored by one wrong one (0.95) -> 1/2; colors: 0.4 < 0.95 vs 0.9 -> 1/2
    assert out["outcome_by_tag"]["counting"]["auroc"] == 0.5 and out["outcome_by_tag"]["colors"]["auroc"] == 0.5
    assert out["outcome"]["n"] == 6 and out["outcome"]["yes_rate"] == 0.5
    assert set(out["potential_by_step"]) == {"1", "2", "3"}
    # within a record: the flipped copy's pairs mirror the first's, so 1/2 at every step
    assert out["potential_within_prompt_by_step"] == {"1": 0.5, "2": 0.5, "3": 0.5}
    # one record: after step 2 the correct path's 0.9 beats 0.1 and 0.0; after step 3 its 0.0 ties 0.0 and loses to 0.3
    within = judge_on_records([{**RECORD, "tag": "counting"}], ci=False)["potential_within_prompt_by_step"]
    assert within == {"1": 1.0, "2": 1.0, "3": 0.25}
    assert judge_on_records([{**RECORD, "tag": "counting", "paths": RECORD["paths"][:1]}],
                            ci=False)["potential_within_prompt_by_step"]["1"] is None
    with pytest.raises(ValueError, match="no records"):
        judge_on_records([])


def test_calibration_picks_the_cheapest_parm_setting_that_keeps_best_of_n():
    meta = {"tag": "single_object", "prompt": "a photo of a circle", "include": [{"class": "circle", "count": 1}]}
    records = [{**RECORD, "index": 0, "image": 0, "prompt": meta["prompt"], "tag": meta["tag"],
                "metadata": json.dumps(meta)}]
    strict = {"strategy": "parm", "clarity_threshold": 0.5, "potential_threshold": 0.99}
    loose = {"strategy": "parm", "clarity_threshold": 0.5, "potential_threshold": 0.5}
    # N = 2: best-of-2 is right; the strict threshold is cheaper (20 tokens) but wrong, the loose one right (24)
    out = calibrate_parm(records, 2, [strict, loose])
    assert out["best_of_n"]["overall"] == 1.0 and out["chosen"] == loose and out["reaches_best_of_n"]
    assert [r["image_tokens_per_image"] for r in out["rows"]] == [20.0, 24.0]
    # N = 3: best-of-3 picks a wrong path, so every setting reaches it and the cheapest wins
    assert calibrate_parm(records, 3, [loose, strict])["chosen"] == strict
    # nothing reaches best-of-2: the highest score is taken, and the result says so
    fallback = calibrate_parm(records, 2, [strict])
    assert fallback["chosen"] == strict and not fallback["reaches_best_of_n"]
    with pytest.raises(ValueError, match="parm / parm_top_k"):
        calibrate_parm(records, 2, [{"strategy": "best_of_n"}])
    with pytest.raises(ValueError, match="no PARM settings"):
        calibrate_parm(records, 2, [])
    with pytest.raises(ValueError, match="no records"):
        calibrate_parm([], 2, [loose])


def test_replay_matches_the_real_search(tiny_run, tmp_path):
    """One recording replays sample / best_of_n / prm / parm exactly as search() runs them
    (same chosen candidate, same image tokens), and the replay stage agrees with the
    pipeline's own PARM traces."""
    from cotgen.generator.model import ShapesGenerator
    from cotgen.geneval.metadata import load_metadata
    from cotgen.pipeline.stages import PATHS, run_stage, sampling_config
    from cotgen.reward.object_judge import ObjectJudge
    from cotgen.search import SearchConfig, search

    src, params, _ = tiny_run
    root = tmp_path / "root"
    shutil.copytree(src, root)
    out = run_stage("record_paths", params, root)
    records = read_records(root / PATHS["replay_paths"])
    n = params["replay"]["n"]
    assert out["records"] == len(records) > 0 and all(len(r["paths"]) == n for r in records)
    assert all(len(p["clarity"]) == r["num_steps"] - 1 for r in records for p in r["paths"])

    generator = ShapesGenerator.from_pretrained(root / PATHS["generator"])
    judge = ObjectJudge.from_pretrained(root / PATHS["judge"])
    # every third prompt (each tag is there): a path's seed is (seed, prompt text, candidate),
    # so a prompt draws the same paths in any batch, and the search need not cover them all
    subset = [r for r in records if r["image"] == 0][::3]
    prompts = [r["prompt"] for r in subset]
    assert {r["tag"] for r in subset} == {m["tag"] for m in load_metadata(root / PATHS["eval_prompts"])}
    potentials = sorted(p["potential"][0] for r in subset for p in r["paths"])
    middle = potentials[len(potentials) // 2]  # cuts about half the paths clear after step 1
    cases = [("best_of_n", {}), ("prm", {}), ("parm", {"potential_threshold": middle}),
             ("parm", {"potential_threshold": 0.0})]
    cut_any = False
    for strategy, knobs in cases:
        config = SearchConfig(strategy, clarity_threshold=0.0, **knobs)
        results = search(generator, judge, prompts, sampling_config(params, n), config)
        assert len(results) == len(subset)
        for r, rec in zip(results, subset):
            rep = replay(rec, strategy, n, clarity_threshold=0.0, **knobs)
            assert rep["chosen"] == r.chosen, (strategy, knobs, r.prompt)
            assert rep["image_tokens"] == r.compute["image_tokens"], (strategy, knobs, r.prompt)
            cut_any |= bool(rep["cut"])
    assert cut_any  # the comparison covered cut paths

    summary = run_stage("replay", params, root)
    assert summary["check_parm_traces"]["same_choice"] == 1.0
    assert summary["check_parm_traces"]["same_tokens"] == 1.0
    metrics = json.loads((root / "metrics/search_replay.json").read_text())
    strategies = {row["strategy"] for row in metrics["rows"]}
    assert strategies == {"sample", "best_of_n", "prm", "parm", "parm_top_k", "oracle"}
    assert all(0 <= row["overall"] <= 1 for row in metrics["rows"])
    for n in params["replay"]["ns"]:  # no verifier beats the evaluator's own pick among the same paths
        at_n = [row for row in metrics["rows"] if row["n"] == n and row["strategy"] in ("best_of_n", "prm", "parm")]
        oracle = next(row for row in metrics["rows"] if row["n"] == n and row["strategy"] == "oracle")
        assert all(row["overall"] <= oracle["overall"] + 1e-9 for row in at_n)
    assert metrics["judge_on_eval_paths"]["outcome"]["n"] == len(records) * n
    assert (root / "plots/search_replay.png").stat().st_size > 0
    for strategy in ("sample", "best_of_n", "prm", "parm"):  # issue 4's per-strategy files, the same numbers
        per = json.loads((root / f"metrics/geneval_{strategy}_replay.json").read_text())
        n_expected = 1 if strategy == "sample" else params["replay"]["n"]
        row = next(r for r in metrics["rows"] if r["strategy"] == strategy and r["n"] == n_expected
                   and r.get("potential_threshold") in (None, params["search"]["potential_threshold"]))
        assert (per["n"], per["overall"], per["image_tokens_per_image"]) == (
            n_expected, row["overall"], row["image_tokens_per_image"])
        assert per["images_per_prompt"] == metrics["images_per_prompt"] == params["replay"]["images_per_prompt"]

    # PARM's knobs chosen on the judge's held-out training prompts, then applied to the evaluation recording
    held = run_stage("record_paths_heldout", params, root)
    from cotgen.pipeline.stages import heldout_prompt_lines, parm_settings

    eval_prompts = {m["prompt"] for m in load_metadata(root / PATHS["eval_prompts"])}
    held_prompts = {m["prompt"] for m in heldout_prompt_lines(root)}
    assert held["prompts"] == len(held_prompts) > 0 and not held_prompts & eval_prompts
    assert held["records"] == held["prompts"] * params["replay"]["heldout_images_per_prompt"]
    assert {r["prompt"] for r in read_records(root / PATHS["replay_heldout"])} == held_prompts
    cal = run_stage("calibrate", params, root)
    assert cal["chosen"] in parm_settings(params)
    calibration = json.loads((root / "metrics/search_calibration.json").read_text())
    chosen = next(s for s in calibration["settings"] if {k: s.get(k) for k in cal["chosen"]} == cal["chosen"])
    per = json.loads((root / "metrics/geneval_parm_calibrated_replay.json").read_text())
    assert (per["overall"], per["image_tokens_per_image"]) == (chosen["eval_overall"], chosen["eval_tokens"])
    if calibration["reaches_best_of_n_on_heldout"]:
        assert chosen["heldout_overall"] >= calibration["heldout"]["best_of_n"]["overall"]

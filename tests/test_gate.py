"""The GenEval gate's rules (pure functions) and the stage graph helpers of the flows."""

import pytest

from cotgen.pipeline.gate import GateResult, GateThresholds, check_gate, gate_thresholds
from cotgen.pipeline.orchestrate import downstream, upstream
from cotgen.pipeline.params import load_params

from .conftest import REPO

SCORES = {"overall": 0.3, "tags": {"single_object": 0.7, "counting": 0.2}, "prompts": 60}


def test_thresholds_from_params():
    default = gate_thresholds(load_params(REPO / "params.yaml"))
    assert 0 < default.overall <= 0.241 and default.max_regression_overall is not None  # at or below the baseline
    tiny = gate_thresholds(load_params(REPO / "params.yaml", "tiny"))
    assert tiny.overall == 0 and set(tiny.tags.values()) == {0.0} and tiny.max_regression_overall is None
    with pytest.raises(ValueError, match="gate.overall"):
        gate_thresholds({"gate": {"overall": 1.5}})
    with pytest.raises(ValueError, match="max_regression.tags"):
        gate_thresholds({"gate": {"max_regression": {"tags": -0.1}}})


def test_gate_names_each_failed_threshold():
    t = GateThresholds(overall=0.5, tags={"counting": 0.3, "position": 0.1, "single_object": 0.5})
    r = check_gate(SCORES, t)
    assert not r.passed and len(r.failures) == 3
    assert r.failures[0] == "overall: measured 0.3000, required >= 0.5000 (FAILED)"
    assert any(f.startswith("tag counting: measured 0.2000, required >= 0.3000") for f in r.failures)
    assert any("tag position" in f for f in r.failures) and "position missing" in " ".join(r.notes)
    assert GateResult.from_dict(r.to_dict()) == r and r.message().startswith("gate failed: overall")
    assert check_gate(SCORES, GateThresholds(overall=0.3)).passed  # at the threshold passes


def test_gate_regression_against_promoted_model():
    t = GateThresholds(max_regression_overall=0.05, max_regression_tags=0.1)
    promoted = {"geneval_overall": 0.4, "geneval_counting": 0.25, "geneval_single_object": 0.9, "prompts": 60}
    r = check_gate(SCORES, t, promoted, "cotgen-verified:old")
    assert not r.passed and r.promoted == "cotgen-verified:old"
    assert [f.split(":")[0] for f in r.failures] == ["no regression", "no regression"]
    assert "overall (promoted cotgen-verified:old 0.4000 - 0.05)" in r.failures[0]
    assert "single_object" in r.failures[1]  # 0.7 < 0.9 - 0.1; counting 0.2 >= 0.25 - 0.1 passes
    assert check_gate(SCORES, t, {**promoted, "geneval_overall": 0.34, "geneval_single_object": 0.75}).passed
    other_set = check_gate(SCORES, t, {**promoted, "prompts": 319})
    assert other_set.passed and "no regression check" in other_set.notes[0]
    assert "no promoted model" in check_gate(SCORES, t, None).notes[0]


def test_stage_graph():
    assert upstream(REPO, ["package"])[-3:] == ["search_parm", "gate", "package"]
    assert "sample_baseline" not in upstream(REPO, ["package"]) and upstream(REPO, ["prompts"]) == ["prompts"]
    assert downstream(REPO, ["judge"])[:4] == ["judge", "search_parm", "gate", "package"]
    assert "score_baseline" not in downstream(REPO, ["judge"])
    with pytest.raises(KeyError, match="unknown stage"):
        upstream(REPO, ["nope"])

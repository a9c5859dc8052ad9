"""The main job through DVC and Prefect on the tiny profile: the retrain flow end to end,
DVC caching, the gate, a killed stage, the Dask task runner, the promote flow.

One working copy (``prepare_workdir``: the checkout's source, the tiny profile merged
into its ``params.yaml``, its own git repository and DVC cache) is shared by the module.
To keep the suite fast, the stages up to ``search_parm`` take the outputs of the
session's ``tiny_run`` (same params) and are recorded with ``dvc commit``; the flow then
runs every stage through DVC: DVC finds those up to date and really runs ``gate`` and
``package`` (DVC starts the ``judge`` stage itself in the killed-stage and
corrupted-labels tests).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from cotgen.pipeline.gate import GateFailedError
from cotgen.pipeline.orchestrate import (
    StageFailedError, prepare_workdir, run_dvc, stale_stages, stages_ran, tool_env,
)
from cotgen.registry import promoted_model, save_candidate

from .conftest import ALIGN_STAGES, ORDER, REPO

#: Stages whose outputs come from tiny_run (recorded with `dvc commit`).
SEEDED = ["prompts", "detector", "render_ground_truth", "score_ground_truth", "validate_evaluator", "tokenizer",
          "tokenizer_check", "generator", "sample_baseline", "score_baseline", "trajectories", "judge", "search_parm"]
#: The verified generator's part of the main job (the DPO stages have their own tests).
MAIN = [s for s in ORDER if s not in ALIGN_STAGES]


def _stale(work):
    return [s for s in stale_stages(work) if s in MAIN]


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="module")
def flow_run(tiny_run, tmp_path_factory, harness):
    """The retrain flow, run once on the tiny profile: ``(workdir, remote, state)``."""
    from flows.retrain import retrain

    root, _, _ = tiny_run
    base = tmp_path_factory.mktemp("flows")
    work = prepare_workdir(REPO, "tiny", base / "run")
    for d in ("data", "metrics", "plots"):
        shutil.copytree(root / d, work / d, dirs_exist_ok=True)
    run_dvc(["commit", "--force", *SEEDED], work)
    remote = base / "remote"
    state = retrain(root=str(REPO), profile="tiny", workdir=str(work), remote=str(remote), only=MAIN,
                    return_state=True)
    return work, remote, state


def test_retrain_flow_end_to_end(flow_run):
    from prefect.artifacts import Artifact

    work, remote, state = flow_run
    assert state.is_completed(), state.message
    result = state.result()
    ran = {s["stage"] for s in result["stages"] if s["ran"]}
    assert {"gate", "package"} <= ran and not ran & set(SEEDED)
    promoted = promoted_model()
    assert promoted is not None and str(promoted.tag) == result["promoted"]
    record = json.loads((work / "data/registry.json").read_text())
    parm = json.loads((work / "metrics/geneval_parm.json").read_text())
    assert record["promoted"] == result["promoted"]
    assert promoted.info.metadata["geneval_overall"] == pytest.approx(parm["overall"])
    assert promoted.info.labels["strategy"] == "parm" and promoted.info.labels["gate"] == "passed"
    assert json.loads((work / "metrics/gate.json").read_text())["passed"] is True
    artifact = Artifact.get("cotgen-geneval")
    assert "verified generator (PARM)" in artifact.data and "Gate: passed" in artifact.data
    assert any(p.is_file() for p in remote.rglob("*"))  # dvc push reached the remote


def test_repro_twice_reruns_nothing(flow_run):
    work, _, _ = flow_run
    out = run_dvc(["repro", "package"], work)
    assert stages_ran(out) == []
    assert _stale(work) == []


def _child_running(pid: int, needle: str) -> bool:
    import psutil

    try:
        return any(needle in " ".join(c.cmdline()) for c in psutil.Process(pid).children(recursive=True))
    except psutil.Error:
        return False


def test_killed_stage_reruns_cleanly(flow_run):
    work, _, _ = flow_run
    judge = work / "data/judge"
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "--force", "--single-item", "judge"], cwd=work,
                            env=tool_env(), start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (_child_running(proc.pid, "stage judge") and not judge.exists()):  # DVC removed the old output
        assert proc.poll() is None and time.time() < deadline, "the judge stage never started"
        time.sleep(0.2)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not judge.exists() and "judge" in _stale(work)
    out = run_dvc(["repro", "package"], work)
    # the lock still records the last good judge: DVC restores it from its cache (or reruns the stage)
    assert judge.is_dir() and any(judge.iterdir()), out
    assert _stale(work) == []


def test_failing_gate_keeps_promoted_model(flow_run):
    from flows.retrain import retrain

    work, _, _ = flow_run
    before = promoted_model().tag
    params_file = work / "params.yaml"
    original = params_file.read_text()
    params = yaml.safe_load(original)
    params["gate"]["overall"] = 1.0
    params["gate"]["tags"]["counting"] = 1.0
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        state = retrain(root=str(work), push_outputs=False, only=MAIN, return_state=True)
        assert state.is_failed()
        assert "gate failed" in state.message and "overall: measured" in state.message
        assert "required >= 1.0000" in state.message and "tag counting" in state.message
        with pytest.raises(GateFailedError, match="tag counting"):
            state.result()
        assert promoted_model().tag == before
        gate = json.loads((work / "metrics/gate.json").read_text())
        assert gate["passed"] is False and gate["failed_checks"] == 2
        # plain `dvc repro` refuses too: package fails naming the thresholds, nothing promoted
        with pytest.raises(StageFailedError, match="gate failed"):
            run_dvc(["repro", "package"], work, stage="package")
        assert promoted_model().tag == before
    finally:
        params_file.write_text(original)


def _tree_digest(path):
    import hashlib

    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode() + f.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("boundary", ["labels", "prompts"])
def test_corrupted_data_stops_the_flow_before_anything_downstream(flow_run, boundary):
    """Bad data versioned in DVC (written, then `dvc commit`ted, as a bad pull or a
    faulty producer would leave it): the consuming stage's expectation suite fails, the
    flow ends Failed naming the suite, and the consumer's outputs, the metrics and the
    promoted model stay as they were."""
    from flows.retrain import retrain

    work, _, _ = flow_run
    target = {"labels": work / "data/reward/trajectories/paths.jsonl", "prompts": work / "data/prompts/eval.jsonl"}[boundary]
    downstream = {"labels": work / "data/judge", "prompts": work / "data/renders/ground_truth"}[boundary]
    producer = {"labels": "trajectories", "prompts": "prompts"}[boundary]
    original = target.read_text()
    lines = original.splitlines()
    row = json.loads(lines[1])
    if boundary == "labels":
        row["split"] = "validation"  # not a split
    else:
        row["tag"] = "bogus_tag"
    lines[1] = json.dumps(row)
    metrics = {"labels": work / "metrics/judge.json", "prompts": work / "metrics/geneval_ground_truth.json"}[boundary]
    stale_before = _stale(work)
    before = (_tree_digest(downstream), metrics.read_bytes(), promoted_model().tag)
    target.write_text("\n".join(lines) + "\n")
    run_dvc(["commit", "--force", producer], work)
    try:
        state = retrain(root=str(work), push_outputs=False, only=MAIN, return_state=True)
        assert state.is_failed()
        with pytest.raises(StageFailedError) as failure:
            state.result()
        message = str(failure.value)
        assert boundary in message and ("validation" in message or "bogus_tag" in message), message
        after = (_tree_digest(downstream), metrics.read_bytes(), promoted_model().tag)
        assert after == before
    finally:
        target.write_text(original)
        run_dvc(["commit", "--force", producer], work)
    assert _stale(work) == stale_before  # the workspace is as DVC last recorded it


def test_evaluate_flow_on_local_dask_cluster(tiny_run, harness, tmp_path):
    from dask.distributed import LocalCluster
    from prefect_dask import DaskTaskRunner

    from flows.evaluate import evaluate

    root, _, _ = tiny_run
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp", host="127.0.0.1",
                      dashboard_address=None) as cluster:  # a real scheduler and workers, over TCP on loopback
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        on_dask = evaluate.with_options(task_runner=DaskTaskRunner(address=cluster.scheduler_address))
        summary = on_dask(folder=str(root / "data/samples/baseline"), root=str(root), shards=3, out=str(tmp_path))
        dask_prefixes = set(cluster.scheduler.task_prefixes)
    assert any("score" in p for p in dask_prefixes), dask_prefixes  # the shards ran on the Dask workers
    expected = json.loads((root / "metrics/geneval_baseline.json").read_text())
    assert summary["shards"] == 3 and summary["images"] == expected["images"]
    assert summary["overall"] == pytest.approx(expected["overall"]) and summary["tags"] == pytest.approx(expected["tags"])
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == expected["images"]


def test_evaluate_flow_scores_a_registry_model(flow_run, tmp_path):
    from flows.evaluate import evaluate

    work, _, _ = flow_run
    summary = evaluate(tag=None, strategy="best_of_n", n=2, root=str(work), shards=2, out=str(tmp_path))
    assert summary["strategy"] == "best_of_n" and summary["n"] == 2 and summary["model"].startswith("cotgen-verified:")
    assert summary["image_tokens_per_image"] == 2 * 256
    assert summary["prompts"] == json.loads((work / "metrics/geneval_parm.json").read_text())["prompts"]


def test_promote_flow_gates_candidates(flow_run, tmp_path):
    from cotgen.pipeline.stages import PATHS, sampling_config
    from cotgen.search import SearchConfig
    from flows.promote import promote_candidate

    work, _, _ = flow_run
    params = yaml.safe_load((work / "params.yaml").read_text())
    scores = json.loads((work / "metrics/geneval_parm.json").read_text())
    cand = save_candidate(work / PATHS["generator"], work / PATHS["judge"], sampling_config(params, 3),
                          SearchConfig("parm"), {**scores, "overall": 0.1}, root=work)
    before = promoted_model().tag
    params["gate"]["overall"] = 0.5
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    state = promote_candidate(str(cand), root=str(tmp_path), return_state=True)
    assert state.is_failed() and "overall: measured 0.1000, required >= 0.5000" in state.message
    assert promoted_model().tag == before
    promoted = promote_candidate(str(cand), root=str(tmp_path), force=True)
    assert promoted == f"cotgen-verified:{cand.version}" and str(promoted_model().tag) == promoted

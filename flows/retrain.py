"""The main job as a Prefect flow: every stage of ``dvc.yaml`` through DVC, then the
GenEval gate, then promotion.

Each stage is a Prefect task that runs ``dvc repro STAGE`` (so caching, lineage and
``dvc.lock`` are DVC's: an unchanged stage is skipped by DVC, not by Prefect), logs the
stage's output and updates a progress artifact. Sampling and search stages are retried
once, the push twice. After the evaluation stages the flow publishes a Markdown artifact
(``cotgen-geneval``: GenEval-Shapes per tag of ground truth, baseline and the verified
generator, plus the gate's checks), pushes the DVC outputs to the remote, and then

- gate failed: the flow run ends **Failed** with
  :class:`~cotgen.pipeline.gate.GateFailedError` naming every failed threshold (measured
  vs required); nothing is saved or promoted;
- gate passed: the ``package`` stage saves the candidate, promotes it to
  ``cotgen-verified:latest`` and builds the Bento when ``bentofile.yaml`` exists.

Run it (no Prefect server needed: without ``PREFECT_API_URL`` Prefect starts a temporary
local one; with it, runs are recorded on that server)::

    python flows/retrain.py                      # default profile, in this checkout
    python flows/retrain.py --profile tiny       # tiny profile, in runs/tiny/ (a copy)
    python flows/retrain.py --reflect            # + PARM++ (reflect/dvc.yaml), added to the promoted model
    python flows/retrain.py --serve --cron "0 3 * * *"   # a scheduled deployment

Profiles: DVC reads the top level of ``params.yaml``, so a non-default profile runs in a
working copy whose ``params.yaml`` is the merged profile
(:func:`cotgen.pipeline.orchestrate.prepare_workdir`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# A temporary local server (no PREFECT_API_URL) runs its migrations on first start: on a
# busy 2-core machine that takes longer than Prefect's 20 s default.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no internet here: telemetry only logs errors

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from cotgen.pipeline.gate import GateFailedError
from cotgen.pipeline.orchestrate import (
    RETRY_STAGES, StageFailedError, file_stages, geneval_markdown, pipeline_stages, prepare_workdir, run_dvc,
    stale_stages, stages_ran, upstream, use_remote,
)
from cotgen.pipeline.package import REGISTRY_FILE, read_gate

#: Stages the flow runs itself after the others (their order matters: gate, then package).
FINAL_STAGES = ("gate", "package")
#: PARM++ (issue 8): its stages run after promotion with ``reflect``; the last one adds PARM++ to the promoted model.
REFLECT_DVCFILE = "reflect/dvc.yaml"
#: GenEval summaries shown in the report, if present.
REPORT_ROWS = {"ground truth": "metrics/geneval_ground_truth.json", "baseline (plain sampling)":
               "metrics/geneval_baseline.json", "verified generator (PARM)": "metrics/geneval_parm.json"}


def _keep_uncached_outputs(root: Path, stage: str) -> dict[Path, bytes]:
    """Contents of the stage's ``cache: false`` files (metrics, plots), which DVC deletes
    before running the stage and cannot check out again."""
    import yaml

    spec = yaml.safe_load((root / "dvc.yaml").read_text())["stages"].get(stage, {})
    kept = {}
    for key in ("outs", "metrics", "plots"):
        for entry in spec.get(key, []):
            if isinstance(entry, dict):
                (name, opts), = entry.items()
                if not (opts or {}).get("cache", True) and (root / name).is_file():
                    kept[root / name] = (root / name).read_bytes()
    return kept


@task(name="dvc-repro", task_run_name="repro-{stage}", cache_policy=NO_CACHE)
def repro(root: str, stage: str, force: bool = False) -> dict:
    """``dvc repro STAGE`` (``--force --single-item`` with ``force``); returns which
    stages DVC ran and the seconds it took.

    DVC removes a stage's outputs before running it; if the stage fails (a failed
    expectation suite included), ``dvc checkout STAGE`` puts back the outputs that
    ``dvc.lock`` records (the last good run, from DVC's cache), so a failure loses
    nothing. Raises StageFailedError naming the stage and its error."""
    logger = get_run_logger()
    start = time.time()
    args = ["repro", stage, *(["--force", "--single-item"] if force else [])]
    kept = _keep_uncached_outputs(Path(root), stage)
    try:
        out = run_dvc(args, Path(root), logger.info, stage=stage)
    except StageFailedError:
        for path, data in kept.items():  # metrics / plots with `cache: false`: not in DVC's cache
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        try:
            run_dvc(["checkout", stage], Path(root), logger.info)
            logger.warning(f"stage {stage} failed: its last good outputs (dvc.lock) are back in place")
        except StageFailedError as e:  # nothing recorded yet: nothing to restore
            logger.warning(f"stage {stage} failed and `dvc checkout {stage}` could not restore outputs: {e}")
        raise
    ran = stages_ran(out)
    seconds = round(time.time() - start, 1)
    logger.info(f"stage {stage}: {'ran' if stage in ran else 'unchanged, skipped by DVC'} ({seconds} s)")
    return {"stage": stage, "ran": stage in ran, "ran_stages": ran, "seconds": seconds}


@task(name="dvc-push", retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE)
def push(root: str, remote: str | None = None, stages: list[str] | None = None) -> str:
    """``dvc push`` of the outputs of ``stages`` (None = all) to ``remote`` (None = the
    default remote)."""
    logger = get_run_logger()
    name = use_remote(Path(root), remote)
    out = run_dvc(["push", *(["-r", name] if name else []), *(stages or [])], Path(root), logger.info)
    return out.strip().splitlines()[-1] if out.strip() else ""


@task(name="geneval-report", cache_policy=NO_CACHE)
def report(root: str, with_gate: bool = True) -> str:
    """The Markdown artifact ``cotgen-geneval`` (GenEval table and gate checks)."""
    work = Path(root)
    rows = {name: json.loads((work / f).read_text()) for name, f in REPORT_ROWS.items() if (work / f).is_file()}
    gate = read_gate(work) if with_gate and (work / "metrics/gate.json").is_file() else None
    markdown = geneval_markdown(rows, gate, title=f"GenEval-Shapes ({work})")
    create_markdown_artifact(markdown, key="cotgen-geneval", description="GenEval-Shapes of the retraining run")
    return markdown


def _promoted_present(work: Path) -> str | None:
    """The tag ``data/registry.json`` names, if it is in the BentoML store."""
    import bentoml
    from bentoml.exceptions import NotFound

    record = work / REGISTRY_FILE
    if not record.is_file():
        return None
    tag = json.loads(record.read_text()).get("promoted")
    try:
        return str(bentoml.models.get(tag).tag) if tag else None
    except NotFound:
        return None


def _is_align_stage(name: str) -> bool:
    """A stage of a DPO variant (cotgen.pipeline.stages.ALIGN_VARIANTS)."""
    from cotgen.pipeline.stages import ALIGN_VARIANTS

    return any(name in (f"pairs_{v}", v, f"sample_{v}", f"score_{v}") for v in ALIGN_VARIANTS)


@flow(name="cotgen-retrain", log_prints=True)
def retrain(root: str = ".", profile: str | None = None, workdir: str | None = None, push_outputs: bool = True,
            remote: str | None = None, only: list[str] | None = None, align: bool = False,
            reflect: bool = False) -> dict:
    """Retrain, evaluate, gate and promote.

    Args:
        root: the cotgen checkout.
        profile: a ``params.yaml`` profile (e.g. ``"tiny"``); None = the default
            profile, run in ``root`` itself.
        workdir: the working copy for ``profile`` (default ``<root>/runs/<profile>``).
        push_outputs: ``dvc push`` the outputs (gate failure included).
        remote: DVC remote name, path or URL (None = the default remote of ``.dvc/config``).
        only: run only these stages and what they depend on (e.g. ``["search_parm"]``);
            None = every stage of ``dvc.yaml`` but the DPO variants' (all of them with
            ``align``). The gate and package stages always run.
        align: also run the DPO variants (issue 7: ``pairs_<v>``, ``<v>``, ``sample_<v>``,
            ``score_<v>``); they are not needed by the gate and take about 10 minutes each
            on the default profile.
        reflect: after promotion, also run PARM++ (issue 8: every stage of
            ``reflect/dvc.yaml``: reflection data, the judge's reflection head, the
            self-correction generator, the Table-5 rows, then ``package_parm_pp``, which
            promotes the model with PARM++ added when PARM++ scores at least PARM alone).
            Hours on a 2-core CPU at N = 20. A PARM++ stage that fails or a refused
            PARM++ gate leaves the promoted model as the main job left it.
    Returns:
        ``{"workdir", "stages": [...], "gate": {...}, "promoted": tag, "geneval": overall}``
        (``promoted``: the model with PARM++ when ``reflect`` added it; ``parm_pp_refused``:
        why PARM++'s gate refused, if it did).
    Raises:
        GateFailedError: the gate failed (the flow run ends Failed, message naming the
            failed thresholds); the promoted model is unchanged.
        StageFailedError: a stage failed (e.g. a data validation suite), named with its error.
    """
    logger = get_run_logger()
    work = prepare_workdir(Path(root), profile, Path(workdir) if workdir else None) if profile else Path(root).resolve()
    logger.info(f"cotgen retrain in {work} (profile {profile or 'default'})")
    targets = only or [s for s in pipeline_stages(work) if align or not _is_align_stage(s)]
    wanted = set(upstream(work, [*targets, *FINAL_STAGES]))
    names = [s for s in pipeline_stages(work) if s in wanted and s not in FINAL_STAGES]
    stale = set(stale_stages(work, logger.info))
    total = len(names) + len(FINAL_STAGES)
    progress = create_progress_artifact(0.0, key="cotgen-retrain-progress", description="stages done (%)")
    done = []
    for i, name in enumerate([*names, "gate"]):
        if name in stale:
            stage_task = repro.with_options(retries=1 if name in RETRY_STAGES else 0, retry_delay_seconds=5)
            done.append(stage_task(str(work), name))
        else:
            logger.info(f"stage {name}: up to date (dvc status)")
            done.append({"stage": name, "ran": False, "ran_stages": [], "seconds": 0.0})
        update_progress_artifact(progress, 100.0 * (i + 1) / total)
    verdict = read_gate(work)
    report(str(work))
    if push_outputs:
        push(str(work), remote, names)
    if not verdict.passed:
        raise GateFailedError(f"{verdict.message()} -- nothing promoted; the promoted model stays "
                              f"{verdict.promoted or '(none)'}")
    if "package" in stale or not (work / REGISTRY_FILE).is_file():
        done.append(repro(str(work), "package"))
    if _promoted_present(work) is None:  # DVC's record is up to date but this model store lacks it
        logger.info("the promoted model of data/registry.json is not in this BentoML store: packaging again")
        done.append(repro(str(work), "package", force=True))
    update_progress_artifact(progress, 100.0)
    promoted = _promoted_present(work)
    extra = {}
    if reflect:
        reflect_stages = file_stages(work, REFLECT_DVCFILE)
        for name in reflect_stages:
            try:
                done.append(repro(str(work), name))
            except StageFailedError as e:  # PARM++'s gate refused: the main job's promotion stands
                if not name.endswith(":package_parm_pp"):
                    raise
                logger.warning(f"PARM++ not added to the promoted model {promoted}: {e}")
                extra["parm_pp_refused"] = str(e)
        if push_outputs:
            push(str(work), remote, reflect_stages)
        if "parm_pp_refused" not in extra:
            promoted = json.loads((work / "data/reflect/registry.json").read_text())["promoted"]
            logger.info(f"PARM++ added: {promoted} serves parm_pp")
    parm = json.loads((work / "metrics/geneval_parm.json").read_text())
    logger.info(f"promoted {promoted}: GenEval-Shapes overall {parm['overall']:.3f}")
    return {"workdir": str(work), "stages": done, "gate": verdict.to_dict(), "promoted": promoted,
            "geneval": parm["overall"], **extra}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="cotgen retraining flow (Prefect): DVC stages, gate, promotion")
    ap.add_argument("--root", default=".")
    ap.add_argument("--profile", default=None, help="params.yaml profile, e.g. tiny (runs in a working copy)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--no-push", action="store_true", help="do not `dvc push`")
    ap.add_argument("--remote", default=None, help="DVC remote name, path or URL (default: .dvc/config's)")
    ap.add_argument("--only", nargs="+", help="only these stages and their upstream (then gate and package)")
    ap.add_argument("--align", action="store_true", help="also run the DPO variants (issue 7)")
    ap.add_argument("--reflect", action="store_true",
                    help="after promotion, also run PARM++ (issue 8: reflect/dvc.yaml) and add it to the promoted model")
    ap.add_argument("--serve", action="store_true", help="serve a scheduled deployment instead of running once")
    ap.add_argument("--cron", default="0 3 * * *", help="schedule of --serve (default: 03:00 daily)")
    ap.add_argument("--name", default="cotgen-retrain-nightly", help="deployment name of --serve")
    a = ap.parse_args(argv)
    params = {"root": str(Path(a.root).resolve()), "profile": a.profile, "workdir": a.workdir,
              "push_outputs": not a.no_push, "remote": a.remote, "only": a.only,
              "align": a.align, "reflect": a.reflect}
    if a.serve:
        retrain.serve(name=a.name, cron=a.cron, parameters=params, tags=["cotgen", "retrain"])
        return
    try:
        result = retrain(**params)
    except GateFailedError as e:
        print(f"GATE FAILED: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({k: v for k, v in result.items() if k != "stages"}, indent=2))


if __name__ == "__main__":
    main()

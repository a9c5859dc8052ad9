"""The ``gate`` and ``package`` stages' work: judge the verified generator against the
gate, then save it as a candidate, promote it and build the Bento.

Why the gate stage never raises: DVC records a stage's outputs only when its command
succeeds. ``gate`` therefore always writes its verdict (``metrics/gate.json``, every
check with measured vs required) and exits 0, so the verdict is cached in ``dvc.lock``
and shown by ``dvc metrics show``. ``package`` reads that verdict and raises
:class:`~cotgen.pipeline.gate.GateFailedError` (naming each failed threshold) before it
touches the model store, so ``dvc repro`` and ``flows/retrain.py`` still end in an error
and the promoted model stays as it was.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from cotgen.geneval.report import write_summary
from cotgen.pipeline.gate import GateFailedError, GateResult, check_gate, gate_thresholds

GATE_FILE = "metrics/gate.json"
PACKAGE_FILE = "metrics/package.json"
REGISTRY_FILE = "data/registry.json"
SCORES_FILE = "metrics/geneval_parm.json"
BENTOFILE = "bentofile.yaml"


def run_gate(params: dict, root: Path) -> dict:
    """Check ``metrics/geneval_parm.json`` (the verified generator's GenEval) against
    ``params["gate"]`` and the promoted model; writes and returns ``metrics/gate.json``."""
    from cotgen.registry import promoted_model

    scores = json.loads((root / SCORES_FILE).read_text())
    promoted = promoted_model()
    meta = dict(promoted.info.metadata) if promoted is not None else None
    result = check_gate(scores, gate_thresholds(params), meta, str(promoted.tag) if promoted is not None else None)
    out = {
        **result.to_dict(),
        "failed_checks": len(result.failures),
        "candidate": {"strategy": scores.get("strategy", "parm"), "n": scores.get("n"),
                      "overall": scores["overall"], "prompts": scores.get("prompts")},
    }
    write_summary(root / GATE_FILE, out)
    return out


def read_gate(root: Path) -> GateResult:
    """The verdict the ``gate`` stage wrote."""
    path = root / GATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run the gate stage first (`dvc repro gate`)")
    return GateResult.from_dict(json.loads(path.read_text()))


def _bentoml_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "bentoml"
    return [str(exe)] if exe.is_file() else ["bentoml"]


def build_bento(root: Path, timeout: float = 900) -> str:
    """``bentoml build -f bentofile.yaml`` in ``root``; returns the Bento's tag.

    Raises:
        RuntimeError: the build failed (the message carries bentoml's output tail).
    """
    cmd = [*_bentoml_cmd(), "build", "-f", BENTOFILE, "--output", "tag", "."]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd[1:])}` failed (exit {proc.returncode}):\n{out[-3000:]}")
    for line in proc.stdout.splitlines():
        if line.startswith("__tag__:"):
            return line.split("__tag__:", 1)[1].strip()
    return proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "unknown"


def promote_and_build(params: dict, root: Path, candidate) -> tuple[object, str | None]:
    """Promote ``candidate`` (it becomes ``cotgen-verified:latest``) and, when
    ``bentofile.yaml`` exists and ``package.build_bento`` is not false, build the Bento.
    Returns ``(promoted tag, bento tag or None)``.

    Raises:
        FileNotFoundError: ``package.build_bento: true`` without ``bentofile.yaml``
            (promotion undone).
        RuntimeError: the Bento build failed (promotion undone).
    """
    import bentoml

    from cotgen.registry import promote

    promoted = promote(candidate)
    build = str((params.get("package") or {}).get("build_bento", "auto")).lower()
    bento = None
    if build in ("true", "auto") and (root / BENTOFILE).is_file():
        try:
            bento = build_bento(root)
        except Exception:
            bentoml.models.delete(promoted)
            raise
    elif build == "true":
        bentoml.models.delete(promoted)
        raise FileNotFoundError(f"package.build_bento is true but {root / BENTOFILE} does not exist")
    return promoted, bento


def run_package(params: dict, root: Path) -> dict:
    """Promote the verified generator that passed the gate.

    Saves ``cotgen-candidate:<version>`` (generator + judge + the ``search_parm``
    configuration, GenEval scores in its metadata), promotes it to
    ``cotgen-verified:<version>`` and, when ``bentofile.yaml`` exists (and
    ``package.build_bento`` is not false), builds the Bento; a failed build takes the
    promotion back. Writes ``data/registry.json`` (the promoted tag and its scores) and
    ``metrics/package.json``.

    Raises:
        GateFailedError: the gate failed (nothing is saved or promoted).
        FileNotFoundError: ``package.build_bento: true`` without ``bentofile.yaml``.
        RuntimeError: the Bento build failed (promotion undone).
    """
    from cotgen.pipeline.stages import PATHS, sampling_config
    from cotgen.registry import save_candidate
    from cotgen.search import SearchConfig

    gate = read_gate(root)
    if not gate.passed:
        raise GateFailedError(f"{gate.message()} -- nothing promoted (thresholds: params.yaml `gate`)")
    start = time.time()
    scores = json.loads((root / SCORES_FILE).read_text())
    se = params["search"]
    search = SearchConfig(scores.get("strategy", "parm"), se["clarity_threshold"], se["potential_threshold"])
    sampling = sampling_config(params, se["n"])
    candidate = save_candidate(root / PATHS["generator"], root / PATHS["judge"], sampling, search, scores, root=root,
                               labels={"gate": "passed"})
    promoted, bento = promote_and_build(params, root, candidate)
    record = {
        "promoted": str(promoted),
        "candidate": str(candidate),
        "bento": bento,
        "strategy": search.strategy,
        "n": sampling.n,
        "geneval_overall": scores["overall"],
        "geneval_tags": scores.get("tags", {}),
        "replaced": gate.promoted,
    }
    write_summary(root / REGISTRY_FILE, record)
    metrics = {**record, "gate_passed": True, "bento_built": bento is not None,
               "seconds": round(time.time() - start, 2)}
    write_summary(root / PACKAGE_FILE, metrics)
    return metrics


__all__ = ["GATE_FILE", "PACKAGE_FILE", "REGISTRY_FILE", "build_bento", "promote_and_build", "read_gate", "run_gate",
           "run_package"]

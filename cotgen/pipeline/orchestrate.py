"""What the Prefect flows (``flows/``) need around DVC: running ``dvc`` as a subprocess
with its output in the flow's logs, the stage list of ``dvc.yaml``, working copies for a
params profile, and the task runner (threads, or Dask through prefect-dask).

Profiles: DVC reads the *top level* of ``params.yaml``. A flow run with
``profile="tiny"`` therefore works in a copy of the repository (``runs/<profile>/`` by
default, git-ignored; tracked files copied, ``params.yaml`` replaced by the merged
profile, its own git repository and DVC cache) so that DVC's params, caching and lineage
are those of the profile and the checkout's own ``params.yaml``, ``dvc.lock`` and
``data/`` are never touched.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

#: Stages whose failure may be transient (sampling, search): retried once by the flow.
RETRY_STAGES = frozenset({"sample_baseline", "trajectories", "search_parm"})

_RAN = re.compile(r"Running stage '([^']+)'")
_PROGRESS = re.compile(r"\d+%\|")


class StageFailedError(RuntimeError):
    """A ``dvc repro`` (or other ``dvc``) command failed; the message names the stage and
    carries the error lines of its output (e.g. a data validation report's path)."""


def tool_env() -> dict:
    """The environment for ``dvc`` / ``cotgen`` subprocesses: this interpreter's ``bin``
    first on ``PATH`` (``dvc.yaml``'s ``cotgen stage NAME`` must find this cotgen)."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _error_lines(output: str, limit: int = 30) -> str:
    lines = [ln for ln in output.splitlines() if ln.strip() and not _PROGRESS.search(ln)]
    keys = ("Error", "error", "ERROR", "failed", "Traceback", "report")
    picked = [ln for ln in lines if any(k in ln for k in keys)]
    return "\n".join((picked or lines)[-limit:])


def run_dvc(args: Sequence[str], root: Path, log: Callable[[str], None] | None = None,
            stage: str | None = None, timeout: float | None = None) -> str:
    """Run ``dvc ARGS`` in ``root``; stream its output to ``log`` (progress-bar lines at
    most every 10 s); return the output.

    Raises:
        StageFailedError: non-zero exit (message: the command, the stage and the error lines).
    """
    cmd = [sys.executable, "-m", "dvc", *args]
    proc = subprocess.Popen(cmd, cwd=root, env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, start_new_session=True)
    out: list[str] = []
    last_progress = 0.0
    deadline = time.time() + timeout if timeout else None
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        out.append(line)
        if log is None or not line.strip():
            continue
        if _PROGRESS.search(line):
            if time.time() - last_progress < 10:
                continue
            last_progress = time.time()
        log(line)
        if deadline and time.time() > deadline:
            proc.kill()
    rc = proc.wait()
    text = "\n".join(out)
    if rc != 0:
        what = f"stage {stage!r}" if stage else "dvc"
        raise StageFailedError(f"{what} failed (`dvc {' '.join(args)}` exit {rc}) in {root}:\n{_error_lines(text)}")
    return text


def stages_ran(output: str) -> list[str]:
    """Stages that ``dvc repro`` output says it ran (not skipped as unchanged)."""
    return _RAN.findall(output)


def pipeline_stages(root: Path) -> list[str]:
    """The stages of ``root/dvc.yaml`` in file order (which is an order DVC can run them in)."""
    return list(yaml.safe_load((Path(root) / "dvc.yaml").read_text())["stages"])


def file_stages(root: Path, dvcfile: str) -> list[str]:
    """The stages of another ``dvc.yaml`` (e.g. ``reflect/dvc.yaml``) as ``dvc repro``
    addresses (``reflect/dvc.yaml:reflect_data``), in file order, a one-key ``matrix``
    expanded to ``name@value`` per value.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a matrix of more than one key (not needed so far)."""
    path = Path(root) / dvcfile
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    out = []
    for name, spec in yaml.safe_load(path.read_text())["stages"].items():
        matrix = spec.get("matrix")
        if not matrix:
            out.append(f"{dvcfile}:{name}")
        elif len(matrix) == 1:
            (values,) = matrix.values()
            out += [f"{dvcfile}:{name}@{v}" for v in values]
        else:
            raise ValueError(f"{path}: stage {name} has a matrix of {len(matrix)} keys; only one-key matrices are listed")
    return out


def _paths(entries) -> list[str]:
    out = []
    for e in entries or []:
        out += list(e) if isinstance(e, dict) else [e]
    return [str(p).rstrip("/") for p in out]


def _overlap(a: str, b: str) -> bool:
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def downstream(root: Path, names: Sequence[str]) -> list[str]:
    """``names`` and every stage of ``root/dvc.yaml`` that depends on them, directly or
    through other stages (a dep equal to or inside another stage's out, metric or plot),
    in file order."""
    stages = yaml.safe_load((Path(root) / "dvc.yaml").read_text())["stages"]
    outs = {n: _paths(s.get("outs")) + _paths(s.get("metrics")) + _paths(s.get("plots")) for n, s in stages.items()}
    deps = {n: _paths(s.get("deps")) for n, s in stages.items()}
    picked = set(names)
    for n in stages:  # file order is a topological order
        if n not in picked and any(_overlap(d, o) for m in picked for o in outs[m] for d in deps[n]):
            picked.add(n)
    return [n for n in stages if n in picked]


def upstream(root: Path, names: Sequence[str]) -> list[str]:
    """``names`` and every stage of ``root/dvc.yaml`` they depend on, directly or through
    other stages, in file order (what ``dvc repro NAME`` may run)."""
    stages = yaml.safe_load((Path(root) / "dvc.yaml").read_text())["stages"]
    unknown = [n for n in names if n not in stages]
    if unknown:
        raise KeyError(f"unknown stage(s) {', '.join(unknown)}; dvc.yaml has {', '.join(stages)}")
    outs = {n: _paths(s.get("outs")) + _paths(s.get("metrics")) + _paths(s.get("plots")) for n, s in stages.items()}
    deps = {n: _paths(s.get("deps")) for n, s in stages.items()}
    picked = set(names)
    for n in reversed(list(stages)):
        if n in picked:
            picked |= {m for m in stages if m != n and any(_overlap(d, o) for d in deps[n] for o in outs[m])}
    return [n for n in stages if n in picked]


def stale_stages(root: Path, log: Callable[[str], None] | None = None) -> list[str]:
    """Stages of ``root/dvc.yaml`` that DVC must look at again: those ``dvc status``
    reports changed (deps, params, outs or command) and everything downstream of them.
    The others are up to date and need no ``dvc repro`` call."""
    import json

    proc = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=root, env=tool_env(),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise StageFailedError(f"`dvc status` failed in {root}:\n{_error_lines(proc.stdout + proc.stderr)}")
    status = json.loads(proc.stdout.strip() or "{}")
    names = pipeline_stages(root)
    changed = [n for n in names if n in status or f"dvc.yaml:{n}" in status]
    if log:
        log(f"dvc status: {len(changed)} of {len(names)} stages changed: {', '.join(changed) or 'none'}")
    return downstream(root, changed)


def merged_params_yaml(params_file: Path, profile: str | None) -> str:
    """``params.yaml`` with ``profiles[profile]`` merged into the top level and the
    ``profiles`` section dropped: what DVC must read to run that profile."""
    from cotgen.pipeline.params import load_params

    params = load_params(params_file, profile)
    head = f"# params.yaml of profile {profile!r} (merged by cotgen from {params_file}); DVC reads this file\n"
    return head + yaml.safe_dump(params, sort_keys=False)


def _tracked_files(root: Path) -> list[str] | None:
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return [f for f in out.stdout.decode().split("\0") if f]


#: Pipeline outputs and lineage the checkout tracks in git: a working copy keeps its own.
OUTPUT_PATHS = ("dvc.lock", "ablations/dvc.lock", "data/", "metrics/", "plots/")


def _is_output(path: str) -> bool:
    return any(path == p or (p.endswith("/") and path.startswith(p)) for p in OUTPUT_PATHS)


_GIT = ["git", "-c", "user.name=cotgen", "-c", "user.email=cotgen@localhost", "-c", "commit.gpgsign=false"]


def prepare_workdir(root: Path, profile: str, workdir: Path | None = None) -> Path:
    """A working copy of ``root`` for ``profile`` (see the module docstring): the source
    files git tracks (or would: untracked, not ignored) copied, not the checkout's outputs
    and lineage (``dvc.lock``, ``data/``, ``metrics/``, ``plots/``: the copy's own, from
    earlier runs, are kept with its DVC cache, so DVC reruns only what changed),
    ``params.yaml`` merged for the profile, committed in the copy's own git repository.
    Returns the working copy."""
    root = Path(root).resolve()
    workdir = Path(workdir).resolve() if workdir else root / "runs" / profile
    workdir.mkdir(parents=True, exist_ok=True)
    files = _tracked_files(root)
    if files is None:  # not a git checkout: copy the source, not the outputs or environments
        top = {".git", ".venv", "data", "metrics", "plots", "dvc.lock", "runs", "outputs"}

        def ignore(d: str, names: list[str]) -> list[str]:
            skip = top if Path(d) == root else {"cache", "tmp", "config.local"} if Path(d) == root / ".dvc" else set()
            return [n for n in names if n in skip or n in ("__pycache__", ".pytest_cache")]

        shutil.copytree(root, workdir, dirs_exist_ok=True, ignore=ignore)
    else:
        for f in files:
            if _is_output(f):
                continue
            src, dst = root / f, workdir / f
            if src.is_file():
                dst.parent.mkdir(parents=True, exist_ok=True)
                if not dst.exists() or dst.read_bytes() != src.read_bytes():
                    shutil.copy2(src, dst)
    text = merged_params_yaml(root / "params.yaml", profile)
    if not (workdir / "params.yaml").is_file() or (workdir / "params.yaml").read_text() != text:
        (workdir / "params.yaml").write_text(text)
    if shutil.which("git"):
        if not (workdir / ".git").exists():
            subprocess.run(["git", "init", "-q"], cwd=workdir, check=True)
        outputs = [f":(exclude){p.rstrip('/')}" for p in OUTPUT_PATHS]  # DVC's, not git's
        subprocess.run(["git", "add", "-A", "--", ".", *outputs], cwd=workdir, check=True)
        subprocess.run([*_GIT, "commit", "-q", "--allow-empty", "-m", f"cotgen: profile {profile} of {root}"],
                       cwd=workdir, check=True, capture_output=True)
    else:
        subprocess.run([sys.executable, "-m", "dvc", "config", "--local", "core.no_scm", "true"], cwd=workdir,
                       check=True, env=tool_env(), capture_output=True)
    return workdir


def use_remote(root: Path, remote: str | None) -> str | None:
    """The DVC remote name to push to: None = the repository's default remote
    (``.dvc/config``); a configured remote's name as is; a path or URL becomes the
    remote ``flow`` in ``.dvc/config.local`` (this checkout only)."""
    if not remote:
        return None
    if "/" not in remote and "://" not in remote and "\\" not in remote:
        return remote
    run_dvc(["remote", "add", "--local", "--force", "flow", remote], root)
    return "flow"


def geneval_markdown(rows: dict[str, dict], gate=None, title: str = "GenEval-Shapes") -> str:
    """A Markdown report: one table row per GenEval summary in ``rows`` (name ->
    ``metrics/geneval_*.json`` content: overall, the six tags, images, N, image tokens
    per image) and, with ``gate`` (a :class:`~cotgen.pipeline.gate.GateResult`), the
    gate's checks."""
    from cotgen.world.prompts import TAGS

    head = ["run", "overall", *TAGS, "images", "N", "image tokens / image"]
    lines = [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in rows.items():
        tags = [f"{s['tags'][t]:.3f}" if t in s.get("tags", {}) else "" for t in TAGS]
        tokens = s.get("image_tokens_per_image")
        lines.append("| " + " | ".join([name, f"**{s['overall']:.3f}**", *tags, str(s.get("images", "")),
                                        str(s.get("n", "")), f"{tokens:.0f}" if tokens is not None else ""]) + " |")
    if gate is not None:
        lines += ["", f"## Gate: {'passed' if gate.passed else '**FAILED**'}", "", "| check | measured | required | |",
                  "|---|---|---|---|"]
        lines += [f"| {c.name} | {c.measured:.4f} | {c.required:.4f} | {'ok' if c.passed else '**failed**'} |"
                  for c in gate.checks]
        lines += [f"- {n}" for n in gate.notes]
        if gate.promoted:
            lines.append(f"- compared against the promoted model `{gate.promoted}`")
    return "\n".join(lines) + "\n"


def make_task_runner(kind: str | None = None, address: str | None = None, workers: int | None = None):
    """A Prefect task runner: ``kind`` ``"thread"`` (default; Prefect's thread pool) or
    ``"dask"`` (prefect-dask's ``DaskTaskRunner``: the Dask scheduler at ``address``, or
    a local cluster of ``workers`` processes on 127.0.0.1). Defaults come from
    ``COTGEN_TASK_RUNNER``, ``COTGEN_DASK_ADDRESS`` and ``COTGEN_DASK_WORKERS``.

    Raises:
        ValueError: an unknown kind.
    """
    kind = (kind or os.environ.get("COTGEN_TASK_RUNNER") or "thread").lower()
    address = address or os.environ.get("COTGEN_DASK_ADDRESS") or None
    if kind in ("thread", "threads", "default"):
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=workers)
    if kind == "dask":
        from prefect_dask import DaskTaskRunner

        if address:
            return DaskTaskRunner(address=address)
        n = workers or int(os.environ.get("COTGEN_DASK_WORKERS", "2"))
        return DaskTaskRunner(cluster_kwargs={"n_workers": n, "threads_per_worker": 1, "host": "127.0.0.1",
                                              "dashboard_address": None})
    raise ValueError(f"unknown task runner {kind!r}; expected 'thread' or 'dask'")


__all__ = ["RETRY_STAGES", "StageFailedError", "geneval_markdown", "make_task_runner", "merged_params_yaml", "downstream", "pipeline_stages", "stale_stages", "upstream",
           "prepare_workdir", "run_dvc", "stages_ran", "tool_env", "use_remote"]

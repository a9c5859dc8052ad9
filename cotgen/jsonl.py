"""JSON lines: the on-disk form of cotgen's records (trajectories, pairs, reflection
groups, traces, recordings, GenEval results)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path


def read_jsonl(path: str | Path, missing_hint: str | None = None) -> list[dict]:
    """The objects of the non-blank lines of ``path``, in order.

    Raises:
        FileNotFoundError: no file at ``path`` (with ``missing_hint``, e.g. the stage that
            writes it, when given).
        ValueError: a line that is not JSON (file and line number named).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}" + (f"; {missing_hint}" if missing_hint else ""))
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError as e:
                raise ValueError(f"{path} line {lineno} is not JSON: {e}") from None
    return out


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """Write ``rows`` to ``path`` as JSON lines (parent folders made)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

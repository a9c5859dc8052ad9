"""Great Expectations suites for the pipeline's data boundaries (issue 5).

:func:`validate` turns one artefact into pandas tables (one row per line, image, path,
...), runs one expectation suite per table with Great Expectations and raises
:class:`DataValidationError` naming every failed expectation and its rows. Stages call
it on the data they consume before writing anything (``cotgen/pipeline/stages.py``);
``cotgen validate KIND PATH`` runs it by hand.

Kinds and the formats they check (row labels in messages in brackets):

- ``prompts``: GenEval metadata JSONL (``cotgen.geneval.metadata``). Table ``prompts``
  [``line N``]: valid JSON and GenEval schema, tag one of GenEval's six, non-blank
  prompt, unique prompts, a non-empty ``include``. Table ``requirements`` [``line N
  include[i]``]: class in the world's shapes (or ``classnames``: GenEval's 80 for real
  GenEval), count 1..5 (exclude counts run one past
  the largest count), colour one of the ten, relation one of the four, a position
  pointing to an earlier include.
- ``samples``: a GenEval folder (``cotgen.geneval.layout``): ``<5-digit
  index>/metadata.jsonl`` + ``<index>/samples/NNNN.png``. Table ``images``
  [``00003/samples/0002.png``], one row per expected or present image: folder names of
  5 digits with contiguous indices from 0, one valid metadata line per folder, images
  ``0000.png`` .. ``n-1`` in every folder (``n`` = ``images_per_prompt``, default the
  largest count found, at least 1; a missing one is a row with format ``<missing>``), PNG, RGB,
  ``image_size`` square.
- ``labels``: a trajectories folder (``cotgen.reward.data.Trajectories``:
  ``tokens.safetensors``, ``paths.jsonl``, ``prm.jsonl``). Table ``paths`` [``path i``]:
  one token row per path, token ids in ``[0, vocab_size)``, the row length a multiple
  of ``tokens_per_step``, ``correct`` a bool, split ``train`` | ``heldout``, ``source``
  (optional) ``generator`` | ``render``, a prompt in one split only, a valid metadata
  line whose prompt is the path's. Table ``prm``
  [``prm line N``]: ``path`` an existing row, ``step`` in ``1..num_steps``, ``correct``
  a bool, ``rollouts_correct`` >= 0, one label per (path, step).
- ``pairs`` (DPO): JSONL, one preference pair a line: ``{"prompt": str, "chosen":
  [int, ...], "rejected": [int, ...], "metadata"?: GenEval line, ...}`` (more fields
  allowed). Table ``pairs`` [``line N``]: the fields present, non-blank prompt, both
  sides non-empty lists of token ids in ``[0, vocab_size)`` of equal length, chosen !=
  rejected, metadata (if any) valid and about the same prompt.
- ``reflections`` (PARM++): JSONL, one reflection group a line: ``{"prompt": str,
  "wrong_tokens": [int, ...], "reflection": str, "right_tokens": [int, ...],
  "metadata"?: GenEval line, ...}``: the image tokens of a wrong final image, the
  non-blank text that says what is wrong with it, and the tokens of the corrected image.
  Table ``reflections`` [``line N``]: as ``pairs`` with wrong/right for
  rejected/chosen, plus a non-blank ``reflection``.

``vocab_size`` (token kinds) defaults to the ``codebook_size`` of
``<root>/data/generator/image_tokenizer/config.json``, else of
``<root>/data/tokenizer/config.json``; with neither, only ``>= 0`` is checked.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from cotgen.geneval.metadata import MetadataError, parse_metadata_lines, validate_metadata
from cotgen.world.prompts import TAGS
from cotgen.world.vocab import COLORS, IMAGE_SIZE, MAX_COUNT, RELATIONS, SHAPES

#: Rows shown per failed expectation in messages and reports.
MAX_ROWS = 10


class DataValidationError(ValueError):
    """Data at a boundary failed its expectations. The message names the kind, the
    file, each failed expectation and its offending rows (first ``MAX_ROWS``);
    ``report`` is the validation summary (also written as JSON and Markdown)."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


@dataclass
class Table:
    """One DataFrame to validate (its ``row`` column labels rows) and its expectations."""

    name: str
    frame: pd.DataFrame
    expectations: list = field(default_factory=list)


# --- readers -------------------------------------------------------------------------


def _jsonl(path: Path) -> list[dict]:
    """Records of a JSON-lines file: ``row`` ("line N"), ``json_error`` and the parsed
    ``value`` (None where the line is not JSON)."""
    out = []
    for lineno, text in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            value, error = json.loads(text), None
        except json.JSONDecodeError as e:
            value, error = None, f"not valid JSON ({e.msg} at column {e.colno})"
        if value is not None and not isinstance(value, dict):
            value, error = None, f"expected a JSON object, got {type(value).__name__}"
        out.append({"row": f"line {lineno}", "json_error": error, "value": value})
    return out


def _metadata_error(meta: object, classnames=SHAPES) -> str | None:
    try:
        validate_metadata(meta, classnames=classnames)
    except MetadataError as e:
        return str(e).removeprefix("<metadata>: ")
    return None


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _token_stats(value: object) -> tuple[bool, int, int | None, int | None]:
    """(is a list of ints, length, min, max) of a token sequence."""
    ok = isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    if not ok or not value:
        return ok, len(value) if isinstance(value, list) else 0, None, None
    return True, len(value), min(value), max(value)


def _vocab_size(root: Path, vocab_size: int | None) -> int | None:
    if vocab_size is not None:
        return vocab_size
    for rel in ("data/generator/image_tokenizer/config.json", "data/tokenizer/config.json"):
        if (root / rel).is_file():
            return int(json.loads((root / rel).read_text())["codebook_size"])
    return None


# --- expectations --------------------------------------------------------------------


def _gxe():
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations.expectations as gxe

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    return gxe


def _token_expectations(gxe, vocab: int | None) -> list:
    out = [gxe.ExpectColumnValuesToBeBetween(column="token_min", min_value=0)]
    if vocab is not None:
        out.append(gxe.ExpectColumnValuesToBeBetween(column="token_max", max_value=vocab - 1))
    return out


# --- kinds ---------------------------------------------------------------------------


def _prompts(path: Path, opts: dict) -> list[Table]:
    gxe = _gxe()
    classnames = list(opts.get("classnames") or SHAPES)
    rows, reqs = [], []
    for rec in _jsonl(path):
        m = rec["value"] or {}
        include = m.get("include")
        rows.append({"row": rec["row"], "tag": m.get("tag"), "prompt": _str(m.get("prompt")),
                     "n_include": len(include) if isinstance(include, list) else 0,
                     "error": rec["json_error"] or (_metadata_error(m, classnames) if rec["value"] is not None else None)})
        for section in ("include", "exclude"):
            items = m.get(section)
            for i, r in enumerate(items if isinstance(items, list) else []):
                r = r if isinstance(r, dict) else {}
                pos = r.get("position")
                pos = pos if isinstance(pos, list) and len(pos) == 2 else [None, None]
                count = r.get("count")
                reqs.append({"row": f"{rec['row']} {section}[{i}]", "index": i, "class": r.get("class"),
                             "count": count if isinstance(count, int) and not isinstance(count, bool) else None,
                             "color": r.get("color"), "relation": pos[0],
                             "position_ref": pos[1] if isinstance(pos[1], int) else None})
    prompts = Table("prompts", pd.DataFrame(rows, columns=["row", "tag", "prompt", "n_include", "error"]), [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        gxe.ExpectColumnValuesToBeNull(column="error"),
        gxe.ExpectColumnValuesToBeInSet(column="tag", value_set=list(TAGS)),
        gxe.ExpectColumnValuesToNotBeNull(column="prompt"),
        gxe.ExpectColumnValuesToMatchRegex(column="prompt", regex=r"\S"),
        gxe.ExpectColumnValuesToBeUnique(column="prompt"),
        gxe.ExpectColumnValuesToBeBetween(column="n_include", min_value=1),
    ])
    frame = pd.DataFrame(reqs, columns=["row", "index", "class", "count", "color", "relation", "position_ref"])
    requirements = Table("requirements", frame.astype({"index": float, "count": float, "position_ref": float}), [
        gxe.ExpectColumnValuesToBeInSet(column="class", value_set=classnames),
        gxe.ExpectColumnValuesToNotBeNull(column="count"),
        gxe.ExpectColumnValuesToBeBetween(column="count", min_value=1, max_value=MAX_COUNT + 1),
        gxe.ExpectColumnValuesToBeInSet(column="color", value_set=list(COLORS)),
        gxe.ExpectColumnValuesToBeInSet(column="relation", value_set=list(RELATIONS)),
        gxe.ExpectColumnPairValuesAToBeGreaterThanB(column_A="index", column_B="position_ref",
                                                     ignore_row_if="either_value_is_missing"),
    ])
    return [prompts, requirements]


def _image_info(path: Path) -> tuple[str, int | None, int | None, str | None]:
    """(format, width, height, mode); format ``<missing>`` / ``<unreadable: ...>``."""
    from PIL import Image

    if not path.is_file():
        return "<missing>", None, None, None
    try:
        with Image.open(path) as im:
            fmt, (w, h), mode = im.format, im.size, im.mode
            im.verify()
        return fmt or "<unknown>", w, h, mode
    except Exception as e:  # noqa: BLE001 - any decoder error means unreadable
        return f"<unreadable: {e}>", None, None, None


def _samples(path: Path, opts: dict) -> list[Table]:
    gxe = _gxe()
    if not path.is_dir():
        raise FileNotFoundError(f"GenEval folder not found: {path}")
    size = opts.get("image_size") or IMAGE_SIZE
    folders = sorted((p for p in path.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    present = {f: sorted(q.name for q in (f / "samples").glob("*.png")) for f in folders}
    n = opts.get("images_per_prompt") or max([1, *map(len, present.values())])
    rows = []
    for position, folder in enumerate(folders):
        meta_path, meta, error = folder / "metadata.jsonl", {}, None
        try:
            lines = parse_metadata_lines(meta_path.read_text(encoding="utf-8").splitlines(), meta_path.name)
            meta = lines[0] if len(lines) == 1 else {}
            error = None if len(lines) == 1 else f"expected one metadata line, found {len(lines)}"
        except FileNotFoundError:
            error = "missing metadata.jsonl"
        except (MetadataError, UnicodeDecodeError) as e:
            error = str(e)
        expected = [f"{i:04d}.png" for i in range(n)]
        for name in sorted(set(expected) | set(present[folder])):
            fmt, w, h, mode = _image_info(folder / "samples" / name)
            rows.append({"row": f"{folder.name}/samples/{name}", "folder": folder.name, "index": int(folder.name),
                         "expected_index": position, "metadata_error": error, "prompt": meta.get("prompt"),
                         "expected_name": name in expected, "format": fmt, "width": w, "height": h, "mode": mode})
    cols = ["row", "folder", "index", "expected_index", "metadata_error", "prompt", "expected_name", "format",
            "width", "height", "mode"]
    return [Table("images", pd.DataFrame(rows, columns=cols).astype({"width": float, "height": float}), [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        gxe.ExpectColumnValueLengthsToEqual(column="folder", value=5),
        gxe.ExpectColumnPairValuesToBeEqual(column_A="index", column_B="expected_index"),
        gxe.ExpectColumnValuesToBeNull(column="metadata_error"),
        gxe.ExpectColumnValuesToBeInSet(column="expected_name", value_set=[True]),
        gxe.ExpectColumnValuesToBeInSet(column="format", value_set=["PNG"]),
        gxe.ExpectColumnValuesToBeInSet(column="mode", value_set=["RGB"]),
        gxe.ExpectColumnValuesToBeInSet(column="width", value_set=[size]),
        gxe.ExpectColumnValuesToBeInSet(column="height", value_set=[size]),
    ])]


def _labels(path: Path, opts: dict) -> list[Table]:
    from cotgen.reward.data import Trajectories

    gxe = _gxe()
    if not path.is_dir():
        raise FileNotFoundError(f"trajectories folder not found: {path}")
    try:
        traj = Trajectories.load(path)
    except (json.JSONDecodeError, KeyError, ValueError) as e:
        raise DataValidationError(f"labels check failed for {path}: cannot load it ({e})",
                                  {"kind": "labels", "path": str(path), "error": str(e)}) from None
    tokens, tps = traj.tokens, traj.tokens_per_step
    width = tokens.shape[1] if tokens.ndim == 2 else 0
    splits: dict[str, set] = {}
    for p in traj.paths:
        splits.setdefault(p.get("prompt"), set()).add(p.get("split"))
    lows, highs = (tokens.amin(1).tolist(), tokens.amax(1).tolist()) if width else ([], [])
    rows = []
    for i, p in enumerate(traj.paths):
        meta = p.get("metadata")
        row = {"row": f"path {i}", "prompt": _str(p.get("prompt")), "split": p.get("split"),
               "source": p.get("source"), "correct_type": type(p.get("correct")).__name__,
               "prompt_splits": len(splits[p.get("prompt")]),
               "metadata_error": _metadata_error(meta),
               "metadata_prompt": meta.get("prompt") if isinstance(meta, dict) else None,
               "n_tokens": None, "token_min": None, "token_max": None}
        if i < tokens.shape[0] and width:
            row.update(n_tokens=width, token_min=lows[i], token_max=highs[i])
        rows.append(row)
    cols = ["row", "prompt", "split", "source", "correct_type", "prompt_splits", "metadata_error",
            "metadata_prompt", "n_tokens", "token_min", "token_max"]
    paths = Table("paths", pd.DataFrame(rows, columns=cols).astype(
        {"n_tokens": float, "token_min": float, "token_max": float}), [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        gxe.ExpectTableRowCountToEqual(value=int(tokens.shape[0])),
        gxe.ExpectColumnValuesToNotBeNull(column="n_tokens"),
        gxe.ExpectColumnValuesToBeInSet(column="n_tokens", value_set=[float(tps * (width // tps) if tps else -1)]),
        *_token_expectations(gxe, _vocab_size(opts["root"], opts.get("vocab_size"))),
        gxe.ExpectColumnValuesToBeInSet(column="correct_type", value_set=["bool"]),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "heldout"]),
        gxe.ExpectColumnValuesToBeInSet(column="source", value_set=["generator", "render"]),
        gxe.ExpectColumnValuesToNotBeNull(column="prompt"),
        gxe.ExpectColumnValuesToBeBetween(column="prompt_splits", max_value=1),
        gxe.ExpectColumnValuesToBeNull(column="metadata_error"),
        gxe.ExpectColumnPairValuesToBeEqual(column_A="prompt", column_B="metadata_prompt"),
    ])
    prm = pd.DataFrame([{"row": f"prm line {j + 1}", "path": r.get("path"), "step": r.get("step"),
                         "correct_type": type(r.get("correct")).__name__,
                         "rollouts_correct": r.get("rollouts_correct")} for j, r in enumerate(traj.prm)],
                       columns=["row", "path", "step", "correct_type", "rollouts_correct"])
    prm = prm.astype({"path": float, "step": float, "rollouts_correct": float})
    return [paths, Table("prm", prm, [
        gxe.ExpectColumnValuesToNotBeNull(column="path"),
        gxe.ExpectColumnValuesToBeBetween(column="path", min_value=0, max_value=len(traj.paths) - 1),
        gxe.ExpectColumnValuesToNotBeNull(column="step"),
        gxe.ExpectColumnValuesToBeBetween(column="step", min_value=1, max_value=width // tps if tps else 0),
        gxe.ExpectColumnValuesToBeInSet(column="correct_type", value_set=["bool"]),
        gxe.ExpectColumnValuesToBeBetween(column="rollouts_correct", min_value=0),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["path", "step"]),
    ])]


def _token_pairs(path: Path, opts: dict, name: str, good: str, bad: str, text: str | None = None) -> list[Table]:
    """``pairs`` and ``reflections``: a good and a bad token sequence per JSONL line."""
    gxe = _gxe()
    required = ["prompt", good, bad] + ([text] if text else [])
    rows = []
    for rec in _jsonl(path):
        v = rec["value"] or {}
        good_ok, n_good, gmin, gmax = _token_stats(v.get(good))
        bad_ok, n_bad, bmin, bmax = _token_stats(v.get(bad))
        meta = v.get("metadata")
        missing = [k for k in required if k not in v]
        rows.append({"row": rec["row"], "json_error": rec["json_error"],
                     "missing_fields": ", ".join(missing) if rec["value"] is not None and missing else None,
                     "prompt": _str(v.get("prompt")), **({text: _str(v.get(text))} if text else {}),
                     f"{good}_is_tokens": good_ok, f"{bad}_is_tokens": bad_ok,
                     f"n_{good}": n_good, f"n_{bad}": n_bad,
                     "token_min": min([x for x in (gmin, bmin) if x is not None], default=None),
                     "token_max": max([x for x in (gmax, bmax) if x is not None], default=None),
                     f"{good}_equals_{bad}": good_ok and v.get(good) == v.get(bad),
                     "metadata_error": _metadata_error(meta) if meta is not None else None,
                     "metadata_prompt": meta.get("prompt") if isinstance(meta, dict) else _str(v.get("prompt"))})
    cols = ["row", "json_error", "missing_fields", "prompt", *([text] if text else []), f"{good}_is_tokens",
            f"{bad}_is_tokens", f"n_{good}", f"n_{bad}", "token_min", "token_max", f"{good}_equals_{bad}", "metadata_error",
            "metadata_prompt"]
    frame = pd.DataFrame(rows, columns=cols).astype({"token_min": float, "token_max": float})
    expectations = [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        gxe.ExpectColumnValuesToBeNull(column="json_error"),
        gxe.ExpectColumnValuesToBeNull(column="missing_fields"),
        gxe.ExpectColumnValuesToNotBeNull(column="prompt"),
        gxe.ExpectColumnValuesToMatchRegex(column="prompt", regex=r"\S"),
        gxe.ExpectColumnValuesToBeInSet(column=f"{good}_is_tokens", value_set=[True]),
        gxe.ExpectColumnValuesToBeInSet(column=f"{bad}_is_tokens", value_set=[True]),
        gxe.ExpectColumnValuesToBeBetween(column=f"n_{good}", min_value=1),
        gxe.ExpectColumnPairValuesToBeEqual(column_A=f"n_{good}", column_B=f"n_{bad}"),
        gxe.ExpectColumnValuesToBeInSet(column=f"{good}_equals_{bad}", value_set=[False]),
        *_token_expectations(gxe, _vocab_size(opts["root"], opts.get("vocab_size"))),
        gxe.ExpectColumnValuesToBeNull(column="metadata_error"),
        gxe.ExpectColumnPairValuesToBeEqual(column_A="prompt", column_B="metadata_prompt"),
    ]
    if text:
        expectations += [gxe.ExpectColumnValuesToNotBeNull(column=text),
                         gxe.ExpectColumnValuesToMatchRegex(column=text, regex=r"\S")]
    return [Table(name, frame, expectations)]


#: kind -> builder of its tables (path, options) -> [Table].
KINDS: dict[str, Callable[[Path, dict], list[Table]]] = {
    "prompts": _prompts,
    "samples": _samples,
    "labels": _labels,
    "pairs": lambda p, o: _token_pairs(p, o, "pairs", "chosen", "rejected"),
    "reflections": lambda p, o: _token_pairs(p, o, "reflections", "right_tokens", "wrong_tokens", "reflection"),
}


# --- running and reporting -----------------------------------------------------------


def _plain(value: object) -> object:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _describe(config) -> str:
    kw = {k: v for k, v in config.kwargs.items() if k not in ("batch_id", "result_format") and v is not None}
    cols = [kw.pop(k) for k in ("column", "column_A", "column_B") if k in kw]
    if "column_list" in kw:
        cols.append("+".join(kw.pop("column_list")))
    if "value_set" in kw:
        vs = list(kw["value_set"])
        kw["value_set"] = vs if len(vs) <= 10 else vs[:10] + ["..."]
    args = ", ".join(cols + [f"{k}={_plain(v)!r}" for k, v in kw.items() if k not in ("ignore_row_if",)])
    return f"{config.type}({args})"


def _run(kind: str, tables: list[Table]) -> tuple[int, list[dict]]:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas("cotgen")
    total, failures = 0, []
    for table in tables:
        frame = table.frame.reset_index(drop=True)
        batch = source.add_dataframe_asset(table.name).add_batch_definition_whole_dataframe("all")
        name = f"{kind}.{table.name}"
        suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=table.expectations))
        definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
        result = definition.run(batch_parameters={"dataframe": frame}, result_format={"result_format": "COMPLETE"})
        total += len(result.results)
        for r in result.results:
            if r.success:
                continue
            res, idx = r.result or {}, (r.result or {}).get("unexpected_index_list") or []
            values = res.get("unexpected_list") or []
            rows = [{"row": frame.at[i, "row"], "value": _plain(v)} for i, v in zip(idx[:MAX_ROWS], values)]
            failures.append({"table": table.name, "expectation": _describe(r.expectation_config),
                             "unexpected_count": res.get("unexpected_count", len(idx)),
                             "observed_value": _plain(res.get("observed_value")), "rows": rows,
                             "error": (r.exception_info or {}).get("exception_message")})
    return total, failures


def _message(report: dict) -> str:
    lines = [f"{report['kind']} check failed for {report['path']}: {len(report['failures'])} of "
             f"{report['expectations']} expectations (report: {report.get('report_md')})"]
    for f in report["failures"]:
        head = f"  - {f['table']}: {f['expectation']}"
        if f["rows"]:
            more = f" (first {len(f['rows'])})" if f["unexpected_count"] > len(f["rows"]) else ""
            lines.append(f"{head}: {f['unexpected_count']} row(s){more}")
            lines += [f"      {r['row']}: {r['value']!r}" for r in f["rows"]]
        else:
            lines.append(f"{head}: observed {f['observed_value']!r}" + (f"; {f['error']}" if f["error"] else ""))
    return "\n".join(lines)


def _write_report(report: dict, report_dir: Path) -> None:
    report_dir.mkdir(parents=True, exist_ok=True)
    kind = report["kind"]
    report["report_json"], report["report_md"] = str(report_dir / f"{kind}.json"), str(report_dir / f"{kind}.md")
    Path(report["report_json"]).write_text(json.dumps(report, indent=2, default=str) + "\n")
    md = [f"# Validation failed: {kind}", "", f"File: `{report['path']}`  ",
          f"{len(report['failures'])} of {report['expectations']} expectations failed.", ""]
    for f in report["failures"]:
        md += [f"## {f['table']}: `{f['expectation']}`", ""]
        if f["rows"]:
            shown = f"; the first {len(f['rows'])}" if f["unexpected_count"] > len(f["rows"]) else ""
            md += [f"{f['unexpected_count']} unexpected row(s){shown}:", "",
                   "| row | value |", "| --- | --- |"]
            md += [f"| {r['row']} | `{r['value']!r}` |" for r in f["rows"]]
        else:
            md.append(f"Observed: `{f['observed_value']!r}`" + (f"; {f['error']}" if f["error"] else ""))
        md.append("")
    Path(report["report_md"]).write_text("\n".join(md) + "\n")


def validate(
    kind: str,
    path: str | Path,
    report_dir: str | Path | None = None,
    *,
    root: str | Path = ".",
    vocab_size: int | None = None,
    images_per_prompt: int | None = None,
    image_size: int | None = None,
    classnames: Sequence[str] | None = None,
) -> dict:
    """Validate the artefact at ``path`` as ``kind`` (formats in the module docstring).

    Args:
        kind: ``prompts``, ``samples``, ``labels``, ``pairs`` or ``reflections``.
        path: the file (JSONL kinds) or folder (``samples``, ``labels``).
        report_dir: where a failure's ``<kind>.json`` and ``<kind>.md`` go (default
            ``<root>/reports/validation``).
        root: the repository root (reports, tokenizer config for ``vocab_size``).
        vocab_size: token ids must lie in ``[0, vocab_size)`` (default: see module).
        images_per_prompt: ``samples``: images every prompt folder must hold (default:
            the largest count found).
        image_size: ``samples``: side of the images (default: the world's, 64).
        classnames: ``prompts``: the classes a requirement may name (default: the
            world's shapes; real GenEval: its 80 object names).
    Returns:
        ``{"kind", "path", "success": True, "tables": {name: rows}, "expectations",
        "seconds"}``.
    Raises:
        ValueError: unknown kind (the message lists the known ones).
        FileNotFoundError: ``path`` (or a file of a ``labels`` folder) is missing.
        DataValidationError: an expectation failed; the message names the kind, the
            file, each failed expectation and its rows, and the report files.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}; known: {', '.join(KINDS)}")
    path, root = Path(path), Path(root)
    if not path.exists():
        raise FileNotFoundError(f"{kind} data not found: {path}")
    start = time.perf_counter()
    opts = dict(root=root, vocab_size=vocab_size, images_per_prompt=images_per_prompt, image_size=image_size,
                classnames=classnames)
    tables = KINDS[kind](path, opts)
    total, failures = _run(kind, tables)
    report = {"kind": kind, "path": str(path), "success": not failures,
              "tables": {t.name: len(t.frame) for t in tables}, "expectations": total, "failures": failures,
              "seconds": round(time.perf_counter() - start, 3)}
    if failures:
        _write_report(report, Path(report_dir) if report_dir is not None else root / "reports/validation")
        raise DataValidationError(_message(report), report)
    del report["failures"]
    return report


__all__ = ["KINDS", "DataValidationError", "validate"]

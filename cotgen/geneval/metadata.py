"""GenEval metadata lines: loading and validation (DESIGN section 2).

A line: ``{"tag", "prompt", "include": [{"class", "count", "color"?, "position"?:
[relation, index_of_earlier_include]}], "exclude"?: [{"class", "count"}]}``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from cotgen.world.prompts import TAGS
from cotgen.world.vocab import COLORS, RELATIONS


class MetadataError(ValueError):
    """A metadata line breaks GenEval's schema; the message names file and line."""


def validate_metadata(
    line: object, where: str = "<metadata>", classnames: Iterable[str] | None = None
) -> dict:
    """Check one metadata line against GenEval's schema and return it.

    Args:
        line: the parsed JSON value.
        where: used in error messages, e.g. ``"evaluation_metadata.jsonl:12"``.
        classnames: if given, every class must be one of these.
    Raises:
        MetadataError: not an object, unknown tag, missing/empty ``prompt`` or
            ``include``, a requirement without ``class`` or with ``count`` < 1 (or not an
            integer), a colour outside GenEval's ten, a ``position`` that is not
            ``[relation, j]`` with a known relation and ``0 <= j <`` its own index, an
            unknown class.
    """
    known = set(classnames) if classnames is not None else None

    def fail(msg: str) -> MetadataError:
        return MetadataError(f"{where}: {msg}")

    if not isinstance(line, dict):
        raise fail(f"expected a JSON object, got {type(line).__name__}")
    tag = line.get("tag")
    if tag not in TAGS:
        raise fail(f"unknown tag {tag!r}; expected one of {', '.join(TAGS)}")
    if not isinstance(line.get("prompt"), str) or not line["prompt"].strip():
        raise fail("missing or empty 'prompt'")
    if "include" not in line:
        raise fail("missing 'include'")
    include = line["include"]
    if not isinstance(include, list) or not include:
        raise fail("'include' must be a non-empty list")
    for section in ("include", "exclude"):
        reqs = line.get(section, [])
        if not isinstance(reqs, list):
            raise fail(f"'{section}' must be a list")
        for i, req in enumerate(reqs):
            at = f"{section}[{i}]"
            if not isinstance(req, dict):
                raise fail(f"{at} must be an object")
            name = req.get("class")
            if not isinstance(name, str) or not name:
                raise fail(f"{at} has no 'class'")
            if known is not None and name not in known:
                raise fail(f"{at}: unknown class {name!r}")
            count = req.get("count")
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise fail(f"{at}: count must be an integer >= 1, got {count!r}")
            if "color" in req and req["color"] not in COLORS:
                raise fail(f"{at}: colour {req['color']!r} is not one of GenEval's ten ({', '.join(COLORS)})")
            if "position" in req:
                pos = req["position"]
                if section != "include":
                    raise fail(f"{at}: 'position' is only allowed in 'include'")
                if not isinstance(pos, (list, tuple)) or len(pos) != 2:
                    raise fail(f"{at}: position must be [relation, index], got {pos!r}")
                rel, j = pos
                if rel not in RELATIONS:
                    raise fail(f"{at}: unknown relation {rel!r}; expected one of {', '.join(RELATIONS)}")
                if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < i:
                    raise fail(
                        f"{at}: position index {j!r} must point to an earlier include (0..{i - 1})"
                        if i > 0
                        else f"{at}: the first include cannot have a position (index {j!r} points forward)"
                    )
    return line


def parse_metadata_lines(
    lines: Iterable[str], source: str = "<metadata>", classnames: Iterable[str] | None = None
) -> list[dict]:
    """Parse JSON lines (blank lines skipped); errors name ``source:lineno``."""
    out = []
    for lineno, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        where = f"{source}:{lineno}"
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise MetadataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        out.append(validate_metadata(value, where, classnames))
    return out


def load_metadata(path: str | Path, classnames: Iterable[str] | None = None) -> list[dict]:
    """Load a GenEval ``evaluation_metadata.jsonl``.

    Raises:
        FileNotFoundError: the file does not exist.
        MetadataError: a bad line (message names file and line), or no line at all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metadata file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MetadataError(f"{path}: not UTF-8 text ({e.reason})") from None
    lines = parse_metadata_lines(text.splitlines(), str(path), classnames)
    if not lines:
        raise MetadataError(f"{path}: no metadata lines")
    return lines


def write_metadata(path: str | Path, lines: Sequence[dict]) -> None:
    """Write metadata lines as JSON lines (GenEval's format)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")

"""Reflections (PARM++, paper section 5): what is wrong with an image, in words.

The evaluator's reason (:func:`cotgen.geneval.rules.evaluate`, GenEval's wording, one
failed requirement a line) is parsed into a structured :class:`Failure`: its *kind*
(``missing`` object, wrong ``count``, wrong ``color``, wrong ``position``), which
include of the prompt failed, and what was seen instead (the count found, the colour
seen, the relation seen). A failure is rendered as a short natural-language reflection
with one of several templates per kind, drawn by a seeded generator, so the wording
varies ("there are two stars but the prompt asks for three" / "the image shows two
stars instead of three"). A correct image's reflection is ``"yes"``.

The judge's reflection head predicts the same structured failure from the image and
renders it with the same templates (:mod:`cotgen.reflect.judge`); the self-correction
generator reads the words (:mod:`cotgen.reflect.corrector`), so every word a template
can produce is in :func:`reflection_words`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from cotgen.world.prompts import make_plural
from cotgen.world.vocab import COLORS, RELATIONS, SHAPES

#: Failure kinds; index 0 means "no failure" (the judge's "yes").
KINDS: tuple[str, ...] = ("ok", "missing", "count", "color", "position")
#: Counts the reflection head can name (the last one means "that many or more").
MAX_COUNT_SEEN = 5
COUNT_WORDS: tuple[str, ...] = ("no", "one", "two", "three", "four", "many")
#: Words of a reflection block: at most this many (the self-correction layout's block).
REFLECTION_LEN = 16
YES = "yes"


@dataclass(frozen=True)
class Failure:
    """One failed requirement, structured.

    Attributes:
        kind: one of :data:`KINDS` but ``ok``.
        include: index of the failed include in the metadata's ``include`` list.
        count_seen: objects of the include's class found (``missing``: 0; ``count``: the
            count found), clipped to :data:`MAX_COUNT_SEEN`; None if not said.
        color_seen: the colour seen instead of the asked one (``color``); None if none.
        relation_seen: a relation the object stands in to its target instead of the
            asked one (``position``); None when no relation holds.
    """

    kind: str
    include: int = 0
    count_seen: int | None = None
    color_seen: str | None = None
    relation_seen: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- prompts
_NUMBER = {"two": 2, "three": 3, "four": 4}
_SHAPE = "|".join(SHAPES)
_PLURAL = "|".join(make_plural(s) for s in SHAPES)
_COLOR = "|".join(COLORS)
_REL = "|".join(RELATIONS)


def parse_prompt(prompt: str) -> dict:
    """GenEval metadata (``tag``, ``prompt``, ``include``) of a GenEval-Shapes prompt,
    from its template (the six of GenEval). Raises ValueError for other prompts."""
    p = " ".join(prompt.strip().lower().split())
    art = r"an? "
    pats = [
        ("single_object", rf"a photo of {art}({_SHAPE})"),
        ("two_object", rf"a photo of {art}({_SHAPE}) and {art}({_SHAPE})"),
        ("counting", rf"a photo of (two|three|four) (?:({_COLOR}) )?({_PLURAL})"),
        ("colors", rf"a photo of {art}({_COLOR}) ({_SHAPE})"),
        ("position", rf"a photo of {art}({_SHAPE}) ({_REL}) {art}({_SHAPE})"),
        ("color_attr", rf"a photo of {art}({_COLOR}) ({_SHAPE}) and {art}({_COLOR}) ({_SHAPE})"),
    ]
    for tag, pat in pats:
        m = re.fullmatch(pat, p)
        if not m:
            continue
        g = m.groups()
        if tag == "single_object":
            inc = [{"class": g[0], "count": 1}]
        elif tag == "two_object":
            inc = [{"class": g[0], "count": 1}, {"class": g[1], "count": 1}]
        elif tag == "counting":
            cls, n = next(s for s in SHAPES if make_plural(s) == g[2]), _NUMBER[g[0]]
            inc = [{"class": cls, "count": n, **({"color": g[1]} if g[1] else {})}]
            return {"tag": tag, "prompt": prompt, "include": inc, "exclude": [{"class": cls, "count": n + 1}]}
        elif tag == "colors":
            inc = [{"class": g[1], "count": 1, "color": g[0]}]
        elif tag == "position":
            inc = [{"class": g[2], "count": 1}, {"class": g[0], "count": 1, "position": [g[1], 0]}]
        else:
            inc = [{"class": g[1], "count": 1, "color": g[0]}, {"class": g[3], "count": 1, "color": g[2]}]
        return {"tag": tag, "prompt": prompt, "include": inc}
    raise ValueError(f"not a GenEval-Shapes prompt: {prompt!r}")


# --------------------------------------------------------------------------- reasons
_R_COUNT = re.compile(r"expected (\w+)>=(\d+), found (\d+)")
_R_COLOR = re.compile(r"expected (\w+) (\w+)>=(\d+), found (\d+) \w+; and (.*)")
_R_TARGET = re.compile(r"no target for (\w+) to be (.+)")
_R_POS = re.compile(rf"expected (\w+) ({_REL}) target, found (.*?) ?target")
_R_EXCL = re.compile(r"expected (\w+)<(\d+), found (\d+)")


def _include_of(metadata: Mapping, cls: str, color: str | None = None) -> int:
    for i, req in enumerate(metadata.get("include", [])):
        if req["class"] == cls and (color is None or req.get("color") == color):
            return i
    return 0


def parse_reason(reason: str, metadata: Mapping) -> list[Failure]:
    """The evaluator's reason (one failed requirement a line) as :class:`Failure` s, in
    order; empty for a correct image. Lines of an unknown form are skipped."""
    out: list[Failure] = []
    for line in (s.strip() for s in reason.splitlines()):
        if not line:
            continue
        if m := _R_COLOR.fullmatch(line):
            color, cls = m.group(1), m.group(2)
            seen = Counter()
            for part in m.group(5).split(","):
                bits = part.split()
                if len(bits) == 2 and bits[1] in COLORS and bits[1] != color:
                    seen[bits[1]] += int(bits[0])
            out.append(Failure("color", _include_of(metadata, cls, color),
                               color_seen=seen.most_common(1)[0][0] if seen else None))
        elif m := _R_COUNT.fullmatch(line):
            cls, found = m.group(1), int(m.group(3))
            out.append(Failure("missing" if found == 0 else "count", _include_of(metadata, cls),
                               count_seen=min(found, MAX_COUNT_SEEN)))
        elif m := _R_TARGET.fullmatch(line):
            i = _include_of(metadata, m.group(1))
            j = metadata["include"][i].get("position", [None, 0])[1]
            out.append(Failure("missing", j, count_seen=0))
        elif m := _R_POS.fullmatch(line):
            rels = [r for r in RELATIONS if r in m.group(3)]
            out.append(Failure("position", _include_of(metadata, m.group(1)),
                               relation_seen=rels[0] if rels else None))
        elif m := _R_EXCL.fullmatch(line):
            out.append(Failure("count", _include_of(metadata, m.group(1)),
                               count_seen=min(int(m.group(3)), MAX_COUNT_SEEN)))
    return out


def primary_failure(reason: str, metadata: Mapping) -> Failure | None:
    """The first failure of the reason (None if correct or unparsed)."""
    failures = parse_reason(reason, metadata)
    return failures[0] if failures else None


# --------------------------------------------------------------------------- templates
TEMPLATES: dict[str, tuple[str, ...]] = {
    "missing": (
        "there is no {obj} in the image",
        "the {obj} is missing",
        "the image does not show any {obj}",
        "i cannot find the {obj} the prompt asks for",
    ),
    "count": (
        "there {be} {found} {objs} but the prompt asks for {asked}",
        "the image shows {found} {objs} instead of {asked}",
        "wrong number of {objs} {found} instead of {asked}",
        "i count {found} {objs} not {asked}",
    ),
    "color": (
        "the {cls} is {seen} but should be {asked}",
        "the {cls} should be {asked} not {seen}",
        "the {cls} has the wrong color it is {seen} instead of {asked}",
    ),
    "color_unseen": (
        "the {cls} is not {asked}",
        "the {cls} has the wrong color it should be {asked}",
    ),
    "position": (
        "the {cls} is {seen} the {target} but should be {asked} it",
        "the {cls} should be {asked} the {target} not {seen} it",
        "the {cls} is placed {seen} the {target} instead of {asked} it",
    ),
    "position_unseen": (
        "the {cls} is not {asked} the {target}",
        "the {cls} should be {asked} the {target}",
    ),
}


def _noun(req: Mapping) -> str:
    return f"{req['color']} {req['class']}" if req.get("color") else req["class"]


def render_failure(failure: Failure, metadata: Mapping, rng: np.random.Generator | None = None,
                   template: int | None = None) -> str:
    """A reflection sentence for ``failure`` of the prompt ``metadata``: template
    ``template`` of its kind, or one drawn with ``rng`` (the first without either)."""
    include = metadata["include"]
    req = include[min(failure.include, len(include) - 1)]
    kind = failure.kind
    slots = {"obj": _noun(req), "cls": req["class"], "objs": make_plural(req["class"])}
    if kind == "count":
        found = failure.count_seen if failure.count_seen is not None else 0
        slots.update(found=COUNT_WORDS[min(found, MAX_COUNT_SEEN)], asked=COUNT_WORDS[req["count"]],
                     be="is" if found == 1 else "are")
        if found == 1:
            slots["objs"] = req["class"]
    elif kind == "color":
        slots.update(asked=req.get("color", ""), seen=failure.color_seen or "")
        if not failure.color_seen:
            kind = "color_unseen"
    elif kind == "position":
        rel, j = req.get("position", [RELATIONS[0], 0])
        slots.update(asked=rel, target=include[j]["class"], seen=failure.relation_seen or "")
        if not failure.relation_seen:
            kind = "position_unseen"
    options = TEMPLATES[kind]
    if template is None:
        template = int(rng.integers(len(options))) if rng is not None else 0
    return options[template % len(options)].format(**slots)


def reflection_text(correct: bool, reason: str, metadata: Mapping, rng: np.random.Generator | None = None) -> str:
    """The reflection target of a labelled image: ``"yes"`` if correct, else the
    primary failure in words (``"no"`` if the reason cannot be parsed)."""
    if correct:
        return YES
    failure = primary_failure(reason, metadata)
    return render_failure(failure, metadata, rng) if failure is not None else "no"


def reflection_words() -> list[str]:
    """Every word a reflection can contain (templates, shapes, plurals, colours,
    relations, count words, yes / no), sorted."""
    words = {YES, "no", "is", "are", *COUNT_WORDS, *COLORS, *SHAPES, *(make_plural(s) for s in SHAPES)}
    for rel in RELATIONS:
        words |= set(rel.split())
    for options in TEMPLATES.values():
        for t in options:
            words |= {w for w in re.sub(r"\{\w+\}", " ", t).split()}
    return sorted(words)


def reflection_examples(paths: Sequence[Mapping], negative_fraction: float = 0.8, seed: int = 0,
                        splits: Sequence[str] | None = None) -> list[dict]:
    """The judge's reflection data from labelled paths (``Trajectories.paths``): one
    dict per kept path: ``path`` (index), ``split``, ``text`` (target: ``"yes"`` or the
    reflection, wording drawn with ``seed``), ``kind`` (the primary failure's kind, or
    ``ok``) and ``failure`` (:meth:`Failure.as_dict`, None if correct); all failures'
    kinds in ``kinds``. Wrong paths whose reason cannot be parsed are skipped. Correct
    paths are subsampled (seeded) so that at least ``negative_fraction`` of the examples
    of each split are negatives, as in the paper (80%)."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[dict]] = {}
    for i, p in enumerate(paths):
        if splits is not None and p["split"] not in splits:
            continue
        failures = [] if p["correct"] else parse_reason(p.get("reason", ""), p["metadata"])
        if not p["correct"] and not failures:
            continue
        f = failures[0] if failures else None
        out.setdefault(p["split"], []).append({
            "path": i, "split": p["split"], "kind": f.kind if f else "ok", "kinds": sorted({x.kind for x in failures}),
            "failure": f.as_dict() if f else None,
            "text": render_failure(f, p["metadata"], rng) if f else YES,
        })
    keep = []
    for split, rows in out.items():
        neg = [r for r in rows if r["kind"] != "ok"]
        pos = [r for r in rows if r["kind"] == "ok"]
        if 0 < negative_fraction < 1 and neg:
            max_pos = int(len(neg) * (1 - negative_fraction) / negative_fraction + 1e-9)
            if len(pos) > max_pos:
                pos = [pos[i] for i in sorted(rng.choice(len(pos), size=max_pos, replace=False))]
        keep += sorted(neg + pos, key=lambda r: r["path"])
    return keep

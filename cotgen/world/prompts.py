"""GenEval prompt-set builder (GenEval ``prompts/create_prompts.py``, reimplemented).

The builder follows GenEval's procedure exactly, in the order of its random-generator
calls, so that ``build_geneval_prompts(coco_names, seed=43, n=100)`` reproduces the
official ``evaluation_metadata.jsonl`` line for line. The same builder makes the
GenEval-Shapes evaluation set (seed 43) and a larger, disjoint training set.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

import numpy as np

from cotgen.world.vocab import COLORS, NUMBERS, RELATIONS, SHAPES

TAGS: tuple[str, ...] = (
    "single_object",
    "two_object",
    "counting",
    "colors",
    "position",
    "color_attr",
)


def with_article(name: str) -> str:
    """``"an X"`` before a vowel, else ``"a X"`` (GenEval's rule: first letter only)."""
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def make_plural(name: str) -> str:
    """GenEval's plural: ``"es"`` after a final s, else ``"s"``
    (``"bus"`` -> ``"buses"``, ``"bench"`` -> ``"benchs"``, ``"cross"`` -> ``"crosses"``)."""
    return f"{name}es" if name[-1] == "s" else f"{name}s"


class PromptBuilder:
    """GenEval's six prompt generators over a class list.

    Args:
        classnames: object classes, in order (GenEval: ``object_names.txt``).
        colors: colour names (GenEval's ten by default).
        relations: the four relations, in GenEval's order.
        no_color_class: class that never gets a colour (GenEval: ``"person"``);
            ``None`` means every class may be coloured.
    Raises:
        ValueError: fewer than two classes, or ``no_color_class`` not in ``classnames``.
    """

    def __init__(
        self,
        classnames: Sequence[str],
        colors: Sequence[str] = COLORS,
        relations: Sequence[str] = RELATIONS,
        no_color_class: str | None = None,
    ) -> None:
        if len(classnames) < 2:
            raise ValueError(f"need at least two classes, got {len(classnames)}")
        if no_color_class is not None and no_color_class not in classnames:
            raise ValueError(f"no_color_class {no_color_class!r} is not one of the classes")
        self.classnames = list(classnames)
        self.colors = list(colors)
        self.relations = list(relations)
        self.no_color_class = no_color_class

    # -- the six generators, each exactly as GenEval draws ------------------
    def single_object(self, rng: np.random.Generator) -> list[dict]:
        idxs = rng.choice(len(self.classnames), size=len(self.classnames), replace=False)
        return [
            {
                "tag": "single_object",
                "include": [{"class": self.classnames[i], "count": 1}],
                "prompt": f"a photo of {with_article(self.classnames[i])}",
            }
            for i in idxs
        ]

    def two_object(self, rng: np.random.Generator) -> dict:
        a, b = (self.classnames[i] for i in rng.choice(len(self.classnames), size=2, replace=False))
        return {
            "tag": "two_object",
            "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
            "prompt": f"a photo of {with_article(a)} and {with_article(b)}",
        }

    def counting(self, rng: np.random.Generator, max_count: int = 4) -> dict:
        name = self.classnames[rng.choice(len(self.classnames))]
        num = int(rng.integers(2, max_count, endpoint=True))
        return {
            "tag": "counting",
            "include": [{"class": name, "count": num}],
            "exclude": [{"class": name, "count": num + 1}],
            "prompt": f"a photo of {NUMBERS[num]} {make_plural(name)}",
        }

    def _colorable(self, idxs: np.ndarray | int) -> np.ndarray | int:
        """GenEval's shift trick: draw from all classes but one, then rotate past it."""
        if self.no_color_class is None:
            return idxs
        return (idxs + 1 + self.classnames.index(self.no_color_class)) % len(self.classnames)

    def _n_colorable(self) -> int:
        return len(self.classnames) - (self.no_color_class is not None)

    def colors_sample(self, rng: np.random.Generator) -> dict:
        name = self.classnames[self._colorable(rng.choice(self._n_colorable()))]
        color = self.colors[rng.choice(len(self.colors))]
        return {
            "tag": "colors",
            "include": [{"class": name, "count": 1, "color": color}],
            "prompt": f"a photo of {with_article(color)} {name}",
        }

    def position(self, rng: np.random.Generator) -> dict:
        ia, ib = rng.choice(len(self.classnames), size=2, replace=False)
        a, b = self.classnames[ia], self.classnames[ib]
        rel = self.relations[rng.choice(len(self.relations))]
        return {
            "tag": "position",
            "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}],
            "prompt": f"a photo of {with_article(a)} {rel} {with_article(b)}",
        }

    def color_attr(self, rng: np.random.Generator) -> dict:
        ia, ib = self._colorable(rng.choice(self._n_colorable(), size=2, replace=False))
        ca, cb = rng.choice(len(self.colors), size=2, replace=False)
        a, b = self.classnames[ia], self.classnames[ib]
        col_a, col_b = self.colors[ca], self.colors[cb]
        return {
            "tag": "color_attr",
            "include": [
                {"class": a, "count": 1, "color": col_a},
                {"class": b, "count": 1, "color": col_b},
            ],
            "prompt": f"a photo of {with_article(col_a)} {a} and {with_article(col_b)} {b}",
        }

    def suite(self, seed: int, n: int = 100) -> list[dict]:
        """GenEval's ``generate_suite``: all single objects, then ``n`` draws per other tag,
        duplicates (same content) dropped with the first kept."""
        rng = np.random.default_rng(seed)
        samples = self.single_object(rng)
        samples += [self.two_object(rng) for _ in range(n)]
        samples += [self.counting(rng) for _ in range(n)]
        samples += [self.colors_sample(rng) for _ in range(n)]
        samples += [self.position(rng) for _ in range(n)]
        samples += [self.color_attr(rng) for _ in range(n)]
        return dedupe(samples)


def content_key(sample: dict) -> str:
    """A canonical string of a metadata line's content (key order ignored)."""
    return json.dumps(sample, sort_keys=True)


def dedupe(samples: Iterable[dict]) -> list[dict]:
    """Drop lines whose content already appeared; the first stays."""
    seen: set[str] = set()
    out = []
    for s in samples:
        key = content_key(s)
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


def build_geneval_prompts(
    classnames: Sequence[str], seed: int = 43, n: int = 100, no_color_class: str | None = "person"
) -> list[dict]:
    """The official GenEval prompt set over ``classnames`` (seed 43, n=100 reproduces it)."""
    return PromptBuilder(classnames, no_color_class=no_color_class).suite(seed, n)


def build_shapes_eval_set(seed: int = 43, n: int = 100) -> list[dict]:
    """GenEval-Shapes: GenEval's procedure over the shapes vocabulary (no excluded class)."""
    return PromptBuilder(SHAPES, no_color_class=None).suite(seed, n)


def build_shapes_train_set(
    eval_set: Sequence[dict],
    size: int,
    first_seed: int = 1000,
    n_per_round: int = 100,
    color_variants: bool = True,
) -> list[dict]:
    """A training prompt set disjoint from ``eval_set`` (no equal prompt).

    Runs GenEval's procedure with seeds ``first_seed, first_seed+1, ...`` and keeps
    lines whose prompt is not in the evaluation set until ``size`` lines are kept.
    With eight classes every plain ``single_object`` and ``counting`` prompt is already
    in the evaluation set, so with ``color_variants`` each such draw also yields a
    coloured variant in the same tag and schema ("a photo of three red circles":
    include ``{class, count, color}``; exclude ``{class, count + 1}``), which is never
    an evaluation prompt. Without it the generator would never see a number word.

    Raises:
        ValueError: ``size`` < 1, or the prompt space runs out before ``size`` lines.
    """
    if size < 1:
        raise ValueError(f"training set size must be >= 1, got {size}")
    builder = PromptBuilder(SHAPES, no_color_class=None)
    banned = {s["prompt"] for s in eval_set}
    seen: set[str] = set()
    out: list[dict] = []
    for round_ in range(10_000):
        rng = np.random.default_rng(first_seed + round_)
        suite = builder.suite(first_seed + round_, n_per_round)
        if color_variants:
            suite += [_color_variant(s, rng, builder.colors) for s in suite if s["tag"] in ("single_object", "counting")]
        before = len(out)
        for s in suite:
            if s["prompt"] in banned or s["prompt"] in seen:
                continue
            seen.add(s["prompt"])
            out.append(s)
            if len(out) == size:
                return out
        if round_ > 50 and len(out) == before:
            break
    raise ValueError(f"only {len(out)} distinct training prompts exist outside the evaluation set; asked for {size}")


def _color_variant(sample: dict, rng: np.random.Generator, colors: Sequence[str]) -> dict:
    inc = sample["include"][0]
    color = colors[rng.choice(len(colors))]
    name, count = inc["class"], inc["count"]
    out = {"tag": sample["tag"], "include": [{"class": name, "count": count, "color": color}]}
    if "exclude" in sample:
        out["exclude"] = [dict(e) for e in sample["exclude"]]
    if count == 1:
        out["prompt"] = f"a photo of {with_article(color)} {name}"
    else:
        out["prompt"] = f"a photo of {NUMBERS[count]} {color} {make_plural(name)}"
    return out

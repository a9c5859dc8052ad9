"""The GenEval gate: may this verified generator be promoted?

A candidate (the generator + judge + strategy that ``search_parm`` evaluated) passes when

- its GenEval-Shapes ``overall`` is at least ``gate.overall``;
- every tag of ``gate.tags`` is at least its minimum;
- it does not regress against the currently promoted model (``cotgen-verified:latest``,
  metadata ``geneval_overall`` / ``geneval_<tag>``) by more than
  ``gate.max_regression.overall`` (resp. ``.tags`` per tag; null switches a check off).
  The regression check only compares like with like: when the promoted model was scored
  on an evaluation set of another size (e.g. the tiny profile's), it is skipped and the
  result says so.

Thresholds live in ``params.yaml`` (section ``gate``); :func:`check_gate` is pure so that
the ``gate`` stage, ``flows/promote.py`` and tests share it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


class GateFailedError(RuntimeError):
    """The gate refused a candidate; the message names every failed threshold."""


@dataclass
class GateThresholds:
    """Minimum GenEval scores and the tolerated regression against the promoted model.

    Attributes:
        overall: minimum ``overall``.
        tags: tag -> minimum tag score (tags not listed are not checked).
        max_regression_overall: largest allowed drop of ``overall`` below the promoted
            model's ``geneval_overall``; None = not checked.
        max_regression_tags: largest allowed drop of any tag below the promoted model's
            ``geneval_<tag>``; None = not checked.
    """

    overall: float = 0.0
    tags: dict[str, float] = field(default_factory=dict)
    max_regression_overall: float | None = None
    max_regression_tags: float | None = None


@dataclass
class GateCheck:
    """One threshold: ``name`` (e.g. ``overall >= 0.2``, ``no regression: counting``),
    ``measured`` against ``required``, and whether it ``passed``."""

    name: str
    measured: float
    required: float
    passed: bool

    def describe(self) -> str:
        verdict = "ok" if self.passed else "FAILED"
        return f"{self.name}: measured {self.measured:.4f}, required >= {self.required:.4f} ({verdict})"


@dataclass
class GateResult:
    """The gate's verdict: ``passed``, ``failures`` (one readable line per failed
    threshold: its name, measured vs required), every ``checks`` entry, the promoted
    model compared against (``promoted``, None if none) and ``notes``."""

    passed: bool
    failures: list[str]
    checks: list[GateCheck]
    promoted: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "failures": self.failures, "checks": [asdict(c) for c in self.checks],
                "promoted": self.promoted, "notes": self.notes}

    @classmethod
    def from_dict(cls, d: dict) -> GateResult:
        return cls(d["passed"], list(d["failures"]), [GateCheck(**c) for c in d.get("checks", [])],
                   d.get("promoted"), list(d.get("notes", [])))

    def message(self) -> str:
        if self.passed:
            return f"gate passed ({len(self.checks)} checks)"
        return "gate failed: " + "; ".join(self.failures)


def gate_thresholds(params: dict) -> GateThresholds:
    """The :class:`GateThresholds` of ``params["gate"]`` (all checks off if absent).

    Raises:
        ValueError: a threshold outside [0, 1] or a negative regression tolerance.
    """
    g = params.get("gate") or {}
    reg = g.get("max_regression") or {}
    if not isinstance(reg, dict):
        reg = {"overall": reg, "tags": None}
    t = GateThresholds(
        overall=float(g.get("overall", 0.0) or 0.0),
        tags={k: float(v) for k, v in (g.get("tags") or {}).items()},
        max_regression_overall=None if reg.get("overall") is None else float(reg["overall"]),
        max_regression_tags=None if reg.get("tags") is None else float(reg["tags"]),
    )
    for name, v in [("overall", t.overall), *((f"tags.{k}", v) for k, v in t.tags.items())]:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"gate.{name} = {v} is outside [0, 1]")
    for name, v in [("overall", t.max_regression_overall), ("tags", t.max_regression_tags)]:
        if v is not None and v < 0:
            raise ValueError(f"gate.max_regression.{name} = {v} is negative")
    return t


def check_gate(scores: dict, thresholds: GateThresholds, promoted_metadata: dict | None = None,
               promoted_tag: str | None = None) -> GateResult:
    """Check a candidate's GenEval summary against the thresholds.

    Args:
        scores: GenEval summary (``overall``, ``tags``, ``prompts``) of the candidate.
        thresholds: :func:`gate_thresholds`.
        promoted_metadata: the promoted model's BentoML metadata (``geneval_overall``,
            ``geneval_<tag>``, ``prompts``), None when nothing is promoted yet.
        promoted_tag: its tag, recorded in the result.
    Returns:
        :class:`GateResult`; a tag the gate asks for but ``scores`` lacks counts as 0.
    """
    checks: list[GateCheck] = []
    notes: list[str] = []
    tags = scores.get("tags", {})

    def add(name: str, measured: float, required: float) -> None:
        checks.append(GateCheck(name, float(measured), float(required), float(measured) >= float(required) - 1e-12))

    add("overall", scores["overall"], thresholds.overall)
    for tag, minimum in thresholds.tags.items():
        if tag not in tags:
            notes.append(f"tag {tag} missing from the scores (counted as 0)")
        add(f"tag {tag}", tags.get(tag, 0.0), minimum)
    if promoted_metadata:
        same_set = promoted_metadata.get("prompts") in (None, scores.get("prompts"))
        if not same_set:
            notes.append(f"no regression check: the promoted model {promoted_tag} was scored on "
                         f"{promoted_metadata.get('prompts')} prompts, this candidate on {scores.get('prompts')}")
        else:
            if thresholds.max_regression_overall is not None and "geneval_overall" in promoted_metadata:
                ref = float(promoted_metadata["geneval_overall"])
                add(f"no regression: overall (promoted {promoted_tag} {ref:.4f} - {thresholds.max_regression_overall})",
                    scores["overall"], ref - thresholds.max_regression_overall)
            if thresholds.max_regression_tags is not None:
                for tag, value in sorted(tags.items()):
                    key = f"geneval_{tag}"
                    if key in promoted_metadata:
                        ref = float(promoted_metadata[key])
                        add(f"no regression: {tag} (promoted {ref:.4f} - {thresholds.max_regression_tags})",
                            value, ref - thresholds.max_regression_tags)
    else:
        notes.append("no promoted model yet: no regression check")
    failures = [c.describe() for c in checks if not c.passed]
    return GateResult(not failures, failures, checks, promoted_tag, notes)


__all__ = ["GateCheck", "GateFailedError", "GateResult", "GateThresholds", "check_gate", "gate_thresholds"]

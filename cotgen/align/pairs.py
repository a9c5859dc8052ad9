"""Preference pairs for DPO from labelled samples of *training* prompts (paper section 4;
DESIGN section 1).

Per prompt, the samples are labelled yes/no, either by the evaluator (detector + GenEval
rules: ``paths[i]["correct"]`` of :func:`cotgen.reward.data.sample_trajectories`) or by
the judge (PARM-guided DPO: the judge's outcome P(yes); "yes" when ``score >=
threshold``, "no" when ``score <= reject_threshold`` or, without one, ``score <
threshold``; a sample between the two is left out). A prompt gives one pair (chosen = a
yes sample, rejected = a no sample); prompts whose samples all got the same label are
skipped.

- evaluator labels: chosen and rejected are drawn at random (seeded) among the yes and
  the no samples;
- judge labels: the samples are ranked by P(yes): chosen = the highest-scoring yes,
  rejected = the lowest-scoring no (the judge has no labels, only scores).

The pairs file is JSONL in the format of the ``pairs`` expectation suite
(:mod:`cotgen.pipeline.validation`): ``{"prompt", "chosen": [codes], "rejected":
[codes], "metadata": GenEval line, ...}``; codes are VQ codes ``0..K-1`` in raster
order (not the generator's token ids, which add the text vocabulary size).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cotgen.jsonl import read_jsonl, write_jsonl


def build_pairs(
    tokens: torch.Tensor,
    paths: Sequence[dict],
    seed: int = 0,
    scores: Sequence[float] | np.ndarray | None = None,
    threshold: float | None = 0.5,
    min_gap: float = 0.0,
    reject_threshold: float | None = None,
) -> tuple[list[dict], dict]:
    """One (chosen, rejected) pair per prompt that has both a yes and a no sample.

    Args:
        tokens: ``(M, g*g)`` image codes of the M samples.
        paths: M dicts with ``prompt``, ``metadata`` (GenEval line), ``tag`` and
            ``correct`` (the evaluator's label).
        seed: seed of the random choice among yes / no samples (evaluator labels).
        scores: judge P(yes) per sample; None = use the evaluator's labels.
        threshold: with ``scores``: a sample is "yes" when its score is >= this; None =
            ranking only: chosen = the highest score, rejected = the lowest, for every
            prompt whose scores spread by more than ``min_gap`` (others are skipped as tied).
        min_gap: see ``threshold``.
        reject_threshold: with ``scores`` and ``threshold``: a sample is "no" only when
            its score is <= this, so samples scored in ``(reject_threshold, threshold)``
            are neither chosen nor rejected (the judge is unsure of them); None = every
            sample below ``threshold`` is "no".
    Returns:
        ``(pairs, stats)``. A pair: ``prompt``, ``tag``, ``metadata``, ``chosen``,
        ``rejected`` (code lists), ``labels`` ("evaluator" | "judge"), ``split`` (the
        samples' ``split``, when they have one),
        ``chosen_correct`` / ``rejected_correct`` (the evaluator's labels, also for judge
        pairs) and, with scores, ``chosen_score`` / ``rejected_score``. ``stats``:
        ``samples``, ``prompts``, ``pairs``, ``skipped_all_yes`` / ``skipped_all_no`` (prompts
        with no "no" / no "yes" sample),
        ``skipped_tied`` (ranking only), ``yes_rate`` (of the labels used; ranking only:
        of the evaluator's), ``pairs_per_tag`` and, for judge labels,
        ``pair_agreement`` (share of pairs whose chosen is correct and rejected is not,
        by the evaluator), ``label_agreement`` (judge label == evaluator label, over the
        labelled samples) and ``unsure_rate`` (share of samples left unlabelled).
    Raises:
        ValueError: the lengths of ``tokens``, ``paths`` and ``scores`` differ, or
            ``reject_threshold`` is not below ``threshold``.
    """
    if len(tokens) != len(paths) or (scores is not None and len(scores) != len(paths)):
        raise ValueError(f"{len(tokens)} token rows, {len(paths)} paths"
                         + (f", {len(scores)} scores" if scores is not None else "") + ": they must match")
    if reject_threshold is not None and (threshold is None or not reject_threshold < threshold):
        raise ValueError(f"reject_threshold {reject_threshold} must be below the judge threshold {threshold}")
    rng = np.random.default_rng(seed)
    use_judge = scores is not None
    score = np.asarray(scores, dtype=np.float64) if use_judge else None
    ranking = use_judge and threshold is None
    if use_judge and not ranking:  # True yes, False no, None unsure (between the thresholds)
        labels = [True if s >= threshold else (False if reject_threshold is None or s <= reject_threshold else None)
                  for s in score]
    else:
        labels = [bool(p["correct"]) for p in paths]
    by_prompt: dict[str, list[int]] = {}
    for i, p in enumerate(paths):
        by_prompt.setdefault(p["prompt"], []).append(i)
    pairs: list[dict] = []
    all_yes = all_no = tied = 0
    for prompt, rows in by_prompt.items():
        if ranking:  # the top and bottom sample of the judge's ranking
            if max(score[rows]) - min(score[rows]) <= min_gap:
                tied += 1
                continue
            yes, no = [max(rows, key=lambda i: (score[i], -i))], [min(rows, key=lambda i: (score[i], i))]
        else:
            yes = [i for i in rows if labels[i] is True]
            no = [i for i in rows if labels[i] is False]
        if not no:
            all_yes += 1
            continue
        if not yes:
            all_no += 1
            continue
        if use_judge:  # rank by P(yes); ties keep the first sample
            c = max(yes, key=lambda i: (score[i], -i))
            r = min(no, key=lambda i: (score[i], i))
        else:
            c, r = int(rng.choice(yes)), int(rng.choice(no))
        chosen, rejected = tokens[c].tolist(), tokens[r].tolist()
        if chosen == rejected:  # the same image labelled both ways cannot teach anything
            continue
        meta = paths[c]["metadata"]
        pair = {"prompt": prompt, "tag": meta.get("tag", paths[c].get("tag")), "metadata": meta,
                "chosen": chosen, "rejected": rejected, "labels": "judge" if use_judge else "evaluator",
                "chosen_correct": bool(paths[c]["correct"]), "rejected_correct": bool(paths[r]["correct"])}
        if "split" in paths[c]:
            pair["split"] = paths[c]["split"]
        if use_judge:
            pair["chosen_score"], pair["rejected_score"] = float(score[c]), float(score[r])
        pairs.append(pair)
    stats = {"samples": len(paths), "prompts": len(by_prompt), "pairs": len(pairs), "skipped_all_yes": all_yes,
             "skipped_all_no": all_no, "skipped_tied": tied,
             "yes_rate": float(np.mean([lab is True for lab in labels])) if labels else 0.0,
             "pairs_per_tag": dict(sorted(Counter(p["tag"] for p in pairs).items())), "labels":
             "judge" if use_judge else "evaluator"}
    if use_judge:
        stats["pair_agreement"] = (float(np.mean([p["chosen_correct"] and not p["rejected_correct"] for p in pairs]))
                                   if pairs else 0.0)
        if not ranking:
            known = [(lab, bool(p["correct"])) for lab, p in zip(labels, paths) if lab is not None]
            stats["label_agreement"] = float(np.mean([lab == ok for lab, ok in known])) if known else 0.0
            stats["unsure_rate"] = 1.0 - len(known) / len(labels) if labels else 0.0
    return pairs, stats


def threshold_sweep(
    tokens: torch.Tensor,
    paths: Sequence[dict],
    scores: Sequence[float] | np.ndarray,
    thresholds: Sequence[float] = (0.5, 0.7, 0.9),
    reject_thresholds: Sequence[float | None] = (None, 0.3, 0.1),
) -> list[dict]:
    """The judge-labelled pairs the same scored samples would give under other thresholds
    (:func:`build_pairs` per combination; ``reject_threshold`` at or above ``threshold``
    is left out): one row per combination with ``threshold``, ``reject_threshold``,
    ``pairs``, ``pair_agreement`` (chosen correct and rejected not, by the evaluator),
    ``label_agreement`` and ``unsure_rate``. A diagnostic for choosing the PARM-guided
    thresholds: it needs the evaluator's labels, so it is measured on training prompts only.
    """
    rows = []
    for t in thresholds:
        for r in reject_thresholds:
            if r is not None and r >= t:
                continue
            _, st = build_pairs(tokens, paths, scores=scores, threshold=t, reject_threshold=r)
            rows.append({"threshold": t, "reject_threshold": r, **{k: st[k] for k in
                         ("pairs", "pair_agreement", "label_agreement", "unsure_rate")}})
    return rows


def judge_scores(judge, generator, tokens: torch.Tensor, prompts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """The judge's outcome P(yes) of each (prompt, final image), images decoded from
    ``tokens`` ``(M, g*g)`` by the generator's image tokenizer: ``(M,)`` float64."""
    out = []
    for start in range(0, len(prompts), batch_size):
        images = generator.decode(tokens[start : start + batch_size])
        out.append(np.asarray(judge.score("outcome", list(prompts[start : start + batch_size]), images)))
    return np.concatenate(out) if out else np.zeros(0)


def write_pairs(path: str | Path, pairs: Sequence[dict]) -> None:
    """Write pairs as JSONL (one pair a line)."""
    write_jsonl(path, pairs)


def read_pairs(path: str | Path) -> list[dict]:
    """Read what :func:`write_pairs` wrote. Raises FileNotFoundError naming the file."""
    return read_jsonl(path, "no preference pairs: run the pairs stage (`cotgen stage pairs_dpo`)")

"""Search strategies replayed from one recorded run of all N paths (issue 4's curves).

Every strategy of :func:`cotgen.search.search` decides from judge scores of each path's
*own* images, and a path's tokens do not depend on which other paths are alive (per-path
seeds; the sampler gives a prompt the same images alone or in a batch). So one run that
generates all N paths of every prompt to the end and records, per path,

- the judge's ``clarity``, ``potential`` and ``step`` P(yes) after every step but the
  last (what the search would ask there, with the same ``progress``),
- the ``outcome`` P(yes) of the final image,
- GenEval's verdict on the final image (``correct``, ``reason``: the evaluator),

determines exactly what ``sample``, ``best_of_n`` (any N' <= N: candidates 0..N'-1 are
the same paths), ``prm`` and ``parm`` (any thresholds) would choose, and how many image
tokens they would generate. One generation run then gives GenEval against N and against
tokens for every strategy and threshold. :func:`replay` follows the decision rules of
:mod:`cotgen.search.strategies` line by line, including ties (the first candidate wins)
and PARM's "never leave a prompt without a path" fallback; :func:`check_against_traces`
compares a replay with a real search's traces.

``parm_top_k`` is a variant that is not the paper's: at the first clear step a prompt's
paths are ranked by potential and only the best ``k`` go on (a budget instead of a
threshold).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from cotgen.jsonl import read_jsonl

#: questions recorded after every step but the last
STEP_QUESTIONS = ("clarity", "potential", "step")


def _ask_all(judge, questions: Sequence[str], prompts: Sequence[str], images, progress: float) -> dict[str, np.ndarray]:
    """P(yes) per question for the same (prompt, image) pairs; a judge with
    ``score_features`` (:class:`cotgen.reward.object_judge.ObjectJudge`) computes its
    image inputs once."""
    prog = np.full(len(prompts), progress, dtype=np.float32)
    if hasattr(judge, "score_features") and hasattr(judge, "encode_prompts"):
        from cotgen.reward.object_judge import image_features

        words, feats = judge.encode_prompts(prompts), image_features(images, judge.model.config)
        return {q: judge.score_features(q, words, feats, prog) for q in questions}
    return {q: np.asarray(judge.score(q, list(prompts), list(images), prog), dtype=np.float64) for q in questions}


def record_paths(generator, judge, detector, eval_set: Sequence[dict], sampling, batch_prompts: int = 8,
                 images_per_prompt: int = 1, progress: bool = True) -> Iterable[dict]:
    """Generate all ``sampling.n`` paths of every prompt (final image ``j`` with seed
    ``sampling.seed + 1000 j``, as :func:`cotgen.pipeline.stages.search_eval_set`) and
    yield one record per (prompt, final image): ``index``, ``image``, ``prompt``, ``tag``,
    ``metadata`` (the GenEval line), ``num_steps``, ``tokens_per_step`` and ``paths``: per
    candidate ``clarity``/``potential``/``step`` (lists of ``num_steps - 1`` P(yes) in
    [0, 1]), ``outcome`` (P(yes)), ``correct`` (bool) and ``reason`` (GenEval's).

    Raises:
        ValueError: a bad knob or prompt (from the sampler or the judge).
    """
    from tqdm import tqdm

    from cotgen.geneval.scoring import judge_image
    from cotgen.search import stepwise_sampler

    total = images_per_prompt * len(eval_set)
    bar = tqdm(total=total, desc=f"record paths (N={sampling.n})", disable=not progress)
    for rep in range(images_per_prompt):
        cfg = replace(sampling, seed=sampling.seed + 1000 * rep)
        for start in range(0, len(eval_set), batch_prompts):
            chunk = eval_set[start : start + batch_prompts]
            prompts = [m["prompt"] for m in chunk]
            sampler = stepwise_sampler(generator, prompts, cfg)
            scores = {p.id: {q: [] for q in STEP_QUESTIONS} for p in sampler.paths}
            while not sampler.done:
                sampler.step()
                if sampler.done:
                    break
                ids = [p.id for p in sampler.paths]
                asked = _ask_all(judge, STEP_QUESTIONS, [prompts[p.prompt_index] for p in sampler.paths],
                                 sampler.images(ids), sampler.step_index / sampler.num_steps)
                for q, vals in asked.items():
                    for pid, v in zip(ids, vals):
                        scores[pid][q].append(float(v))
            finals = sampler.images([p.id for p in sampler.paths])
            outcome = _ask_all(judge, ("outcome",), [prompts[p.prompt_index] for p in sampler.paths], finals, 1.0)["outcome"]
            for i, meta in enumerate(chunk):
                paths = []
                for p, image, o in zip(sampler.paths, finals, outcome):
                    if p.prompt_index != i:
                        continue
                    correct, reason, _ = judge_image(detector, image, meta)
                    paths.append({"candidate": p.candidate, **scores[p.id], "outcome": float(o),
                                  "correct": bool(correct), "reason": reason})
                yield {"index": start + i, "image": rep, "prompt": meta["prompt"], "tag": meta["tag"],
                       "metadata": json.dumps(meta), "num_steps": sampler.num_steps,
                       "tokens_per_step": sampler.tokens_per_step, "paths": paths}
                bar.update(1)
    bar.close()


def replay(record: dict, strategy: str, n: int, clarity_threshold: float = 0.5, potential_threshold: float = 0.5,
           k: int | None = None) -> dict:
    """What ``strategy`` with N = ``n`` would have done on one recorded prompt.

    Args:
        record: a :func:`record_paths` record with at least ``n`` paths.
        strategy: ``sample``, ``best_of_n``, ``prm``, ``parm``, ``parm_top_k`` (``k``
            paths per prompt go on at the first clear step, by potential) or
            ``oracle`` (best-of-N with GenEval's verdict in place of the ORM: the first
            correct path, if any. Not a strategy anyone can run, since it asks the
            evaluator; it is the ceiling of every verifier over the same N paths).
    Returns:
        ``chosen`` (candidate), ``correct`` (GenEval's verdict on the chosen image),
        ``image_tokens`` (generated, cut paths included), ``cut`` (candidate -> step).
    Raises:
        ValueError: unknown strategy, ``n`` larger than the record, ``k`` missing.
    """
    paths = sorted(record["paths"], key=lambda p: p["candidate"])
    if not 1 <= n <= len(paths):
        raise ValueError(f"n must be in [1, {len(paths)}] for this record, got {n}")
    S, tps = record["num_steps"], record["tokens_per_step"]
    if strategy == "sample":
        return {"chosen": 0, "correct": paths[0]["correct"], "image_tokens": S * tps, "cut": {}}
    paths = paths[:n]
    alive = list(range(n))
    cut: dict[int, int] = {}
    if strategy == "prm":
        for s in range(S - 1):
            ranked = sorted(alive, key=lambda i: -paths[i]["step"][s])
            keep = max(1, (len(ranked) + 1) // 2)
            for i in ranked[keep:]:
                cut[i] = s + 1
            alive = [i for i in alive if i not in cut]
    elif strategy in ("parm", "parm_top_k"):
        if strategy == "parm_top_k" and not k:
            raise ValueError("parm_top_k needs k >= 1")
        clear_at: dict[int, int] = {}
        for s in range(S - 1):
            newly = [i for i in alive if i not in clear_at and paths[i]["clarity"][s] >= clarity_threshold]
            for i in newly:
                clear_at[i] = s
            if not newly:
                continue
            if strategy == "parm":
                drop = {i for i in newly if paths[i]["potential"][s] < potential_threshold}
                if drop and all(i in drop for i in alive):
                    drop.discard(max(alive, key=lambda i: paths[i]["potential"][clear_at[i]]))
            else:  # budget: at most k paths go on past their clear step
                passed = [i for i in alive if i in clear_at and i not in newly]
                room = max(0, k - len(passed))
                ranked = sorted(newly, key=lambda i: -paths[i]["potential"][s])
                drop = set(ranked[room:])
                if drop and all(i in drop for i in alive):
                    drop.discard(ranked[0])
            for i in drop:
                cut[i] = s + 1
            alive = [i for i in alive if i not in drop]
    elif strategy not in ("best_of_n", "oracle"):
        raise ValueError(f"unknown strategy {strategy!r}")
    if strategy == "oracle":
        best = next((i for i in alive if paths[i]["correct"]), alive[0])
    else:
        best = max(alive, key=lambda i: paths[i]["outcome"])
    tokens = sum(cut.get(i, S) * tps for i in range(n))
    return {"chosen": best, "correct": paths[best]["correct"], "image_tokens": tokens, "cut": cut}


def replay_summary(records: Sequence[dict], strategy: str, n: int, **knobs) -> dict:
    """GenEval summary (:func:`cotgen.geneval.scoring.summarize`) of a replayed strategy
    over all records, plus ``strategy``, ``n``, the knobs and ``image_tokens_per_image``."""
    from cotgen.geneval.scoring import summarize

    lines, tokens = [], []
    for r in records:
        out = replay(r, strategy, n, **knobs)
        lines.append({"tag": r["tag"], "metadata": r["metadata"], "correct": out["correct"]})
        tokens.append(out["image_tokens"])
    summary = summarize(lines, n=n)
    summary.update(strategy=strategy, n=n, image_tokens_per_image=float(np.mean(tokens)), replayed=True, **knobs)
    return summary


def replay_setting(records: Sequence[dict], setting: dict, n: int) -> dict:
    """:func:`replay_summary` of one setting: the knobs of :func:`replay` plus its
    ``strategy`` in one dict (e.g. ``{"strategy": "parm_top_k", "clarity_threshold":
    0.5, "k": 4}``).

    Raises:
        KeyError: a setting without ``strategy``.
    """
    return replay_summary(records, setting["strategy"], n, **{k: v for k, v in setting.items() if k != "strategy"})


def calibrate_parm(records: Sequence[dict], n: int, settings: Sequence[dict]) -> dict:
    """Choose PARM's knobs on recordings of prompts that neither the judge's training nor
    the evaluation uses (the judge's held-out training prompts), so that no threshold is
    picked on the evaluation set.

    The rule, from issue 4's bar (PARM at least as good as best-of-N with fewer image
    tokens): among ``settings``, the one with the fewest image tokens per image whose
    GenEval-Shapes overall on ``records`` is at least best-of-``n``'s on the same records;
    if none reaches it, the highest overall (fewest tokens among ties).

    Args:
        records: :func:`record_paths` records with at least ``n`` paths each.
        n: N, candidate paths per final image.
        settings: knobs of :func:`replay`, each with ``strategy`` (``parm`` or
            ``parm_top_k``), e.g. ``{"strategy": "parm", "clarity_threshold": 0.5,
            "potential_threshold": 0.2}``.
    Returns:
        ``best_of_n`` (its replay summary on ``records``), ``rows`` (one replay summary
        per setting, in order), ``chosen`` (the chosen setting, a copy) and
        ``reaches_best_of_n`` (bool).
    Raises:
        ValueError: no records, no settings, a setting that is not PARM's.
    """
    if not records:
        raise ValueError("no records to calibrate on")
    if not settings:
        raise ValueError("no PARM settings to choose from")
    bad = [s for s in settings if s.get("strategy") not in ("parm", "parm_top_k")]
    if bad:
        raise ValueError(f"calibrate_parm chooses among parm / parm_top_k settings, got {bad[0]}")
    reference = replay_summary(records, "best_of_n", n)
    rows = [replay_setting(records, s, n) for s in settings]
    reaching = [i for i, r in enumerate(rows) if r["overall"] >= reference["overall"] - 1e-12]
    if reaching:
        best = min(reaching, key=lambda i: (rows[i]["image_tokens_per_image"], i))
    else:
        best = min(range(len(rows)), key=lambda i: (-rows[i]["overall"], rows[i]["image_tokens_per_image"], i))
    return {"best_of_n": reference, "rows": rows, "chosen": dict(settings[best]), "reaches_best_of_n": bool(reaching)}


def judge_on_records(records: Sequence[dict], ci: bool = True) -> dict:
    """How well the recorded judge scores separate GenEval's verdicts on the recorded
    (evaluation-set) paths, which no judge is trained on: ``outcome`` (P(yes) of every
    final image; AUROC, its 95% bootstrap interval with ``ci``, accuracy at 0.5, ``n``,
    ``yes_rate``), ``outcome_by_tag`` (AUROC within each GenEval tag: how well the ORM
    picks among one prompt's kind of paths), ``potential_by_step`` (AUROC of
    potential after step s + 1 against the path's final verdict, all paths pooled) and
    ``potential_within_prompt_by_step`` (the same, counting only pairs of one record's
    paths, one correct and one wrong: what a cut among one prompt's paths can use, since
    pooled AUROC also rewards telling easy prompts from hard ones; ``None`` without a
    record whose paths disagree).

    Raises:
        ValueError: no records.
    """
    from cotgen.reward.train import binary_metrics

    if not records:
        raise ValueError("no records to measure the judge on")
    paths = [(r["tag"], p) for r in records for p in r["paths"]]
    labels = np.array([p["correct"] for _, p in paths], dtype=int)
    out = {"outcome": binary_metrics(labels, np.array([p["outcome"] for _, p in paths]), ci=ci)}
    out["outcome_by_tag"] = {}
    for tag in sorted({t for t, _ in paths}):
        m = np.array([t == tag for t, _ in paths])
        out["outcome_by_tag"][tag] = binary_metrics(labels[m], np.array([p["outcome"] for t, p in paths if t == tag]))
    steps = len(paths[0][1]["potential"])
    out["potential_by_step"] = {
        str(s + 1): binary_metrics(labels, np.array([p["potential"][s] for _, p in paths]))["auroc"] for s in range(steps)
    }
    out["potential_within_prompt_by_step"] = {str(s + 1): _within_record_auroc(records, s) for s in range(steps)}
    return out


def _within_record_auroc(records: Sequence[dict], s: int) -> float | None:
    """P(potential after step s + 1 of a correct path > that of a wrong path of the same
    record), ties counted half, over all such pairs; None without one."""
    return within_group_auroc(([p["correct"] for p in r["paths"]], [p["potential"][s] for p in r["paths"]])
                              for r in records)


def within_group_auroc(groups: Iterable[tuple[Sequence[bool], Sequence[float]]]) -> float | None:
    """P(score of a positive > score of a negative of the same group), ties counted half,
    over all such pairs of every ``(labels, scores)`` group; None without one."""
    wins = pairs = 0.0
    for labels, scores in groups:
        labels, scores = np.asarray(labels, dtype=bool), np.asarray(scores, dtype=np.float64)
        diff = scores[labels][:, None] - scores[~labels][None, :]
        wins += (diff > 0).sum() + 0.5 * (diff == 0).sum()
        pairs += diff.size
    return float(wins / pairs) if pairs else None


def check_against_traces(records: Sequence[dict], trace_lines: Sequence[dict], strategy: str, **knobs) -> dict:
    """Compare replays with a real search's trace lines (``data/traces/<name>.jsonl``):
    the fraction of (prompt, image) pairs with the same chosen candidate and the same
    image tokens."""
    by_key = {(r["index"], r["image"]): r for r in records}
    same_choice = same_tokens = total = 0
    for t in trace_lines:
        r = by_key.get((t["index"], t["image"]))
        if r is None:
            continue
        out = replay(r, strategy, t["n"], **knobs)
        total += 1
        same_choice += out["chosen"] == t["chosen"]
        same_tokens += out["image_tokens"] == t["compute"]["image_tokens"]
    if not total:
        raise ValueError("no trace line matches a record (index, image)")
    return {"compared": total, "same_choice": same_choice / total, "same_tokens": same_tokens / total}


def read_records(path: str | Path) -> list[dict]:
    """The JSON lines of ``path`` (:func:`record_paths`' records, or a search's trace lines)."""
    return read_jsonl(path)

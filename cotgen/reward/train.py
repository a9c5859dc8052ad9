"""Training and measuring the judge on labelled trajectories (issue 4).

The examples come from :func:`cotgen.reward.data.judge_examples`; each (path, step)
image is decoded once from its tokens (tokens not generated yet drawn as background),
turned into the judge's inputs once, and reused by every question asked about it.
Training uses the transformers ``Trainer``; held-out prompts are never trained on.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import accuracy_score, roc_auc_score
from tqdm import tqdm
from transformers import Trainer

from cotgen.reward.data import Trajectories
from cotgen.reward.object_judge import (
    QUESTION_IDS,
    ObjectJudge,
    ObjectJudgeConfig,
    ObjectJudgeModel,
    image_features,
    word_classes,
)
from cotgen.training import training_arguments


def decode_steps(traj: Trajectories, image_tokenizer, keys: Sequence[tuple[int, int]], batch_size: int = 256):
    """Intermediate images of ``(path, step)`` keys (step = steps completed), as PIL."""
    from cotgen.tokenizer.vq import tensor_to_pil

    g = int(round(traj.tokens.shape[1] ** 0.5))
    images = []
    for start in range(0, len(keys), batch_size):
        chunk = keys[start : start + batch_size]
        codes = traj.tokens[[p for p, _ in chunk]].view(-1, g, g)
        known = torch.zeros(len(chunk), g * g, dtype=torch.bool)
        for row, (_, s) in enumerate(chunk):
            known[row, : s * traj.tokens_per_step] = True
        with torch.no_grad():
            images += tensor_to_pil(image_tokenizer.decode_masked(codes, known.view(-1, g, g)))
    return images


class FeatureBank:
    """Judge inputs of every (path, step) image used by a set of examples."""

    def __init__(self, traj: Trajectories, image_tokenizer, examples: Sequence[dict], config: ObjectJudgeConfig,
                 progress: bool = True, chunk: int = 512, perception_labeller=None) -> None:
        self.keys = sorted({(e["path"], e["step"]) for e in examples})
        self.index = {k: i for i, k in enumerate(self.keys)}
        parts = []
        for start in tqdm(range(0, len(self.keys), chunk), desc="judge features", disable=not progress):
            images = decode_steps(traj, image_tokenizer, self.keys[start : start + chunk])
            parts.append(image_features(images, config, perception_labeller))
        self.features = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}

    def get(self, rows: Sequence[int]) -> dict:
        return {k: v[list(rows)] for k, v in self.features.items()}


def with_word_rows(traj: Trajectories, examples: Sequence[dict]) -> tuple[list[str], list[dict]]:
    """The prompt texts the examples ask about, and the examples with ``words_row`` (their
    row in those texts): the path's own prompt, or an example's ``prompt`` when it asks
    about another (a colour counterfactual)."""
    texts = [p["prompt"] for p in traj.paths]
    extra: dict[str, int] = {}
    out = []
    for e in examples:
        if "prompt" in e:
            row = extra.setdefault(e["prompt"], len(texts) + len(extra))
        else:
            row = e["path"]
        out.append({**e, "words_row": row})
    return texts + list(extra), out


class ExampleDataset(torch.utils.data.Dataset):
    def __init__(self, examples, bank: FeatureBank, words: torch.Tensor, num_steps: int) -> None:
        self.examples, self.bank, self.words, self.num_steps = list(examples), bank, words, num_steps

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        e = self.examples[i]
        row = self.bank.index[(e["path"], e["step"])]
        return {
            **{k: v[row] for k, v in self.bank.features.items()},
            "words": self.words[e.get("words_row", e["path"])],
            "question": torch.tensor(QUESTION_IDS[e["question"]]),
            "progress": torch.tensor(e["step"] / self.num_steps, dtype=torch.float32),
            "labels": torch.tensor(int(e["label"])),
        }


def train_judge(
    out_dir: str | Path,
    traj: Trajectories,
    examples: Sequence[dict],
    image_tokenizer,
    text_tokenizer,
    model_size: Mapping[str, int] | None = None,
    steps: int = 2000,
    batch_size: int = 64,
    learning_rate: float = 5e-4,
    warmup_steps: int = 100,
    seed: int = 0,
    progress: bool = True,
    perception_labeller=None,
    word_grounding: bool = False,
) -> tuple[ObjectJudge, dict]:
    """Train the object-centric judge on the ``train`` split of ``examples``; save it to
    ``out_dir``; return it and the held-out metrics of :func:`evaluate_judge`.

    An example asks about its path's prompt, or about its own ``prompt`` when it has one
    (a colour counterfactual, :mod:`cotgen.reward.counterfactual`).
    ``perception_labeller`` (the world's detector) supplies per-object shape / colour
    targets of the training images (:class:`ObjectJudgeModel`); held-out examples are
    scored without it, as at test time. ``word_grounding`` gives the judge the grounding
    features of its prompt words (:func:`cotgen.reward.object_judge.word_classes`).

    Raises:
        ValueError: no training examples, or only one label.
    """
    torch.manual_seed(seed)
    texts, examples = with_word_rows(traj, examples)
    train = [e for e in examples if e["split"] == "train"]
    held = [e for e in examples if e["split"] == "heldout"]
    if not train or len({e["label"] for e in train}) < 2:
        raise ValueError(f"need training examples of both labels, got {len(train)} examples")
    for q in sorted({e["question"] for e in train}):
        if len({e["label"] for e in train if e["question"] == q}) < 2:
            warnings.warn(f"judge: every {q!r} training label is the same; that question cannot be learned", stacklevel=2)
    config = ObjectJudgeConfig(text_vocab=len(text_tokenizer), pad_token_id=text_tokenizer.pad_token_id,
                               word_classes=word_classes(text_tokenizer) if word_grounding else None,
                               **(model_size or {}))
    model = ObjectJudgeModel(config)
    judge = ObjectJudge(model, text_tokenizer)
    words = judge.encode_prompts(texts)
    bank = FeatureBank(traj, image_tokenizer, train, config, progress, perception_labeller=perception_labeller)
    # held-out targets only measure the perception heads (metrics "perception"); scores never see them
    held_bank = FeatureBank(traj, image_tokenizer, held, config, progress, perception_labeller=perception_labeller)
    args = training_arguments(out_dir, steps, batch_size, learning_rate, warmup_steps, 0.01, seed, progress)
    model.train()
    result = Trainer(model=model, args=args, train_dataset=ExampleDataset(train, bank, words, traj.num_steps)).train()
    model.eval()
    judge = ObjectJudge(model.cpu(), text_tokenizer)
    judge.save_pretrained(out_dir)
    metrics = {"train_examples": len(train), "heldout_examples": len(held), "train_loss": float(result.training_loss),
               "steps": steps, "parameters": int(sum(p.numel() for p in model.parameters()))}
    metrics.update(evaluate_judge(judge, held, held_bank, words, traj.num_steps))
    return judge, metrics


def evaluate_judge(judge: ObjectJudge, examples, bank: FeatureBank, words, num_steps: int, batch_size: int = 512) -> dict:
    """Held-out AUROC and accuracy (threshold 0.5) per question, plus potential AUROC
    per step (the data behind the clarity boundary) and, when ``bank`` holds the
    detector's perception targets, ``perception`` (:func:`perception_agreement` on the
    final images)."""
    out: dict = {}
    if "color_targets" in bank.features:
        finals = sorted({bank.index[(e["path"], e["step"])] for e in examples if e["step"] == num_steps})
        out["perception"] = perception_agreement(judge.model, bank.get(finals))
    by_q: dict[str, list[dict]] = {}
    for e in examples:  # colour counterfactuals are measured apart ("outcome_counterfactual", ...)
        by_q.setdefault(e["question"] + ("_counterfactual" if e.get("counterfactual") else ""), []).append(e)
    for q, ex in sorted(by_q.items()):
        scores = score_examples(judge, q.removesuffix("_counterfactual"), ex, bank, words, num_steps, batch_size)
        labels = np.array([e["label"] for e in ex], dtype=int)
        out[q] = binary_metrics(labels, scores, ci=True)
        if q == "outcome_counterfactual":
            tags = np.array([e["tag"] for e in ex])
            out["outcome_counterfactual_by_tag"] = {t: binary_metrics(labels[tags == t], scores[tags == t])
                                                    for t in sorted(set(tags.tolist()))}
        if q == "potential":
            steps = sorted({e["step"] for e in ex})
            out["potential_auroc_by_step"] = {
                str(s): binary_metrics(labels[m], scores[m])["auroc"]
                for s in steps
                for m in [np.array([e["step"] == s for e in ex])]
            }
    return out


@torch.no_grad()
def perception_agreement(model: ObjectJudgeModel, features: dict) -> dict:
    """How often the judge's perception heads agree with the detector (arg-max of each
    object's shape and colour distribution): ``objects`` (count), ``shape`` and
    ``color`` (fractions in [0, 1]). ``features`` come from :func:`image_features` with
    a ``perception_labeller``; a measurement only (the detector is the evaluator's).

    Raises:
        KeyError: features without the perception targets.
    """
    tokens = model.object_tokens(features["crops"], features["geometry"], features["object_mask"])
    shape_logits, color_logits = tokens.shape_logits, tokens.color_logits
    valid = features["object_mask"].bool()
    n = int(valid.sum())

    def agree(logits, targets):
        return float((logits.argmax(-1)[valid] == targets.argmax(-1)[valid]).float().mean()) if n else None

    return {"objects": n, "shape": agree(shape_logits, features["shape_targets"]),
            "color": agree(color_logits, features["color_targets"])}


def score_examples(judge, question, examples, bank, words, num_steps, batch_size=512) -> np.ndarray:
    scores = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        rows = [bank.index[(e["path"], e["step"])] for e in chunk]
        prog = np.array([e["step"] / num_steps for e in chunk], dtype=np.float32)
        word_rows = [e.get("words_row", e["path"]) for e in chunk]
        scores.append(judge.score_features(question, words[word_rows], bank.get(rows), prog))
    return np.concatenate(scores) if scores else np.zeros(0)


def binary_metrics(labels: np.ndarray, scores: np.ndarray, ci: bool = False) -> dict:
    """How well scores separate binary labels: ``n``, ``yes_rate`` (share of label 1),
    ``auroc`` (None unless both labels occur), ``accuracy`` (score >= 0.5 read as yes) and,
    with ``ci``, ``auroc_ci95`` (:func:`auroc_ci95`).

    Args:
        labels: ``(M,)`` int, 1 = yes (the evaluator's verdict).
        scores: ``(M,)`` float, P(yes) in [0, 1].
    """
    both = len(set(labels.tolist())) == 2
    out = {
        "n": int(len(labels)),
        "yes_rate": float(labels.mean()) if len(labels) else None,
        "auroc": float(roc_auc_score(labels, scores)) if both else None,
        "accuracy": float(accuracy_score(labels, scores >= 0.5)) if len(labels) else None,
    }
    if ci:
        out["auroc_ci95"] = auroc_ci95(labels, scores)
    return out


def auroc_by_ranks(labels: np.ndarray, scores: np.ndarray, axis: int = -1) -> np.ndarray:
    """AUROC along ``axis`` by the Mann-Whitney rank sum: ``(R+ - n+(n+ + 1)/2) / (n+ n-)``
    with ``R+`` the sum of the positives' ranks (ties get their average rank), which is
    ``sklearn.metrics.roc_auc_score`` for every row at once.

    Args:
        labels: ``(..., n)`` 0/1 ints.
        scores: ``(..., n)`` floats, the same shape.

    Returns:
        ``(...)`` float64 AUROC in [0, 1]; NaN where a row has only one label."""
    from scipy.stats import rankdata

    labels = np.asarray(labels)
    ranks = rankdata(np.asarray(scores, dtype=float), axis=axis)
    positives = labels.sum(axis=axis).astype(float)
    negatives = labels.shape[axis] - positives
    rank_sum = (ranks * labels).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)
    return np.where((positives > 0) & (negatives > 0), auc, np.nan)


def auroc_ci95(labels: np.ndarray, scores: np.ndarray, n_resamples: int = 1000, seed: int = 0) -> list[float] | None:
    """95% percentile-bootstrap interval of the AUROC (``scipy.stats.bootstrap``, paired
    resampling of (label, score), seeded); ``None`` with fewer than 5 examples of either
    label. Held-out sets here are small (the outcome question had 18 positives of 232), so
    a point AUROC moves by several points between judge seeds; the interval says how much.
    Each resample's AUROC is :func:`auroc_by_ranks` (all resamples at once; the same value
    as ``sklearn.metrics.roc_auc_score``)."""
    from scipy.stats import bootstrap

    labels = np.asarray(labels, dtype=int)
    if min(int(labels.sum()), int((1 - labels).sum())) < 5:
        return None
    # 100 resamples at a time: memory ~ 100 x len(labels) per array (the evaluation paths give 10^5 scores)
    res = bootstrap((labels, np.asarray(scores, dtype=float)), auroc_by_ranks, paired=True, vectorized=True,
                    n_resamples=n_resamples, batch=100, method="percentile", rng=np.random.default_rng(seed))
    return [float(res.confidence_interval.low), float(res.confidence_interval.high)]

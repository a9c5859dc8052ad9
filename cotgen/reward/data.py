"""Training data of the reward models (paper section 3; DESIGN section 1).

Trajectories: several paths per *training* prompt, sampled with the generator; a path's
intermediate image after step ``s`` is its first ``s * tokens_per_step`` tokens decoded
with the rest drawn as background, so the tokens are all that is stored.

Labels, all from the GenEval-Shapes evaluator (detector + GenEval's rules):

- outcome (ORM): the final image is correct, with the evaluator's reason;
- step (PRM), Math-Shepherd style: from step ``s`` of a path, ``k`` completions are
  rolled out; the step is "yes" if any of them ends correct;
- clarity (PARM stage 1): step ``s`` is clear iff ``s >= clarity_boundary`` (the
  paper's static rule: late steps clear, early ones not);
- potential (PARM stage 2): every step from the first clear one on inherits its path's
  outcome label.

Prompts are split into train / held-out (judges are measured on held-out prompts only).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from cotgen.generator.sampling import SamplingConfig, StepwiseSampler
from cotgen.geneval.scoring import judge_image
from cotgen.jsonl import read_jsonl, write_jsonl

TOKENS_FILE = "tokens.safetensors"
PATHS_FILE = "paths.jsonl"
PRM_FILE = "prm.jsonl"


@dataclass
class Trajectories:
    """Sampled paths and their labels.

    Attributes:
        tokens: ``(M, g*g)`` long image codes of the M paths (raster order).
        paths: M dicts: ``prompt``, ``tag``, ``metadata`` (GenEval metadata line),
            ``candidate``, ``split`` ("train" | "heldout"), ``correct`` (bool outcome
            label), ``reason`` (the evaluator's).
        prm: step labels: dicts ``path`` (row of ``tokens``), ``step`` (1-based),
            ``correct`` (any roll-out correct), ``rollouts_correct`` (how many of k).
        tokens_per_step: image tokens per step.
    """

    tokens: torch.Tensor
    paths: list[dict]
    prm: list[dict]
    tokens_per_step: int

    @property
    def num_steps(self) -> int:
        return self.tokens.shape[1] // self.tokens_per_step

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({"tokens": self.tokens.to(torch.int16).contiguous()}, str(directory / TOKENS_FILE),
                  metadata={"tokens_per_step": str(self.tokens_per_step)})
        write_jsonl(directory / PATHS_FILE, self.paths)
        write_jsonl(directory / PRM_FILE, self.prm)

    @classmethod
    def load(cls, directory: str | Path) -> Trajectories:
        """Raises FileNotFoundError naming the missing file."""
        from safetensors import safe_open

        directory = Path(directory)
        for name in (TOKENS_FILE, PATHS_FILE, PRM_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} is missing; run `dvc repro trajectories`")
        with safe_open(str(directory / TOKENS_FILE), "pt") as f:
            tps = int(f.metadata()["tokens_per_step"])
        tokens = load_file(str(directory / TOKENS_FILE))["tokens"].long()
        return cls(tokens, read_jsonl(directory / PATHS_FILE), read_jsonl(directory / PRM_FILE), tps)


def split_prompts(prompts: Sequence[str], heldout_fraction: float, seed: int) -> dict[str, str]:
    """Prompt -> "train" | "heldout", a seeded random split of the distinct prompts."""
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must lie in (0, 1), got {heldout_fraction}")
    distinct = sorted(set(prompts))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(distinct))
    n_held = max(1, round(heldout_fraction * len(distinct)))
    held = {distinct[i] for i in order[:n_held]}
    return {p: ("heldout" if p in held else "train") for p in distinct}


def label_images(detector, images, metas) -> list[tuple[bool, str]]:
    """The evaluator's (correct, reason) for each (image, metadata) pair."""
    out = []
    for image, meta in zip(images, metas):
        correct, reason, _ = judge_image(detector, image, meta)
        out.append((bool(correct), reason))
    return out


def sample_trajectories(
    generator,
    detector,
    prompts: Sequence[dict],
    paths_per_prompt: int,
    sampling: SamplingConfig,
    heldout_fraction: float = 0.2,
    prm_steps: Sequence[int] = (),
    prm_rollouts: int = 4,
    prm_paths_per_prompt: int = 1,
    batch_prompts: int = 8,
    seed: int = 0,
    progress: bool = True,
    heldout_paths_per_prompt: int | None = None,
    tag_paths_per_prompt: Mapping[str, int] | None = None,
) -> Trajectories:
    """Sample and label trajectories of training prompts.

    Args:
        generator: the generator to sample from.
        detector: the GenEval-Shapes detector (the evaluator's eyes).
        prompts: GenEval metadata lines of *training* prompts.
        paths_per_prompt: paths sampled per prompt.
        sampling: knobs (its ``n`` is replaced by ``paths_per_prompt``).
        heldout_fraction: share of prompts held out for measuring judges.
        prm_steps: steps (1-based) from which PRM roll-outs start; empty = no PRM labels.
        prm_rollouts: k, completions per (path, step).
        prm_paths_per_prompt: the first this many paths of each prompt get PRM labels.
        heldout_paths_per_prompt: paths of each *held-out* prompt in all (more than
            ``paths_per_prompt``; ``None`` = the same). Measurement only: the extra
            paths (candidates ``paths_per_prompt`` on, appended after every other
            path, no PRM labels) leave the training data exactly as without them. With
            8 paths the held-out outcome question had 18 positives of 232 images, and
            its AUROC's 95% interval was 0.2 wide.
        tag_paths_per_prompt: tag -> paths of each prompt of that tag, instead of
            ``paths_per_prompt`` (held-out prompts too; ``heldout_paths_per_prompt`` tops
            them up only where it is larger). For tags whose training prompts are few: the
            embedded world has 2 single_object, 8 two_object and 17 colors training prompts
            (the rest of those tags' prompts are evaluation prompts), so 8 paths each gave
            the judge about 65 correct generated images in all to learn from.
    Returns:
        :class:`Trajectories`.
    Raises:
        ValueError: a bad knob (named).
    """
    if paths_per_prompt < 1 or prm_rollouts < 1:
        raise ValueError("paths_per_prompt and prm_rollouts must be >= 1")
    if heldout_paths_per_prompt is not None and heldout_paths_per_prompt < paths_per_prompt:
        raise ValueError(f"heldout_paths_per_prompt ({heldout_paths_per_prompt}) must be >= paths_per_prompt "
                         f"({paths_per_prompt})")
    bad = {t: n for t, n in (tag_paths_per_prompt or {}).items() if int(n) < 1}
    if bad:
        raise ValueError(f"tag_paths_per_prompt must be >= 1 per tag, got {bad}")
    cfg = SamplingConfig(**{**sampling.__dict__, "n": paths_per_prompt})
    tps = cfg.check(generator.num_image_tokens, generator.grid_size)
    split = split_prompts([m["prompt"] for m in prompts], heldout_fraction, seed)
    n_paths = {m["prompt"]: int((tag_paths_per_prompt or {}).get(m["tag"], paths_per_prompt)) for m in prompts}

    def sample(group: list[dict], n: int, first: int) -> tuple[list, list]:
        size = max(1, batch_prompts * paths_per_prompt // n)  # about the same rows per batch
        return _sample_labelled(generator, detector, group, SamplingConfig(**{**sampling.__dict__, "n": n}), size,
                                split, first, progress)

    tokens, paths = [], []
    for n in sorted(set(n_paths.values()), key=lambda n: (n != paths_per_prompt, n)):
        more_tokens, more_paths = sample([m for m in prompts if n_paths[m["prompt"]] == n], n, 0)
        tokens, paths = tokens + more_tokens, paths + more_paths
    tokens_t = torch.tensor(tokens, dtype=torch.long)
    prm = prm_labels(generator, detector, tokens_t, paths, prm_steps, prm_rollouts, prm_paths_per_prompt, cfg, tps,
                     batch_prompts, progress)
    top_up = heldout_paths_per_prompt or 0
    held = [m for m in prompts if split[m["prompt"]] == "heldout" and n_paths[m["prompt"]] < top_up]
    for first in sorted({n_paths[m["prompt"]] for m in held}):
        extra_tokens, extra_paths = sample([m for m in held if n_paths[m["prompt"]] == first], top_up, first)
        if extra_tokens:
            tokens_t = torch.cat([tokens_t, torch.tensor(extra_tokens, dtype=torch.long)])
            paths += extra_paths
    return Trajectories(tokens_t, paths, prm, tps)


def _sample_labelled(generator, detector, prompts, cfg, batch_prompts, split, first_candidate, progress):
    """Token lists and path dicts of candidates ``first_candidate .. cfg.n - 1`` of every
    prompt (per-path seeds: candidate j is the same path whatever ``cfg.n``)."""
    tokens, paths = [], []
    for start in tqdm(range(0, len(prompts), batch_prompts), desc="trajectories", disable=not progress):
        chunk = prompts[start : start + batch_prompts]
        sampler = StepwiseSampler(generator, [m["prompt"] for m in chunk], cfg)
        sampler.run()
        keep = [p for p in sampler.paths if p.candidate >= first_candidate]
        images = sampler.images([p.id for p in keep])
        metas = [chunk[p.prompt_index] for p in keep]
        for p, (correct, reason), meta in zip(keep, label_images(detector, images, metas), metas):
            tokens.append(p.tokens)
            paths.append({"prompt": meta["prompt"], "tag": meta["tag"], "metadata": meta, "candidate": p.candidate,
                          "split": split[meta["prompt"]], "source": "generator", "correct": correct,
                          "reason": reason})
    return tokens, paths


def render_trajectories(
    image_tokenizer,
    detector,
    prompts: Sequence[dict],
    near_misses: int,
    tokens_per_step: int,
    style=None,
    seed: int = 0,
    progress: bool = True,
) -> Trajectories:
    """Synthetic paths from the renderer, to give the judge more (and more varied) labelled
    images than the generator's trajectories alone: per training prompt one scene that
    satisfies it and ``near_misses`` near misses (each of a random applicable kind:
    :func:`cotgen.world.render.render_near_miss`). Each scene is encoded by the image
    tokenizer (its codes are the path's tokens, so its intermediate images are drawn like
    a generated path's) and labelled by the evaluator *on the decoded image*, the way
    generated paths are labelled (a near miss can come out correct, a scene wrong).
    Every path is ``split`` "train" and ``source`` "render": judges are measured on
    generated paths of held-out prompts only, so ``prompts`` must not contain those.

    Args:
        image_tokenizer: the VQ tokenizer (``encode_images``, ``decode_images``).
        detector: the GenEval-Shapes detector.
        prompts: GenEval metadata lines of training prompts.
        near_misses: near misses per prompt (>= 0).
        tokens_per_step: image tokens per step of the generator's search.
        style: a :class:`cotgen.world.render.RenderStyle` (default the generator's
            training style, CANONICAL).
    Returns:
        :class:`Trajectories` with ``len(prompts) * (1 + near_misses)`` paths, no PRM labels.
    Raises:
        ValueError: ``near_misses < 0``.
    """
    from cotgen.world.render import CANONICAL, near_miss_kinds, render_near_miss, render_scene

    if near_misses < 0:
        raise ValueError(f"near_misses must be >= 0, got {near_misses}")
    style = style or CANONICAL
    rng = np.random.default_rng(seed)
    images, paths = [], []
    for meta in tqdm(prompts, desc="rendered paths", disable=not progress):
        scenes = [("scene", render_scene(meta, rng, style=style)[0])]
        kinds = near_miss_kinds(meta)
        for j in range(near_misses):
            kind = kinds[int(rng.integers(len(kinds)))]
            scenes.append((kind, render_near_miss(meta, rng, kind, style=style)[0]))
        for j, (kind, image) in enumerate(scenes):
            images.append(image)
            paths.append({"prompt": meta["prompt"], "tag": meta["tag"], "metadata": meta, "candidate": j,
                          "split": "train", "source": "render", "render": kind})
    tokens = image_tokenizer.encode_images(images).flatten(1) if images else torch.zeros(0, 0, dtype=torch.long)
    decoded = image_tokenizer.decode_images(tokens)
    for path, (correct, reason) in zip(paths, label_images(detector, decoded, [p["metadata"] for p in paths])):
        path["correct"], path["reason"] = correct, reason
    return Trajectories(tokens.long(), paths, [], tokens_per_step)


def concat_trajectories(first: Trajectories, *others: Trajectories) -> Trajectories:
    """Paths of ``first`` then of ``others`` (PRM ``path`` indices shifted).

    Raises:
        ValueError: different ``tokens_per_step`` or image token counts.
    """
    tokens, paths, prm = [first.tokens], list(first.paths), list(first.prm)
    for t in others:
        if t.tokens_per_step != first.tokens_per_step or t.tokens.shape[1] != first.tokens.shape[1]:
            raise ValueError("trajectories to concatenate differ in tokens_per_step or image tokens")
        prm += [{**r, "path": r["path"] + len(paths)} for r in t.prm]
        paths += t.paths
        tokens.append(t.tokens)
    return Trajectories(torch.cat(tokens), paths, prm, first.tokens_per_step)


def prm_labels(generator, detector, tokens, paths, steps, k, paths_per_prompt, cfg, tps, batch_rows=8, progress=True):
    """Math-Shepherd step labels: from step ``s`` of a path roll out ``k`` completions
    (sampling seed offset by the step); "yes" if any ends correct."""
    rows = [i for i, p in enumerate(paths) if p["candidate"] < paths_per_prompt]
    jobs = [(i, s) for s in steps for i in rows]
    out = []
    for start in tqdm(range(0, len(jobs), batch_rows), desc="PRM roll-outs", disable=not progress or not jobs):
        chunk = jobs[start : start + batch_rows]
        by_step: dict[int, list[int]] = {}
        for i, s in chunk:
            by_step.setdefault(s, []).append(i)
        for s, idx in by_step.items():
            roll_cfg = SamplingConfig(**{**cfg.__dict__, "n": k, "seed": cfg.seed + 7919 * s})
            sampler = StepwiseSampler(generator, [paths[i]["prompt"] for i in idx], roll_cfg, tokens[idx, : s * tps])
            sampler.run()
            images = sampler.images()
            metas = [paths[idx[p.prompt_index]]["metadata"] for p in sampler.paths]
            labels = label_images(detector, images, metas)
            for j, i in enumerate(idx):
                n_ok = sum(labels[j * k + r][0] for r in range(k))
                out.append({"path": i, "step": s, "correct": n_ok > 0, "rollouts_correct": n_ok})
    return out


def judge_examples(
    traj: Trajectories,
    clarity_boundary: int,
    questions: Sequence[str] | None = None,
    steps_per_path: int | None = None,
    seed: int = 0,
) -> list[dict]:
    """The judge's labelled examples: dicts ``path``, ``step`` (1-based; ``num_steps`` =
    final), ``question``, ``label`` (bool), ``split``.

    outcome: final step, the path's label; clarity: intermediate steps, ``step >=
    clarity_boundary``; potential: intermediate steps from ``clarity_boundary`` on, the
    path's outcome label; step: the PRM labels. With ``steps_per_path``, clarity and
    potential each use that many steps per path, drawn at random (seeded) on train
    paths; held-out paths keep every step, so per-step metrics stay complete.

    Raises:
        ValueError: a boundary outside 1..num_steps.
    """
    S = traj.num_steps
    if not 1 <= clarity_boundary <= S:
        raise ValueError(f"clarity_boundary must lie in 1..{S}, got {clarity_boundary}")
    wanted = set(questions or ("outcome", "clarity", "potential", "step"))
    rng = np.random.default_rng(seed)

    def pick(steps: list[int], split: str) -> list[int]:
        if steps_per_path is None or split != "train" or len(steps) <= steps_per_path:
            return steps
        return sorted(rng.choice(steps, size=steps_per_path, replace=False).tolist())

    ex = []
    for i, p in enumerate(traj.paths):
        base = {"path": i, "split": p["split"]}
        if "outcome" in wanted:
            ex.append({**base, "step": S, "question": "outcome", "label": p["correct"]})
        if "clarity" in wanted:
            ex += [{**base, "step": s, "question": "clarity", "label": s >= clarity_boundary}
                   for s in pick(list(range(1, S)), p["split"])]
        if "potential" in wanted:
            ex += [{**base, "step": s, "question": "potential", "label": p["correct"]}
                   for s in pick(list(range(clarity_boundary, S)), p["split"])]
    if "step" in wanted:
        ex += [{"path": r["path"], "split": traj.paths[r["path"]]["split"], "step": r["step"], "question": "step",
                "label": r["correct"]} for r in traj.prm]
    return ex


def data_summary(traj: Trajectories) -> dict:
    """Counts and label rates for ``metrics/reward_data.json`` (rates of generated paths;
    rendered paths counted apart)."""
    rendered = [p for p in traj.paths if p.get("source") == "render"]
    paths = [p for p in traj.paths if p.get("source", "generator") == "generator"]
    tags = sorted({p["tag"] for p in paths})
    return {
        "rendered_paths": len(rendered),
        "rendered_yes_rate": float(np.mean([p["correct"] for p in rendered])) if rendered else None,
        "paths": len(paths),
        "prompts": len({p["prompt"] for p in paths}),
        "heldout_paths": sum(p["split"] == "heldout" for p in paths),
        "outcome_yes_rate": float(np.mean([p["correct"] for p in paths])) if paths else 0.0,
        "outcome_yes_rate_by_tag": {t: float(np.mean([p["correct"] for p in paths if p["tag"] == t])) for t in tags},
        "prm_labels": len(traj.prm),
        "prm_yes_rate": float(np.mean([r["correct"] for r in traj.prm])) if traj.prm else None,
    }

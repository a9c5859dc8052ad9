"""One function per DVC stage (DESIGN section 4). ``dvc.yaml`` runs them through
``cotgen stage NAME``; Prefect flows call the same functions.

Every stage reads its knobs from the params dict, writes into ``root`` (the repository
by default) and returns the metrics it wrote. Outputs are written to a temporary path
and moved into place only when complete, so a failed stage leaves earlier outputs as
they were.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np

from cotgen.geneval.layout import write_folder
from cotgen.geneval.metadata import load_metadata, write_metadata
from cotgen.geneval.report import plot_tags, write_summary
from cotgen.geneval.scoring import score_folder, write_results

#: Paths of the pipeline's artefacts, relative to the repository root.
PATHS = {
    "eval_prompts": "data/prompts/eval.jsonl",
    "replay_paths": "data/replay/paths.jsonl",
    "replay_heldout": "data/replay/heldout.jsonl",
    "train_prompts": "data/prompts/train.jsonl",
    "detector": "data/detector",
    "gt_renders": "data/renders/ground_truth",
    "ground_truth_results": "data/results/ground_truth.jsonl",
    "tokenizer": "data/tokenizer",
    "generator": "data/generator",
    "baseline_samples": "data/samples/baseline",
    "baseline_results": "data/results/baseline.jsonl",
    "trajectories": "data/reward/trajectories",
    "judge": "data/judge",
}

#: DPO variants (``params["align"]["variants"]``; cotgen/align): stages ``pairs_<v>``,
#: ``<v>``, ``sample_<v>``, ``score_<v>``.
ALIGN_VARIANTS = ("dpo", "dpo_iter", "parm_dpo", "parm_dpo_iter")
for _v in ALIGN_VARIANTS:
    PATHS.update({f"{_v}_pairs": f"data/align/pairs_{_v}.jsonl", f"{_v}_generator": f"data/align/{_v}",
                  f"{_v}_samples": f"data/samples/{_v}", f"{_v}_results": f"data/results/{_v}.jsonl"})


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(final)


def _tmp_dir(final: Path) -> Path:
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


def _validate(kind: str, path: Path, root: Path, **options) -> None:
    """Check data at a stage boundary with its expectation suite; raises
    :class:`cotgen.pipeline.validation.DataValidationError` (report under
    ``reports/validation``) before the stage writes anything."""
    from cotgen.pipeline.validation import validate

    validate(kind, path, root=root, **options)


def stage_prompts(params: dict, root: Path = Path(".")) -> dict:
    """Build the GenEval-Shapes evaluation set (GenEval's procedure, seed 43) and the
    disjoint training set; writes both JSONL files and ``metrics/prompts.json``."""
    from cotgen.world.prompts import build_shapes_eval_set, build_shapes_train_set

    p = params["prompts"]
    eval_set = build_shapes_eval_set(seed=p["eval_seed"], n=p["n_per_tag"])
    train_set = build_shapes_train_set(eval_set, p["train_size"], first_seed=p["train_first_seed"])
    files = {root / PATHS["eval_prompts"]: eval_set, root / PATHS["train_prompts"]: train_set}
    for final, lines in files.items():
        write_metadata(final.with_name(final.name + ".tmp"), lines)
        _validate("prompts", final.with_name(final.name + ".tmp"), root)
    for final in files:
        final.with_name(final.name + ".tmp").replace(final)
    metrics = {
        "eval": {"prompts": len(eval_set), "tags": dict(Counter(s["tag"] for s in eval_set))},
        "train": {"prompts": len(train_set), "tags": dict(Counter(s["tag"] for s in train_set))},
    }
    write_summary(root / "metrics/prompts.json", metrics)
    return metrics


def stage_detector(params: dict, root: Path = Path(".")) -> dict:
    """Train the shapes detector's classifier; writes ``data/detector`` (safetensors)."""
    from cotgen.world.detector import train_shapes_detector

    d = params["detector"]
    final = root / PATHS["detector"]
    tmp = _tmp_dir(final)
    train_shapes_detector(tmp, steps=d["steps"], seed=d["seed"], batch_size=d["batch_size"])
    _replace_dir(tmp, final)
    return {}


def stage_render_ground_truth(params: dict, root: Path = Path(".")) -> dict:
    """Render ground-truth scenes of the evaluation set as a GenEval folder
    (``images_per_prompt`` each, seeded per prompt)."""
    from cotgen.world.render import render_scene

    n = params["evaluation"]["images_per_prompt"]
    seed = params["seed"]
    _validate("prompts", root / PATHS["eval_prompts"], root)
    eval_set = load_metadata(root / PATHS["eval_prompts"])
    final = root / PATHS["gt_renders"]
    tmp = _tmp_dir(final)

    def make(i: int, line: dict):
        rng = np.random.default_rng([seed, i])
        return [render_scene(line, rng)[0] for _ in range(n)]

    write_folder(tmp, eval_set, make)
    _replace_dir(tmp, final)
    return {"prompts": len(eval_set), "images": n * len(eval_set)}


def score_eval_folder(root: Path, folder_key: str, name: str, title: str) -> dict:
    """Score a GenEval folder of the evaluation set with the shapes detector; writes
    ``PATHS["<name>_results"]``, ``metrics/geneval_<name>.json`` and
    ``plots/geneval_<name>.png``. Every evaluation prompt must be present."""
    from cotgen.world.detector import ShapesDetector

    _validate("samples", root / PATHS[folder_key], root)
    detector = ShapesDetector.from_pretrained(root / PATHS["detector"])
    results, summary = score_folder(root / PATHS[folder_key], detector, metadata_file=root / PATHS["eval_prompts"])
    write_results(root / PATHS[f"{name}_results"], results)
    write_summary(root / f"metrics/geneval_{name}.json", summary)
    plot_tags(root / f"plots/geneval_{name}.png", summary, title=title)
    return summary


def stage_score_ground_truth(params: dict, root: Path = Path(".")) -> dict:
    """GenEval of the ground-truth renders (the evaluator's ceiling)."""
    return score_eval_folder(root, "gt_renders", "ground_truth", "GenEval-Shapes, ground-truth renders")


def stage_validate_evaluator(params: dict, root: Path = Path(".")) -> dict:
    """Check the evaluator on ground truth, degraded renders and near misses; writes
    ``metrics/evaluator_validation.json``."""
    from cotgen.world.detector import ShapesDetector
    from cotgen.world.validate import validate_evaluator

    _validate("prompts", root / PATHS["eval_prompts"], root)
    detector = ShapesDetector.from_pretrained(root / PATHS["detector"])
    eval_set = load_metadata(root / PATHS["eval_prompts"])
    metrics = validate_evaluator(
        detector, eval_set, images_per_prompt=params["evaluation"]["images_per_prompt"], seed=params["seed"]
    )
    write_summary(root / "metrics/evaluator_validation.json", metrics)
    return metrics


def stage_tokenizer(params: dict, root: Path = Path(".")) -> dict:
    """Train the VQ image tokenizer on renders of training prompts; writes ``data/tokenizer``."""
    from cotgen.tokenizer.vq import train_vq_tokenizer

    t = params["tokenizer"]
    final = root / PATHS["tokenizer"]
    tmp = _tmp_dir(final)
    _, metrics = train_vq_tokenizer(
        tmp, steps=t["steps"], batch_size=t["batch_size"], seed=t["seed"], lr=t["lr"], edge_weight=t["edge_weight"],
        codebook_size=t["model"]["codebook_size"], config=dict(t["model"]), num_threads=t.get("num_threads", 1),
    )
    _replace_dir(tmp, final)
    return {k: v for k, v in metrics.items() if k != "loss_history"}


def stage_tokenizer_check(params: dict, root: Path = Path(".")) -> dict:
    """GenEval of encode -> decode reconstructions of ground-truth evaluation renders and
    codebook usage; writes ``metrics/tokenizer.json`` and ``plots/tokenizer_reconstructions.png``."""
    from cotgen.tokenizer.vq import VQTokenizer, reconstruction_check
    from cotgen.world.detector import ShapesDetector

    _validate("prompts", root / PATHS["eval_prompts"], root)
    tokenizer = VQTokenizer.from_pretrained(root / PATHS["tokenizer"])
    detector = ShapesDetector.from_pretrained(root / PATHS["detector"])
    (root / "plots").mkdir(parents=True, exist_ok=True)
    check = reconstruction_check(
        tokenizer, detector, load_metadata(root / PATHS["eval_prompts"]),
        images_per_prompt=params["evaluation"]["images_per_prompt"], seed=params["seed"],
        grid_path=root / "plots/tokenizer_reconstructions.png",
    )
    metrics = {k: v for k, v in check.items() if k != "results"}
    write_summary(root / "metrics/tokenizer.json", metrics)
    return metrics


def _load_generator_parts(root: Path):
    from cotgen.tokenizer.text import build_text_tokenizer
    from cotgen.tokenizer.vq import VQTokenizer

    image_tokenizer = VQTokenizer.from_pretrained(root / PATHS["tokenizer"])
    image_tokenizer.eval()
    return build_text_tokenizer(), image_tokenizer


def stage_generator(params: dict, root: Path = Path(".")) -> dict:
    """Train the AR generator on rendered scenes of the *training* prompts; writes
    ``data/generator`` and ``metrics/generator_train.json``."""
    from cotgen.generator.train import train_generator

    g = params["generator"]
    _validate("prompts", root / PATHS["train_prompts"], root)
    text, image_tokenizer = _load_generator_parts(root)
    final = root / PATHS["generator"]
    tmp = _tmp_dir(final)
    _, metrics = train_generator(
        tmp, load_metadata(root / PATHS["train_prompts"]), text, image_tokenizer,
        num_images=g["num_images"], steps=g["steps"], batch_size=g["batch_size"],
        learning_rate=g["learning_rate"], cond_dropout=g["cond_dropout"], tag_weights=g.get("tag_weights"),
        model_size=g["model"], prompt_len=g["prompt_len"], seed=g["seed"], scene_style=g["scene_style"],
    )
    shutil.rmtree(tmp / "trainer", ignore_errors=True)
    _replace_dir(tmp, final)
    write_summary(root / "metrics/generator_train.json", metrics)
    return metrics


def sampling_config(params: dict, n: int = 1):
    """The :class:`SamplingConfig` of ``params["sampling"]`` with ``n`` paths."""
    from cotgen.generator.sampling import SamplingConfig

    s = params["sampling"]
    return SamplingConfig(n=n, cfg_scale=s["cfg_scale"], temperature=s["temperature"], top_k=s["top_k"], seed=s["seed"],
                          tokens_per_step=s.get("tokens_per_step"))


def stage_sample_baseline(
    params: dict, root: Path = Path("."), generator_key: str = "generator", name: str = "baseline"
) -> dict:
    """Plain sampling of the evaluation set, ``images_per_prompt`` per prompt, as a GenEval folder
    (``PATHS[f"{name}_samples"]``) from the generator at ``PATHS[generator_key]``: the baseline and
    the aligned generators (``sample_<variant>``)."""
    from cotgen.generator.model import ShapesGenerator
    from cotgen.generator.sampling import sample_images

    _validate("prompts", root / PATHS["eval_prompts"], root)
    generator = ShapesGenerator.from_pretrained(root / PATHS[generator_key])
    eval_set = load_metadata(root / PATHS["eval_prompts"])
    n = params["evaluation"]["images_per_prompt"]
    images = sample_images(generator, [m["prompt"] for m in eval_set], sampling_config(params, n))
    final = root / PATHS[f"{name}_samples"]
    tmp = _tmp_dir(final)
    write_folder(tmp, eval_set, lambda i, m: images[i])
    _replace_dir(tmp, final)
    samples_grid(eval_set, images).save(_mkparent(root / f"plots/{name}_samples.png"))
    return {"prompts": len(eval_set), "images": n * len(eval_set)}


def samples_grid(eval_set: Sequence[dict], images: Sequence[Sequence], per_tag: int = 2):
    """A grid people look at: the first ``per_tag`` evaluation prompts of every tag
    (rows, labelled with the tag) x their images (columns)."""
    from cotgen.generator.grid import image_grid

    rows, labels, seen = [], [], {}
    for meta, imgs in zip(eval_set, images):
        tag = meta["tag"]
        if seen.get(tag, 0) < per_tag:
            seen[tag] = seen.get(tag, 0) + 1
            rows.append(list(imgs))
            labels.append(tag)
    return image_grid(rows, row_labels=labels)


def _mkparent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def stage_score_baseline(params: dict, root: Path = Path(".")) -> dict:
    """GenEval of the baseline folder (plain sampling)."""
    return score_eval_folder(root, "baseline_samples", "baseline", "GenEval-Shapes, baseline (plain sampling)")


def stage_trajectories(params: dict, root: Path = Path(".")) -> dict:
    """Sample and label trajectories of training prompts for the reward models, plus
    (``render_prompts`` > 0) rendered scenes and near misses of other training prompts
    (:func:`cotgen.reward.data.render_trajectories`, training split only); writes
    ``data/reward/trajectories`` and ``metrics/reward_data.json``."""
    from cotgen.generator.model import ShapesGenerator
    from cotgen.reward.data import data_summary, sample_trajectories
    from cotgen.world.detector import ShapesDetector

    t = params["reward"]["trajectories"]
    _validate("prompts", root / PATHS["train_prompts"], root)
    generator = ShapesGenerator.from_pretrained(root / PATHS["generator"])
    detector = ShapesDetector.from_pretrained(root / PATHS["detector"])
    train = load_metadata(root / PATHS["train_prompts"])
    prompts = balanced_prompts(train, t["num_prompts"], t["seed"])
    cfg = sampling_config(params)
    cfg.temperature, cfg.seed = t["temperature"], t["seed"]
    traj = sample_trajectories(
        generator, detector, prompts, t["paths_per_prompt"], cfg, heldout_fraction=t["heldout_fraction"],
        prm_steps=t["prm_steps"], prm_rollouts=t["prm_rollouts"], prm_paths_per_prompt=t["prm_paths_per_prompt"],
        batch_prompts=t["batch_prompts"], seed=t["seed"], heldout_paths_per_prompt=t.get("heldout_paths_per_prompt"),
        tag_paths_per_prompt=t.get("tag_paths_per_prompt"),
    )
    if t.get("render_prompts", 0) > 0:  # renderer scenes and near misses of other training prompts
        from cotgen.reward.data import concat_trajectories, render_trajectories
        from cotgen.world.render import STYLES

        held = {p["prompt"] for p in traj.paths if p["split"] == "heldout"}
        others = balanced_prompts([m for m in train if m["prompt"] not in held], t["render_prompts"], t["seed"] + 1)
        rendered = render_trajectories(generator.image_tokenizer, detector, others, t["render_near_misses"],
                                       traj.tokens_per_step, STYLES[params["generator"]["scene_style"]],
                                       seed=t["seed"] + 1)
        traj = concat_trajectories(traj, rendered)
    final = root / PATHS["trajectories"]
    tmp = _tmp_dir(final)
    traj.save(tmp)
    _validate("labels", tmp, root)
    _replace_dir(tmp, final)
    summary = data_summary(traj)
    write_summary(root / "metrics/reward_data.json", summary)
    return summary


def balanced_prompts(lines: Sequence[dict], num: int, seed: int, at_most: bool = False) -> list[dict]:
    """``num`` metadata lines drawn without replacement, spread evenly over the tags
    present (a tag with too few lines gives all it has), in their original order. The
    training set is mostly color_attr; an unbalanced draw gave the judge almost no
    correct images to learn from (1.5% yes, no single_object or two_object prompts).

    Fewer than one line per tag still gives one per tag, unless ``at_most``: then a seeded
    draw keeps ``num`` of them (each from another tag)."""
    rng = np.random.default_rng(seed)
    by_tag: dict[str, list[int]] = {}
    for i, m in enumerate(lines):
        by_tag.setdefault(m["tag"], []).append(i)
    per_tag = max(1, num // max(1, len(by_tag)))
    picked = []
    for tag in sorted(by_tag):
        idx = by_tag[tag]
        picked += rng.choice(idx, size=min(per_tag, len(idx)), replace=False).tolist()
    if at_most and len(picked) > num:
        picked = rng.choice(picked, size=num, replace=False).tolist()
    return [lines[i] for i in sorted(picked)]


def stage_judge(params: dict, root: Path = Path(".")) -> dict:
    """Train the judge (ORM outcome, PRM step, PARM clarity + potential) on the train
    prompts of the trajectories; writes ``data/judge`` and ``metrics/judge.json``
    (held-out AUROC and accuracy per question)."""
    _validate("labels", root / PATHS["trajectories"], root)  # before the training libraries load: bad data fails fast
    from cotgen.reward.data import Trajectories, judge_examples
    from cotgen.reward.train import train_judge

    j = params["reward"]["judge"]
    text, image_tokenizer = _load_generator_parts(root)
    traj = Trajectories.load(root / PATHS["trajectories"])
    examples = judge_examples(traj, params["reward"]["clarity_boundary"], steps_per_path=j["steps_per_path"],
                              seed=j["seed"])
    final = root / PATHS["judge"]
    tmp = _tmp_dir(final)
    labeller = None
    counterfactuals = {"per_image": 0, "heldout_per_image": 0, "objects": (1, 2), **(j.get("color_counterfactuals") or {})}
    measure_cf = counterfactuals["per_image"] or counterfactuals["heldout_per_image"]
    if j.get("perception_targets", False) or measure_cf:
        from cotgen.world.detector import ShapesDetector

        detector = ShapesDetector.from_pretrained(root / PATHS["detector"])
        # the evaluator's per-object perception, a target on training images only
        labeller = detector if j.get("perception_targets", False) else None
    cf_summary = None
    if measure_cf:  # colour counterfactuals: training examples and / or a held-out measurement
        from cotgen.reward.counterfactual import judge_counterfactuals

        cf, cf_summary = judge_counterfactuals(traj, examples, image_tokenizer, detector,
                                               load_metadata(root / PATHS["eval_prompts"]), counterfactuals["per_image"],
                                               j["seed"], objects=counterfactuals["objects"],
                                               heldout_per_image=counterfactuals["heldout_per_image"])
        examples = examples + cf
    _, metrics = train_judge(
        tmp, traj, examples, image_tokenizer, text, model_size=j["model"], steps=j["steps"],
        batch_size=j["batch_size"], learning_rate=j["learning_rate"], warmup_steps=j["warmup_steps"], seed=j["seed"],
        perception_labeller=labeller, word_grounding=j.get("word_grounding", False),
    )
    shutil.rmtree(tmp / "trainer", ignore_errors=True)
    _replace_dir(tmp, final)
    if cf_summary is not None:
        metrics["counterfactual_data"] = cf_summary
    write_summary(root / "metrics/judge.json", metrics)
    return metrics


def search_eval_set(generator, judge, eval_set: Sequence[dict], sampling, config, images_per_prompt: int,
                    batch_prompts: int, folder: Path, trace_file: Path, desc: str = "search",
                    search_kwargs=None) -> list[dict]:
    """Run one search (:func:`cotgen.search.search`) over an evaluation set and write what
    GenEval scores: final image ``j`` of every prompt comes from its own ``sampling.n``
    paths with seed ``sampling.seed + 1000 j``; prompts go ``batch_prompts`` at a time.

    Writes the GenEval folder ``folder`` (``<index>/metadata.jsonl``, ``samples/NNNN.png``
    at the generator's image size; replaced only when complete) and ``trace_file`` (JSON
    lines: ``index``, ``image`` and :meth:`SearchResult.trace`, with per-path cuts, image
    tokens and forward passes). ``search_kwargs(k)``, when given, returns extra keyword
    arguments of :func:`cotgen.search.search` for a batch of ``k`` prompts (PARM++'s
    corrector and its condition). Returns the trace lines.

    Raises:
        ValueError: a bad knob or prompt (from :func:`cotgen.search.search`).
    """
    import json
    from dataclasses import replace

    from tqdm import tqdm

    from cotgen.search import search

    images: list[list] = [[] for _ in eval_set]
    traces = []
    for rep in tqdm(range(images_per_prompt), desc=f"{desc} (N={sampling.n})"):
        rep_sampling = replace(sampling, seed=sampling.seed + 1000 * rep)
        for start in range(0, len(eval_set), batch_prompts):
            chunk = eval_set[start : start + batch_prompts]
            extra = search_kwargs(len(chunk)) if search_kwargs else {}
            for i, r in enumerate(search(generator, judge, [m["prompt"] for m in chunk], rep_sampling, config, **extra)):
                images[start + i].append(r.image)
                traces.append({"index": start + i, "image": rep, **r.trace()})
    tmp = _tmp_dir(folder)
    write_folder(tmp, eval_set, lambda i, m: images[i])
    _replace_dir(tmp, folder)
    _mkparent(trace_file).write_text("".join(json.dumps(t) + "\n" for t in traces))
    return traces


def search_metrics(strategy: str, n: int, traces: Sequence[dict]) -> dict:
    """A search's keys of a GenEval metrics file, from its trace lines: ``n``,
    ``strategy``, ``image_tokens_per_image`` (mean image tokens generated per final image,
    cut paths included), ``judge_calls_per_image``, ``seconds_per_image`` (wall time)."""
    return {"n": n, "strategy": strategy,
            "image_tokens_per_image": float(np.mean([t["compute"]["image_tokens"] for t in traces])),
            "judge_calls_per_image": float(np.mean([t["compute"]["judge_calls"] for t in traces])),
            "seconds_per_image": float(np.mean([t["compute"]["seconds"] for t in traces]))}


def run_search_eval(
    params: dict, root: Path, strategy: str, n: int, name: str | None = None, images_per_prompt: int | None = None
) -> dict:
    """Run one strategy with N candidates on the evaluation set (``images_per_prompt``
    final images per prompt, each from its own N paths) and score it; writes
    ``data/samples/<name>``, ``data/results/<name>.jsonl``, ``data/traces/<name>.jsonl``,
    ``metrics/geneval_<name>.json`` (with ``image_tokens_per_image``) and its plot."""
    from cotgen.generator.model import ShapesGenerator
    from cotgen.reward.object_judge import ObjectJudge
    from cotgen.search import SearchConfig
    from cotgen.world.detector import ShapesDetector

    name = name or strategy
    _validate("prompts", root / PATHS["eval_prompts"], root)
    generator = ShapesGenerator.from_pretrained(root / PATHS["generator"])
    judge = None if strategy == "sample" else ObjectJudge.from_pretrained(root / PATHS["judge"])
    eval_set = load_metadata(root / PATHS["eval_prompts"])
    k = images_per_prompt or params["evaluation"]["images_per_prompt"]
    se = params["search"]
    config = SearchConfig(strategy, se["clarity_threshold"], se["potential_threshold"])
    final = root / "data/samples" / name
    traces = search_eval_set(generator, judge, eval_set, sampling_config(params, n), config, k, se["batch_prompts"],
                             final, root / "data/traces" / f"{name}.jsonl", desc=name)
    detector = ShapesDetector.from_pretrained(root / PATHS["detector"])
    results, summary = score_folder(final, detector, metadata_file=root / PATHS["eval_prompts"])
    summary.update(search_metrics(strategy, n, traces))
    write_results(_mkparent(root / "data/results" / f"{name}.jsonl"), results)
    write_summary(root / f"metrics/geneval_{name}.json", summary)
    plot_tags(root / f"plots/geneval_{name}.png", summary, title=f"GenEval-Shapes, {strategy} (N={n})")
    return summary


def search_eval_name(strategy: str, n: int, images_per_prompt: int | None = None, reference_n: int = 20) -> str:
    """File stem of a search evaluation: ``<strategy>`` at the reference N with the
    default images per prompt, else ``<strategy>_n<N>[_k<images per prompt>]``."""
    if n == reference_n and images_per_prompt is None:
        return strategy
    return f"{strategy}_n{n}" + (f"_k{images_per_prompt}" if images_per_prompt else "")


def plot_search_curves(root: Path = Path("."), out_dir: Path = Path("plots")) -> list[Path]:
    """From every ``metrics/geneval_<strategy>[_n<N>...].json`` draw GenEval-Shapes
    against N per strategy and GenEval-Shapes against image tokens per image; returns
    the PNG paths."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points: dict[str, list[tuple[int, float, float]]] = {}
    for f in sorted((root / "metrics").glob("geneval_*.json")):
        m = json.loads(f.read_text())
        if ("strategy" not in m and f.stem != "geneval_baseline") or m.get("world", "shapes") != "shapes":
            continue  # not a shapes search (real GenEval's metrics say world: coco)
        strategy = m.get("strategy", "sample")
        tokens = m.get("image_tokens_per_image", 256.0)
        points.setdefault(strategy, []).append((int(m.get("n", 1)), float(m["overall"]), float(tokens)))
    out_dir = root / out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (x_idx, xlabel) in {"geneval_vs_n": (0, "N (candidate paths)"),
                                  "geneval_vs_tokens": (2, "image tokens per final image")}.items():
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for strategy, pts in sorted(points.items()):
            pts = sorted(set(pts), key=lambda t: t[x_idx])
            ax.plot([t[x_idx] for t in pts], [t[1] for t in pts], marker="o", label=strategy)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("GenEval-Shapes overall")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def _replay_names(variant: str | None) -> tuple[str, str, str]:
    """(generator key, records file, metrics name) of the main generator or an align variant."""
    if variant is None:
        return "generator", PATHS["replay_paths"], "search_replay"
    return f"{variant}_generator", f"data/replay/{variant}.jsonl", f"search_replay_{variant}"


def stage_record_paths(params: dict, root: Path = Path("."), variant: str | None = None,
                       prompt_set: str = "eval") -> dict:
    """All ``replay.n`` paths of every evaluation prompt to the end, with the
    judge's clarity / potential / step scores after every step, the outcome score and
    GenEval's verdict per final image (:func:`cotgen.search.replay.record_paths`); writes
    ``data/replay/paths.jsonl`` (one JSON line per prompt and final image), or
    ``data/replay/<variant>.jsonl`` for an aligned generator (``variant`` of
    :data:`ALIGN_VARIANTS`). ``prompt_set="heldout"``: the judge's held-out training
    prompts instead (:func:`heldout_prompt_lines`), ``replay.heldout_images_per_prompt``
    final images each, into ``data/replay/heldout.jsonl``: the set on which
    :func:`stage_calibrate` chooses PARM's knobs.

    Raises:
        ValueError: unknown ``prompt_set``, or ``heldout`` with a ``variant``.
    """
    import json

    from cotgen.generator.model import ShapesGenerator
    from cotgen.reward.object_judge import ObjectJudge
    from cotgen.search.replay import record_paths
    from cotgen.world.detector import ShapesDetector

    if prompt_set not in ("eval", "heldout"):
        raise ValueError(f"prompt_set must be 'eval' or 'heldout', got {prompt_set!r}")
    if prompt_set == "heldout" and variant is not None:
        raise ValueError("held-out recordings are made with the main generator only")
    rp = params["replay"]
    key, records_file, _ = _replay_names(variant)
    if prompt_set == "eval":
        _validate("prompts", root / PATHS["eval_prompts"], root)
        prompt_lines, images = load_metadata(root / PATHS["eval_prompts"]), rp["images_per_prompt"]
    else:
        prompt_lines, images = heldout_prompt_lines(root), rp["heldout_images_per_prompt"]
        records_file = PATHS["replay_heldout"]
    generator = ShapesGenerator.from_pretrained(root / PATHS[key])
    judge = ObjectJudge.from_pretrained(root / PATHS["judge"])
    detector = ShapesDetector.from_pretrained(root / PATHS["detector"])
    out = _mkparent(root / records_file)
    tmp = out.with_suffix(".tmp")
    n = 0
    with tmp.open("w") as fh:
        for record in record_paths(generator, judge, detector, prompt_lines, sampling_config(params, rp["n"]),
                                   params["search"]["batch_prompts"], images):
            fh.write(json.dumps(record) + "\n")
            n += 1
    tmp.replace(out)
    return {"records": n, "n": rp["n"], "images_per_prompt": images, "prompts": len(prompt_lines),
            "prompt_set": prompt_set}


def heldout_prompt_lines(root: Path = Path(".")) -> list[dict]:
    """The GenEval metadata lines of the judge's held-out training prompts (split
    "heldout" of ``data/reward/trajectories``), in their order there: prompts no judge
    trains on and the evaluation set does not contain.

    Raises:
        FileNotFoundError: no trajectories (run the ``trajectories`` stage).
        ValueError: the trajectories hold no held-out prompt.
    """
    from cotgen.reward.data import Trajectories

    traj = Trajectories.load(root / PATHS["trajectories"])
    lines: dict[str, dict] = {}
    for p in traj.paths:
        if p["split"] == "heldout":
            lines.setdefault(p["prompt"], p["metadata"])
    if not lines:
        raise ValueError(f"{root / PATHS['trajectories']} holds no held-out prompt")
    return list(lines.values())


def parm_settings(params: dict) -> list[dict]:
    """Every PARM setting the replay sweeps at N = ``replay.n``: ``parm`` for each
    potential threshold of ``replay.potential_thresholds`` at the search's clarity
    threshold and at each of ``replay.clarity_thresholds``, and ``parm_top_k`` for each
    k of ``replay.top_k`` (at the search's clarity threshold)."""
    se, rp = params["search"], params["replay"]
    clarities = [se["clarity_threshold"], *[c for c in rp.get("clarity_thresholds", []) if c != se["clarity_threshold"]]]
    out = [{"strategy": "parm", "clarity_threshold": c, "potential_threshold": t}
           for c in clarities for t in rp["potential_thresholds"]]
    out += [{"strategy": "parm_top_k", "clarity_threshold": se["clarity_threshold"], "k": k} for k in rp["top_k"]]
    return out


def stage_calibrate(params: dict, root: Path = Path(".")) -> dict:
    """PARM's knobs chosen on the held-out training prompts' recording
    (``data/replay/heldout.jsonl``, :func:`cotgen.search.replay.calibrate_parm` over
    :func:`parm_settings`), then applied, unchanged, to the evaluation recording
    (``data/replay/paths.jsonl``). Writes ``metrics/search_calibration.json`` (both sets'
    rows per setting, the choice among all settings and among the paper's threshold rule
    alone (``paper_rule``), and the Spearman rank correlation between the two sets'
    overall scores across settings: does held-out predict the evaluation set?) and
    ``metrics/geneval_parm_calibrated_replay.json`` (the chosen setting on the evaluation
    set, with best-of-N's score and tokens there for comparison)."""
    from scipy.stats import spearmanr

    from cotgen.search.replay import calibrate_parm, read_records, replay_setting, replay_summary

    N = params["replay"]["n"]
    heldout = read_records(root / PATHS["replay_heldout"])
    evaluation = read_records(root / PATHS["replay_paths"])
    settings = parm_settings(params)
    cal = calibrate_parm(heldout, N, settings)
    eval_rows = [replay_setting(evaluation, setting, N) for setting in settings]
    eval_bon = replay_summary(evaluation, "best_of_n", N)
    chosen = eval_rows[settings.index(cal["chosen"])]
    keep = ("overall", "tags", "image_tokens_per_image")
    paper = calibrate_parm(heldout, N, [s for s in settings if s["strategy"] == "parm"])  # thresholds only
    paper_eval = eval_rows[settings.index(paper["chosen"])]
    held_scores, eval_scores = [r["overall"] for r in cal["rows"]], [r["overall"] for r in eval_rows]
    constant = len(set(held_scores)) < 2 or len(set(eval_scores)) < 2  # no ranking to correlate
    rho = float("nan") if constant else spearmanr(held_scores, eval_scores).statistic
    summary = {
        "n": N, "rule": "fewest image tokens with held-out overall >= held-out best-of-N; else the highest overall",
        "chosen": cal["chosen"], "reaches_best_of_n_on_heldout": cal["reaches_best_of_n"],
        "heldout": {"records": len(heldout), "prompts": len({r["prompt"] for r in heldout}),
                    "best_of_n": {k: cal["best_of_n"][k] for k in keep}},
        "eval": {"records": len(evaluation), "best_of_n": {k: eval_bon[k] for k in keep},
                 "chosen": {k: chosen[k] for k in keep},
                 "tokens_vs_best_of_n": chosen["image_tokens_per_image"] / eval_bon["image_tokens_per_image"]},
        "paper_rule": {"chosen": paper["chosen"], "reaches_best_of_n_on_heldout": paper["reaches_best_of_n"],
                       "eval": {k: paper_eval[k] for k in keep},
                       "tokens_vs_best_of_n": paper_eval["image_tokens_per_image"] / eval_bon["image_tokens_per_image"]},
        "spearman_heldout_vs_eval": None if np.isnan(rho) else float(rho),
        "settings": [{**s, "heldout_overall": h["overall"], "heldout_tokens": h["image_tokens_per_image"],
                      "eval_overall": e["overall"], "eval_tokens": e["image_tokens_per_image"]}
                     for s, h, e in zip(settings, cal["rows"], eval_rows)],
    }
    write_summary(root / "metrics/search_calibration.json", summary)
    row = {**chosen, "images_per_prompt": 1 + max(r["image"] for r in evaluation), "calibrated_on": "heldout",
           "best_of_n_overall": eval_bon["overall"], "best_of_n_image_tokens_per_image": eval_bon["image_tokens_per_image"]}
    write_summary(root / "metrics/geneval_parm_calibrated_replay.json", row)
    return {k: summary[k] for k in ("chosen", "reaches_best_of_n_on_heldout", "heldout", "eval", "paper_rule",
                                    "spearman_heldout_vs_eval")}


#: strategies whose replay at N = ``replay.n`` gets its own ``metrics/geneval_<strategy>_replay.json``
REPLAY_STRATEGIES = ("sample", "best_of_n", "prm", "parm")


def stage_replay(params: dict, root: Path = Path("."), variant: str | None = None) -> dict:
    """GenEval-Shapes of every strategy replayed from ``data/replay/paths.jsonl``
    (:func:`cotgen.search.replay.replay_summary`): ``sample``; ``best_of_n`` and ``prm``
    at each N of ``replay.ns``; ``parm`` at each N (the params' thresholds) and at
    N = ``replay.n`` for each potential threshold of the sweep (and each clarity threshold
    of ``replay.clarity_thresholds``); ``parm_top_k`` for each k. Checks the replay against
    the main job's PARM traces when they exist. Writes ``metrics/search_replay.json`` and
    ``plots/search_replay.png`` (GenEval against N and against image tokens per image);
    ``..._<variant>`` for an aligned generator. For the main generator, also each strategy
    of :data:`REPLAY_STRATEGIES` at N = ``replay.n`` (``sample``: one path) with the
    recording's images per prompt in ``metrics/geneval_<strategy>_replay.json`` (issue 4's
    per-strategy files)."""
    from cotgen.search.replay import check_against_traces, judge_on_records, read_records, replay_setting, replay_summary

    se, rp = params["search"], params["replay"]
    _, records_file, name = _replay_names(variant)
    records = read_records(root / records_file)
    N = rp["n"]
    thr = {"clarity_threshold": se["clarity_threshold"]}
    rows = [replay_summary(records, "sample", 1)]
    for n in rp["ns"]:
        rows.append(replay_summary(records, "best_of_n", n))
        rows.append(replay_summary(records, "prm", n))
        rows.append(replay_summary(records, "parm", n, potential_threshold=se["potential_threshold"], **thr))
        rows.append(replay_summary(records, "oracle", n))
    rows += [replay_setting(records, setting, N) for setting in parm_settings(params)]  # the sweeps at N
    keep = ("strategy", "n", "clarity_threshold", "potential_threshold", "k", "overall", "tags", "image_tokens_per_image")
    summary = {"records": len(records), "n": N, "rows": [{k: r[k] for k in keep if k in r} for r in rows]}
    traces = root / "data/traces/parm.jsonl"
    if variant is None and traces.is_file():
        lines = [t for t in read_records(traces) if t["n"] <= N]
        if lines:
            summary["check_parm_traces"] = check_against_traces(
                records, lines, "parm", potential_threshold=se["potential_threshold"], **thr)
    summary["generator"] = variant or "generator"
    summary["images_per_prompt"] = 1 + max((r["image"] for r in records), default=0)
    summary["judge_on_eval_paths"] = judge_on_records(records)
    write_summary(root / f"metrics/{name}.json", summary)
    if variant is None:  # issue 4's per-strategy files: each strategy at N = replay.n (sample: path 0)
        for strategy in REPLAY_STRATEGIES:
            knobs = dict(potential_threshold=se["potential_threshold"], **thr) if strategy == "parm" else {}
            row = replay_summary(records, strategy, 1 if strategy == "sample" else N, **knobs)
            row["images_per_prompt"] = summary["images_per_prompt"]
            write_summary(root / f"metrics/geneval_{strategy}_replay.json", row)
    _plot_replay(root / f"plots/{name}.png", summary)
    return {k: v for k, v in summary.items() if k != "rows"}


def _plot_replay(path: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"best_of_n": "o-", "prm": "s-", "parm": "^-"}
    n_max = summary["n"]
    t0 = next(r["potential_threshold"] for r in rows if r["strategy"] == "parm")  # the params' thresholds
    c0 = next(r["clarity_threshold"] for r in rows if r["strategy"] == "parm")
    for strategy, style in styles.items():
        pts = sorted({(r["n"], r["overall"], r["image_tokens_per_image"]) for r in rows if r["strategy"] == strategy
                      and r.get("potential_threshold", t0) == t0 and r.get("clarity_threshold", c0) == c0})
        a.plot([p[0] for p in pts], [p[1] for p in pts], style, label=strategy)
        b.plot([p[2] for p in pts], [p[1] for p in pts], style, label=f"{strategy} (N sweep)")
    oracle = sorted((r["n"], r["overall"]) for r in rows if r["strategy"] == "oracle")
    if oracle:  # the evaluator picks: the ceiling of every verifier over the same paths
        a.plot([p[0] for p in oracle], [p[1] for p in oracle], "x--", color="black", label="oracle (GenEval picks)")
    sample = next(r for r in rows if r["strategy"] == "sample")
    a.axhline(sample["overall"], color="grey", ls=":", label="sample")
    clarities = sorted({r["clarity_threshold"] for r in rows if r["strategy"] == "parm"})
    for j, c in enumerate(clarities):  # potential-threshold sweeps at N = n_max, one line per clarity threshold
        sweep = sorted({(r["image_tokens_per_image"], r["overall"], r["potential_threshold"]) for r in rows
                        if r["strategy"] == "parm" and r["n"] == n_max and r["clarity_threshold"] == c})
        b.plot([p[0] for p in sweep], [p[1] for p in sweep], "v--", color=f"C{3 + 2 * j}",
               label=f"parm N={n_max}, clarity {c:g}, potential threshold sweep")
        for x, y, t in sweep:
            b.annotate(f"{t:g}", (x, y), fontsize=6, xytext=(2, -8), textcoords="offset points")
    topk = sorted((r["image_tokens_per_image"], r["overall"], r["k"]) for r in rows if r["strategy"] == "parm_top_k")
    if topk:
        b.plot([p[0] for p in topk], [p[1] for p in topk], "D--", color="C4", label=f"parm top-k, N={n_max}")
        for x, y, k in topk:
            b.annotate(f"k={k}", (x, y), fontsize=7, xytext=(2, 4), textcoords="offset points")
    a.set_xscale("log", base=2)
    a.set_xlabel("N (candidate paths per image)")
    b.set_xlabel("image tokens generated per final image")
    for ax in (a, b):
        ax.set_ylabel("GenEval-Shapes overall")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Search strategies replayed ({summary.get('generator', 'generator')}): "
                 f"{summary['records']} final images ({summary.get('images_per_prompt', 1)} per prompt) "
                 f"x {n_max} paths")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def stage_search_parm(params: dict, root: Path = Path(".")) -> dict:
    """The promoted configuration: PARM search at ``search.n`` on the evaluation set,
    ``search.images_per_prompt`` final images per prompt (default: GenEval's 4)."""
    k = params["search"].get("images_per_prompt")
    return run_search_eval(params, root, "parm", params["search"]["n"], "parm", k)


def stage_gate(params: dict, root: Path = Path(".")) -> dict:
    """The GenEval gate on ``metrics/geneval_parm.json`` (the verified generator) against
    ``params["gate"]`` and the promoted model; writes ``metrics/gate.json`` with every
    check. Records a failed verdict without raising (``package`` refuses it), so DVC
    caches the verdict; see :mod:`cotgen.pipeline.package`."""
    from cotgen.pipeline.package import run_gate

    return run_gate(params, root)


def stage_package(params: dict, root: Path = Path(".")) -> dict:
    """If the gate passed: save the verified generator as a candidate, promote it and
    build the Bento (when ``bentofile.yaml`` exists); writes ``data/registry.json`` and
    ``metrics/package.json``. Raises :class:`cotgen.pipeline.gate.GateFailedError`
    naming the failed thresholds otherwise."""
    from cotgen.pipeline.package import run_package

    return run_package(params, root)


# --------------------------------------------------------------- preference alignment (DPO)


def _align_init_key(variant: str, params: dict) -> str:
    """PATHS key of the generator a variant starts from: ``generator`` or an earlier
    variant's aligned generator (iterative DPO's round 2 starts from round 1)."""
    init = params["align"]["variants"][variant]["init"]
    return "generator" if init == "generator" else f"{init}_generator"


def pairs_params(params: dict, variant: str) -> dict:
    """The ``align.pairs`` knobs of one DPO variant: ``params["align"]["pairs"]`` with the
    variant's own value of any of them (e.g. ``judge_threshold``, ``samples_per_prompt``)
    in their place, except ``seed``: a variant's ``seed`` is an offset added to it.

    Raises:
        KeyError: ``variant`` is not in ``align.variants`` (the message lists them)."""
    variants = params["align"]["variants"]
    if variant not in variants:
        raise KeyError(f"no DPO variant {variant!r} in align.variants (have: {', '.join(variants)})")
    base, own = params["align"]["pairs"], variants[variant]
    return {**base, **{k: val for k, val in own.items() if k in base and k != "seed"}}


def stage_pairs(params: dict, root: Path = Path("."), variant: str = "dpo") -> dict:
    """Preference pairs of one DPO variant (``params["align"]["variants"][variant]``):
    sample ``samples_per_prompt`` images of ``num_prompts`` training prompts from the
    variant's starting generator, label them with the evaluator or (``labels: judge``,
    PARM-guided) the judge's outcome score, one (chosen, rejected) pair per prompt that
    got both labels (:func:`cotgen.align.pairs.build_pairs`; judge thresholds
    ``judge_threshold`` / ``judge_reject_threshold``; knobs from :func:`pairs_params`, so a
    variant may set its own; with judge labels a
    :func:`~cotgen.align.pairs.threshold_sweep` in the metrics);
    ``heldout_fraction`` of the prompts give held-out pairs (DPO's eval set). Writes ``PATHS["<variant>_pairs"]``
    (JSONL, checked by the ``pairs`` suite; empty, with a warning, when no prompt got both
    labels) and ``metrics/align_pairs_<variant>.json``."""
    import time

    from cotgen.align.pairs import build_pairs, judge_scores, threshold_sweep, write_pairs
    from cotgen.generator.model import ShapesGenerator
    from cotgen.reward.data import sample_trajectories
    from cotgen.world.detector import ShapesDetector

    a, v = pairs_params(params, variant), params["align"]["variants"][variant]
    start = time.monotonic()
    _validate("prompts", root / PATHS["train_prompts"], root)
    generator = ShapesGenerator.from_pretrained(root / PATHS[_align_init_key(variant, params)])
    detector = ShapesDetector.from_pretrained(root / PATHS["detector"])
    prompts = balanced_prompts(load_metadata(root / PATHS["train_prompts"]), a["num_prompts"], a["seed"] + v["seed"])
    cfg = sampling_config(params)
    cfg.temperature, cfg.seed = a["temperature"], a["seed"] + v["seed"]
    traj = sample_trajectories(generator, detector, prompts, a["samples_per_prompt"], cfg,
                               heldout_fraction=a["heldout_fraction"], batch_prompts=a["batch_prompts"],
                               seed=a["seed"] + v["seed"])
    scores = None
    if v["labels"] == "judge":
        from cotgen.reward.object_judge import ObjectJudge

        judge = ObjectJudge.from_pretrained(root / PATHS["judge"])
        scores = judge_scores(judge, generator, traj.tokens, [p["prompt"] for p in traj.paths])
    elif v["labels"] != "evaluator":
        raise ValueError(f"align.variants.{variant}.labels must be 'evaluator' or 'judge', got {v['labels']!r}")
    threshold, reject = a["judge_threshold"], a.get("judge_reject_threshold")
    pairs, stats = build_pairs(traj.tokens, traj.paths, seed=a["seed"] + v["seed"], scores=scores,
                               threshold=threshold, min_gap=a.get("judge_min_gap", 0.0), reject_threshold=reject)
    if scores is not None:
        stats.update(judge_threshold=threshold, judge_reject_threshold=reject,
                     threshold_sweep=threshold_sweep(traj.tokens, traj.paths, scores))
    if not pairs:  # every prompt's samples got one label: the round has nothing to learn (the dpo stage is a no-op)
        import warnings

        warnings.warn(f"{variant}: no preference pairs from {stats['prompts']} prompts (all yes: "
                      f"{stats['skipped_all_yes']}, all no: {stats['skipped_all_no']}, tied: {stats['skipped_tied']}); "
                      "sample more images per prompt (align.pairs.samples_per_prompt) or more prompts", stacklevel=2)
    final = root / PATHS[f"{variant}_pairs"]
    tmp = final.with_name(final.name + ".tmp")
    write_pairs(tmp, pairs)
    if pairs:
        _validate("pairs", tmp, root, vocab_size=generator.codebook_size)
    tmp.replace(final)
    stats.update(variant=variant, heldout_pairs=sum(p.get("split") == "heldout" for p in pairs),
                 correct_samples=float(np.mean([p["correct"] for p in traj.paths])),
                 seconds=time.monotonic() - start)
    write_summary(root / f"metrics/align_pairs_{variant}.json", stats)
    return stats


def stage_dpo(params: dict, root: Path = Path("."), variant: str = "dpo") -> dict:
    """DPO of one variant with trl + LoRA (:func:`cotgen.align.dpo.train_dpo`) on its
    pairs, starting from (and referenced to) the variant's starting generator; writes
    ``PATHS["<variant>_generator"]`` (merged :class:`ShapesGenerator`, the adapter under
    ``adapter/``, the training log in ``train_log.json``) and ``metrics/align_<variant>.json``.
    Without training pairs (every prompt's samples got one label) the round is a no-op: the
    starting generator is copied unchanged and the metrics say so."""
    import json
    import tempfile

    from cotgen.align.dpo import train_dpo
    from cotgen.align.pairs import read_pairs
    from cotgen.generator.model import ShapesGenerator

    d = params["align"]["dpo"]
    pairs = read_pairs(root / PATHS[f"{variant}_pairs"])
    if pairs:
        _validate("pairs", root / PATHS[f"{variant}_pairs"], root)
    train = [p for p in pairs if p.get("split") != "heldout"]
    heldout = [p for p in pairs if p.get("split") == "heldout"]
    init = root / PATHS[_align_init_key(variant, params)]
    final = root / PATHS[f"{variant}_generator"]
    tmp = _tmp_dir(final)
    if not train:  # no pairs to learn from: the round leaves its starting generator as it was
        shutil.copytree(init, tmp, ignore=shutil.ignore_patterns("adapter", "train_log.json"))
        _replace_dir(tmp, final)
        metrics = {"variant": variant, "init": params["align"]["variants"][variant]["init"], "pairs": 0,
                   "heldout_pairs": len(heldout), "steps": 0, "note": "no training pairs: generator unchanged"}
        write_summary(root / f"metrics/align_{variant}.json", metrics)
        return metrics
    generator = ShapesGenerator.from_pretrained(init)
    with tempfile.TemporaryDirectory() as scratch:
        _, metrics = train_dpo(
            generator, train, scratch, heldout=heldout, beta=d["beta"], loss_type=d["loss_type"],
            lora_rank=d["lora_rank"], lora_alpha=d["lora_alpha"], target_modules=d["target_modules"],
            steps=d["steps"], batch_size=d["batch_size"], learning_rate=d["learning_rate"],
            warmup_steps=d["warmup_steps"], seed=d["seed"], max_seconds=d.get("max_seconds"),
        )
        shutil.copytree(Path(scratch) / "generator", tmp)
        shutil.copytree(Path(scratch) / "adapter", tmp / "adapter")
    (tmp / "train_log.json").write_text(json.dumps(metrics.pop("log"), indent=1) + "\n")
    _replace_dir(tmp, final)
    metrics.update(variant=variant, init=params["align"]["variants"][variant]["init"])
    write_summary(root / f"metrics/align_{variant}.json", metrics)
    return metrics


def stage_score_variant(params: dict, root: Path = Path("."), variant: str = "dpo") -> dict:
    """GenEval of an aligned generator's samples (``sample_<variant>``)."""
    return score_eval_folder(root, f"{variant}_samples", variant, f"GenEval-Shapes, {variant} (plain sampling)")


# --------------------------------------------------------------- PARM++ (reflect/dvc.yaml, on demand)

#: PARM++ stages (cotgen/reflect/stages.py): reflection data, the judge's reflection
#: head, the self-correction generator, the Table-5 analogue (and its rows, ``table5_<row>``),
#: and the promoted model with PARM++ added (``package_parm_pp``).
REFLECT_STAGES = ("reflect_data", "reflect_judge", "corrector", "reflect_table", "package_parm_pp")


def _reflect_stage(name: str, row: str | None = None, eval_key: str = "eval"):
    def run(params: dict, root: Path = Path(".")) -> dict:
        from cotgen.reflect import stages as reflect

        if row is not None:
            return reflect.run_table5_row(params, Path(root), row, eval_key)
        return getattr(reflect, f"stage_{name}")(params, Path(root))

    run.__doc__ = f"PARM++ stage {name} (see cotgen.reflect.stages)."
    return run


STAGES = {
    "prompts": stage_prompts,
    "detector": stage_detector,
    "render_ground_truth": stage_render_ground_truth,
    "score_ground_truth": stage_score_ground_truth,
    "validate_evaluator": stage_validate_evaluator,
    "tokenizer": stage_tokenizer,
    "tokenizer_check": stage_tokenizer_check,
    "generator": stage_generator,
    "sample_baseline": stage_sample_baseline,
    "score_baseline": stage_score_baseline,
    "trajectories": stage_trajectories,
    "judge": stage_judge,
    "search_parm": stage_search_parm,
    "record_paths": stage_record_paths,
    "replay": stage_replay,
    "record_paths_heldout": partial(stage_record_paths, prompt_set="heldout"),
    "calibrate": stage_calibrate,
    "gate": stage_gate,
    "package": stage_package,
}

for _v in ALIGN_VARIANTS:
    STAGES.update({f"pairs_{_v}": partial(stage_pairs, variant=_v), _v: partial(stage_dpo, variant=_v),
                   f"sample_{_v}": partial(stage_sample_baseline, generator_key=f"{_v}_generator", name=_v),
                   f"score_{_v}": partial(stage_score_variant, variant=_v),
                   f"record_paths_{_v}": partial(stage_record_paths, variant=_v),
                   f"replay_{_v}": partial(stage_replay, variant=_v)})


STAGES.update({name: _reflect_stage(name) for name in REFLECT_STAGES})
from cotgen.reflect.stages import TABLE5  # noqa: E402  (numpy and json only)

STAGES.update({f"table5_{row}": _reflect_stage("table5", row) for row in TABLE5})
# the same rows at the paper's N = 20 (ablations/dvc.yaml table5_n20, reflect.eval_n20)
STAGES.update({f"table5_n20_{row}": _reflect_stage("table5", row, "eval_n20") for row in TABLE5})

# --------------------------------------------------------------- real GenEval (real/dvc.yaml, on demand)

#: search strategies of the real world's stages ``coco_search_<s>`` / ``coco_score_<s>``
#: (cotgen/pipeline/coco.py); they need ``real.world: coco``.
COCO_STRATEGIES = ("sample", "best_of_n", "parm")


def _coco_stage(name: str, strategy: str | None = None):
    def run(params: dict, root: Path = Path(".")) -> dict:
        from cotgen.pipeline import coco

        fn = getattr(coco, f"stage_{name}")
        return fn(params, Path(root)) if strategy is None else fn(params, Path(root), strategy)

    run.__doc__ = f"Real GenEval stage {name}" + (f" ({strategy})" if strategy else "") + " (see cotgen.pipeline.coco)."
    return run


STAGES["coco_prompts"] = _coco_stage("coco_prompts")
for _s in COCO_STRATEGIES:
    STAGES.update({f"coco_search_{_s}": _coco_stage("coco_search", _s),
                   f"coco_score_{_s}": _coco_stage("coco_score", _s)})


def run_stage(name: str, params: dict, root: Path = Path(".")) -> dict:
    """Run the stage called ``name``.

    Raises:
        KeyError: unknown stage (the message lists the known ones).
    """
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; known: {', '.join(STAGES)}")
    return STAGES[name](params, Path(root))


__all__ = ["PATHS", "STAGES", "run_stage"]

"""Real GenEval with real models (issue 9): the stages of ``real/dvc.yaml``.

The same pipeline as the shapes world's search evaluation, with ``params.yaml``'s
``real:`` section choosing the models (:mod:`cotgen.real.config`): Janus-Pro generates,
the VLM judge (LLaVA-OneVision or Qwen2-VL) guides :func:`cotgen.search.search`, and
Mask2Former + CLIP scores the GenEval folder through :mod:`cotgen.geneval.scoring`.

- ``coco_prompts``: GenEval's 553 evaluation prompts (``<real.geneval_dir>/evaluation_metadata.jsonl``,
  checked against GenEval's 80 ``object_names.txt`` by the ``prompts`` suite), or at most
  ``real.eval.max_prompts`` of them spread evenly over the tags -> ``data/coco/prompts.jsonl``.
- ``coco_search_<strategy>`` (``sample``, ``best_of_n``, ``parm``): ``real.eval.images_per_prompt``
  final images per prompt, each from ``real.eval.n`` paths (1 for ``sample``) ->
  ``data/coco/samples/<strategy>`` (GenEval folder; 384x384 for Janus-Pro) and
  ``data/coco/traces/<strategy>.jsonl``.
- ``coco_score_<strategy>``: GenEval of that folder -> ``data/coco/results/<strategy>.jsonl``,
  ``metrics/geneval_coco_<strategy>.json`` (the GenEval metrics keys plus the search's,
  ``world: coco``) and ``plots/geneval_coco_<strategy>.png``.

Every stage raises ValueError unless ``real.world`` is ``coco``. Relative
``real.models_dir`` / ``real.geneval_dir`` are taken from the stage's ``root``. With every
``source: tiny`` the stages run on a CPU in seconds (tests/test_real_pipeline.py).
"""

from __future__ import annotations

from pathlib import Path

from cotgen.geneval.metadata import load_metadata, write_metadata
from cotgen.geneval.report import plot_tags, write_summary
from cotgen.geneval.scoring import score_folder, write_results
from cotgen.jsonl import read_jsonl
from cotgen.pipeline.stages import (COCO_STRATEGIES, _mkparent, _validate, balanced_prompts, search_eval_set,
                                    search_metrics)
from cotgen.real.config import RealConfig

#: the real world's artefacts, relative to the repository root
COCO_PATHS = {
    "prompts": "data/coco/prompts.jsonl",
    "samples": "data/coco/samples/{strategy}",
    "traces": "data/coco/traces/{strategy}.jsonl",
    "results": "data/coco/results/{strategy}.jsonl",
    "metrics": "metrics/geneval_coco_{strategy}.json",
    "plot": "plots/geneval_coco_{strategy}.png",
}


def coco_config(params: dict, root: Path, what: str) -> RealConfig:
    """``params``'s ``real:`` section with paths under ``root``.

    Raises:
        ValueError: ``real.world`` is not ``coco`` (naming ``what`` and the setting), or a
            bad ``real:`` section.
    """
    cfg = RealConfig.from_params(params)
    cfg.require_coco(what)
    return cfg.at_root(root)


def _path(key: str, root: Path, strategy: str | None = None) -> Path:
    return Path(root) / COCO_PATHS[key].format(strategy=strategy)


def _check_strategy(strategy: str) -> None:
    if strategy not in COCO_STRATEGIES:
        raise ValueError(f"unknown real-world strategy {strategy!r}; expected one of {list(COCO_STRATEGIES)}")


def _object_names(cfg: RealConfig) -> list[str]:
    from cotgen.real.detector import geneval_object_names

    return geneval_object_names(Path(cfg.geneval_dir) / "object_names.txt")


def stage_coco_prompts(params: dict, root: Path = Path(".")) -> dict:
    """GenEval's evaluation prompts -> ``data/coco/prompts.jsonl`` (see the module).

    Returns (and nothing else is written) ``{"prompts", "of", "tags": tag -> count}``.

    Raises:
        ValueError: ``real.world`` is not ``coco``.
        FileNotFoundError: no ``evaluation_metadata.jsonl`` under ``real.geneval_dir``.
        cotgen.pipeline.validation.DataValidationError: the metadata breaks the
            ``prompts`` suite (GenEval's schema with its 80 classes).
    """
    from collections import Counter

    cfg = coco_config(params, root, "stage coco_prompts")
    source = Path(cfg.geneval_dir) / "evaluation_metadata.jsonl"
    if not source.is_file():
        raise FileNotFoundError(f"GenEval's evaluation_metadata.jsonl not found under real.geneval_dir ({source})")
    names = _object_names(cfg)
    _validate("prompts", source, root, classnames=names)
    lines = load_metadata(source, classnames=names)
    e = cfg.eval
    chosen = balanced_prompts(lines, e["max_prompts"], e["seed"], at_most=True) if e.get("max_prompts") else lines
    final = _path("prompts", root)
    tmp = final.with_name(final.name + ".tmp")
    write_metadata(tmp, chosen)
    tmp.replace(final)
    return {"prompts": len(chosen), "of": len(lines), "tags": dict(Counter(m["tag"] for m in chosen))}


def stage_coco_search(params: dict, root: Path = Path("."), strategy: str = "parm") -> dict:
    """One search strategy with the real generator and judge on ``data/coco/prompts.jsonl``
    -> ``data/coco/samples/<strategy>`` + ``data/coco/traces/<strategy>.jsonl``
    (:func:`cotgen.pipeline.stages.search_eval_set`); sampling knobs from
    ``real.generator`` (:func:`cotgen.real.config.sampling_config`, seed ``real.eval.seed``),
    thresholds, N, images per prompt and prompts per batch from ``real.eval``.

    Returns ``{"strategy", "prompts", "images", "n", "image_tokens_per_image", ...}``
    (:func:`cotgen.pipeline.stages.search_metrics`).

    Raises:
        ValueError: ``real.world`` is not ``coco``, an unknown strategy, a bad knob.
        MissingModelError: a model is not available (names what to fetch).
    """
    from cotgen.real.config import load_janus, load_judge, sampling_config
    from cotgen.search import SearchConfig

    _check_strategy(strategy)
    cfg = coco_config(params, root, f"stage coco_search_{strategy}")
    e = cfg.eval
    prompts = _path("prompts", root)
    _validate("prompts", prompts, root, classnames=_object_names(cfg))
    eval_set = load_metadata(prompts)
    n = 1 if strategy == "sample" else e["n"]
    generator = load_janus(cfg)
    judge = None if strategy == "sample" else load_judge(cfg)
    config = SearchConfig(strategy, e["clarity_threshold"], e["potential_threshold"])
    traces = search_eval_set(generator, judge, eval_set, sampling_config(cfg, n, seed=e["seed"]), config,
                             e["images_per_prompt"], e["batch_prompts"], _path("samples", root, strategy),
                             _path("traces", root, strategy), desc=f"GenEval {strategy}")
    return {"prompts": len(eval_set), "images": len(traces), **search_metrics(strategy, n, traces)}


def stage_coco_score(params: dict, root: Path = Path("."), strategy: str = "parm") -> dict:
    """GenEval of ``data/coco/samples/<strategy>`` with the Mask2Former + CLIP detector
    (:func:`cotgen.geneval.scoring.score_folder`; every prompt of ``data/coco/prompts.jsonl``
    must be there, with ``real.eval.images_per_prompt`` square PNGs of one size) ->
    ``data/coco/results/<strategy>.jsonl``, ``metrics/geneval_coco_<strategy>.json``
    (``overall``, ``tags``, ``images``, ``prompts``, ``n``, ``image_tokens_per_image``,
    ..., ``world: coco``) and ``plots/geneval_coco_<strategy>.png``. Returns the metrics.

    Raises:
        ValueError: ``real.world`` is not ``coco``, an unknown strategy.
        FileNotFoundError: the folder or its traces are missing (run ``coco_search_<strategy>``).
        cotgen.pipeline.validation.DataValidationError: a malformed folder.
        MissingModelError: a detector model is not available.
    """
    from PIL import Image

    from cotgen.real.config import load_detector

    _check_strategy(strategy)
    cfg = coco_config(params, root, f"stage coco_score_{strategy}")
    folder, trace_file = _path("samples", root, strategy), _path("traces", root, strategy)
    if not trace_file.is_file():
        raise FileNotFoundError(f"no search traces at {trace_file}; run `cotgen stage coco_search_{strategy}` first")
    first = next(iter(sorted(folder.glob("*/samples/0000.png"))), None)
    if first is None:
        raise FileNotFoundError(f"no GenEval folder with samples at {folder}; "
                                f"run `cotgen stage coco_search_{strategy}` first")
    with Image.open(first) as im:
        size = im.width
    _validate("samples", folder, root, images_per_prompt=cfg.eval["images_per_prompt"], image_size=size)
    traces = read_jsonl(trace_file)
    results, summary = score_folder(folder, load_detector(cfg), metadata_file=_path("prompts", root))
    summary.update(search_metrics(strategy, traces[0]["n"], traces), world="coco")
    write_results(_path("results", root, strategy), results)
    write_summary(_path("metrics", root, strategy), summary)
    plot_tags(_mkparent(_path("plot", root, strategy)), summary, title=f"GenEval, {strategy} (N={summary['n']})")
    return summary


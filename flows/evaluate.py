"""Score a model or a GenEval folder on GenEval-Shapes, fanned out over shards of prompts.

Two modes:

- ``folder``: score an existing GenEval folder (``<index>/metadata.jsonl``,
  ``<index>/samples/*.png``) with the shapes detector;
- ``tag``: a verified generator from the BentoML model store (``cotgen-verified:latest``
  by default, or any ``cotgen-candidate:...`` tag), with its own search strategy or
  ``strategy`` / ``n`` overrides, generates the evaluation set and is scored.

Each shard of prompts is one Prefect task (generation + detection), so the work spreads
over the task runner: Prefect's thread pool by default, or Dask through prefect-dask
(``--task-runner dask`` or ``COTGEN_TASK_RUNNER=dask``; ``COTGEN_DASK_ADDRESS`` =
``tcp://host:8786`` for an existing Dask cluster, otherwise a local cluster on
127.0.0.1). Writes ``results.jsonl``, ``summary.json`` and ``geneval.png`` into ``out`` and
a Markdown artifact (``cotgen-evaluate``) with the GenEval table::

    python flows/evaluate.py --folder data/samples/baseline
    python flows/evaluate.py --tag cotgen-verified:latest --strategy best_of_n --n 8 --shards 4
    COTGEN_TASK_RUNNER=dask python flows/evaluate.py --folder data/samples/parm
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from cotgen.pipeline.orchestrate import geneval_markdown, make_task_runner  # noqa: E402


def _shards(indices: list[int], shards: int) -> list[list[int]]:
    shards = max(1, min(shards, len(indices)))
    return [indices[i::shards] for i in range(shards)]


@task(name="generate-shard", task_run_name="generate-shard-{shard}", cache_policy=NO_CACHE)
def generate_shard(shard: int, tag: str | None, strategy: str | None, n: int | None, metadata: list[dict],
                   indices: list[int], images_per_prompt: int, out: str) -> dict:
    """Generate the images of ``indices`` with the verified generator ``tag`` (its own
    strategy unless overridden) into the GenEval folder ``out``; returns compute."""
    from dataclasses import replace

    from cotgen.geneval.layout import write_prompt
    from cotgen.registry import load_verified
    from cotgen.search import SearchConfig, search

    v = load_verified(tag)
    config = SearchConfig(strategy or v.search.strategy, v.search.clarity_threshold, v.search.potential_threshold)
    tokens, images = [], {i: [] for i in indices}
    prompts = [metadata[i]["prompt"] for i in indices]
    for rep in range(images_per_prompt):
        sampling = replace(v.sampling, n=n or v.sampling.n, seed=v.sampling.seed + 1000 * rep)
        for i, r in zip(indices, search(v.generator, v.judge if config.strategy != "sample" else None, prompts,
                                        sampling, config)):
            images[i].append(r.image)
            tokens.append(r.compute["image_tokens"])
    for i in indices:
        write_prompt(out, i, metadata[i], images[i])
    return {"images": len(tokens), "image_tokens": float(sum(tokens)), "strategy": config.strategy,
            "n": sampling.n, "tag": v.tag}


@task(name="score-shard", task_run_name="score-shard-{shard}", cache_policy=NO_CACHE)
def score_shard(shard: int, folder: str, indices: list[int], detector_dir: str) -> list[dict]:
    """GenEval result lines of the prompt folders ``indices`` of ``folder``."""
    from cotgen.geneval.layout import load_image, read_folder
    from cotgen.geneval.scoring import judge_image, result_line
    from cotgen.world.detector import ShapesDetector

    detector = ShapesDetector.from_pretrained(detector_dir)
    wanted = set(indices)
    results = []
    for p in read_folder(folder):
        if p.index in wanted:
            for path in p.samples:
                correct, reason, detected = judge_image(detector, load_image(path), p.metadata)
                results.append(result_line(str(path), p.metadata, correct, reason, detected))
    return results


@flow(name="cotgen-evaluate", task_runner=make_task_runner())
def evaluate(folder: str | None = None, tag: str | None = None, strategy: str | None = None, n: int | None = None,
             root: str = ".", metadata: str = "data/prompts/eval.jsonl", detector: str = "data/detector",
             images_per_prompt: int = 1, shards: int = 4, out: str | None = None) -> dict:
    """GenEval-Shapes of a folder or a registry model, in ``shards`` parallel tasks.

    Args:
        folder: a GenEval folder to score (mode 1).
        tag: a BentoML model tag (mode 2); with neither, the promoted model.
        strategy, n: override the model's search strategy / N (mode 2).
        root: the checkout (``metadata`` and ``detector`` are relative to it).
        images_per_prompt: final images per prompt (mode 2).
        shards: parallel tasks.
        out: output folder (default ``outputs/evaluate/<name>``).
    Returns:
        the GenEval summary (``overall``, ``tags``, ...; mode 2 adds ``image_tokens_per_image``).
    """
    from cotgen.geneval.layout import read_folder
    from cotgen.geneval.metadata import load_metadata
    from cotgen.geneval.report import plot_tags, write_summary
    from cotgen.geneval.scoring import summarize, write_results

    logger = get_run_logger()
    rootp = Path(root).resolve()
    start = time.time()
    name = Path(folder).name if folder else (tag or "cotgen-verified:latest").replace(":", "_")
    out_dir = Path(out) if out else rootp / "outputs" / "evaluate" / name
    out_dir.mkdir(parents=True, exist_ok=True)
    extra: dict = {}
    if folder is None:
        lines = load_metadata(rootp / metadata)
        folder = str(out_dir / "samples")
        futures = [generate_shard.submit(i, tag, strategy, n, lines, idx, images_per_prompt, folder)
                   for i, idx in enumerate(_shards(list(range(len(lines))), shards))]
        compute = [f.result() for f in futures]
        extra = {"n": compute[0]["n"], "strategy": compute[0]["strategy"], "model": compute[0]["tag"],
                 "image_tokens_per_image": sum(c["image_tokens"] for c in compute) / sum(c["images"] for c in compute)}
        logger.info(f"generated {sum(c['images'] for c in compute)} images with {extra['model']} "
                    f"({extra['strategy']}, N={extra['n']})")
    indices = [p.index for p in read_folder(folder)]
    parts = _shards(indices, shards)
    futures = [score_shard.submit(i, str(folder), idx, str(rootp / detector)) for i, idx in enumerate(parts)]
    results = sorted((r for f in futures for r in f.result()), key=lambda r: r["filename"])
    summary = {**summarize(results, n=extra.get("n", 1)), **extra, "shards": len(parts),
               "seconds": round(time.time() - start, 2)}
    write_results(out_dir / "results.jsonl", results)
    write_summary(out_dir / "summary.json", summary)
    plot_tags(out_dir / "geneval.png", summary, title=f"GenEval-Shapes, {name}")
    create_markdown_artifact(geneval_markdown({name: summary}, title=f"GenEval-Shapes: {name}"),
                             key="cotgen-evaluate", description=f"GenEval-Shapes of {name}")
    logger.info(f"{name}: GenEval-Shapes overall {summary['overall']:.3f} over {summary['images']} images "
                f"in {len(parts)} shards -> {out_dir}")
    return summary


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Score a GenEval folder or a registry model (Prefect flow)")
    ap.add_argument("--folder")
    ap.add_argument("--tag")
    ap.add_argument("--strategy")
    ap.add_argument("--n", type=int)
    ap.add_argument("--root", default=".")
    ap.add_argument("--images-per-prompt", type=int, default=1)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--out")
    ap.add_argument("--task-runner", choices=["thread", "dask"], help="default: $COTGEN_TASK_RUNNER or thread")
    ap.add_argument("--dask-address", help="scheduler of an existing Dask cluster (default: a local one)")
    a = ap.parse_args(argv)
    f = evaluate
    if a.task_runner or a.dask_address:
        f = evaluate.with_options(task_runner=make_task_runner(a.task_runner or "dask", a.dask_address))
    summary = f(folder=a.folder, tag=a.tag, strategy=a.strategy, n=a.n, root=a.root,
                images_per_prompt=a.images_per_prompt, shards=a.shards, out=a.out)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

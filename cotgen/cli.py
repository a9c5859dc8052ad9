"""``cotgen`` command line (typer)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(help="cotgen: verified, step-by-step autoregressive image generation.", no_args_is_help=True)
geneval_app = typer.Typer(help="GenEval scoring.", no_args_is_help=True)
world_app = typer.Typer(help="The embedded GenEval-Shapes world.", no_args_is_help=True)
app.add_typer(geneval_app, name="geneval")
app.add_typer(world_app, name="world")

console = Console(stderr=True)
DEFAULT_DETECTOR = Path("data/detector")


def _fail(message: str, code: int = 2) -> None:
    """Print ``error: MESSAGE`` to stderr, unwrapped (callers such as the retrain flow keep
    the error lines of the output) and with brackets taken literally, then exit ``code``."""
    from rich.markup import escape

    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code)


def _load_detector(path: Path):
    from cotgen.world.detector import ShapesDetector

    if not (path / "config.json").is_file():
        _fail(f"no shapes detector at {path}; train one with `cotgen world train-detector --out {path}` "
              "or `dvc repro detector`")
    return ShapesDetector.from_pretrained(path)


@geneval_app.command("score")
def geneval_score(
    folder: Path = typer.Argument(..., help="GenEval folder: <index>/metadata.jsonl and <index>/samples/*.png"),
    out: Path = typer.Option(..., "--out", help="results file (JSON lines, GenEval's fields)"),
    metadata: Optional[Path] = typer.Option(None, "--metadata", help="every prompt of this file must be present"),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="score what is there; count the missing"),
    summary: Optional[Path] = typer.Option(None, "--summary", help="summary JSON (default: OUT with .summary.json)"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="bar chart PNG (default: OUT with .png)"),
    detector: Path = typer.Option(DEFAULT_DETECTOR, "--detector", help="shapes detector folder"),
) -> None:
    """Score a GenEval folder with GenEval's rules; writes results, summary and a bar chart."""
    from cotgen.geneval.layout import ImageError, LayoutError
    from cotgen.geneval.metadata import MetadataError
    from cotgen.geneval.report import format_table, plot_tags, write_summary
    from cotgen.geneval.scoring import score_folder, write_results

    det = _load_detector(detector)
    try:
        results, summ = score_folder(folder, det, metadata_file=metadata, allow_partial=allow_partial)
    except (LayoutError, ImageError, MetadataError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    summary = summary or out.with_suffix(".summary.json")
    plot = plot or out.with_suffix(".png")
    write_results(out, results)
    write_summary(summary, summ)
    plot_tags(plot, summ, title=f"GenEval: {folder.name}")
    print(format_table(summ))
    console.print(f"results {out}, summary {summary}, chart {plot}")


@world_app.command("prompts")
def world_prompts(
    out_eval: Path = typer.Option(Path("data/prompts/eval.jsonl"), help="evaluation set (GenEval-Shapes)"),
    out_train: Path = typer.Option(Path("data/prompts/train.jsonl"), help="training set, disjoint"),
    train_size: int = typer.Option(4000, min=1),
    seed: int = typer.Option(43, help="evaluation seed (GenEval: 43)"),
    n: int = typer.Option(100, min=1, help="draws per tag (GenEval: 100)"),
) -> None:
    """Build the GenEval-Shapes evaluation set and a disjoint training set."""
    from cotgen.geneval.metadata import write_metadata
    from cotgen.world.prompts import build_shapes_eval_set, build_shapes_train_set

    eval_set = build_shapes_eval_set(seed=seed, n=n)
    try:
        train_set = build_shapes_train_set(eval_set, train_size)
    except ValueError as e:
        _fail(str(e))
    write_metadata(out_eval, eval_set)
    write_metadata(out_train, train_set)
    console.print(f"{len(eval_set)} evaluation prompts -> {out_eval}; {len(train_set)} training prompts -> {out_train}")


@world_app.command("render")
def world_render(
    metadata: Path = typer.Argument(..., help="GenEval metadata JSONL"),
    out: Path = typer.Option(..., "--out", help="GenEval folder to write"),
    n: int = typer.Option(4, "-n", min=1, help="images per prompt"),
    seed: int = typer.Option(0),
    degrade: Optional[str] = typer.Option(None, help="blur | noise | jitter | blocks | all"),
    near_miss: Optional[str] = typer.Option(None, help="count | color | position | missing (where it applies)"),
) -> None:
    """Render ground-truth scenes (or degraded ones, or near misses) as a GenEval folder."""
    import numpy as np

    from cotgen.geneval.layout import write_folder
    from cotgen.geneval.metadata import MetadataError, load_metadata
    from cotgen.world.render import degrade as degrade_image
    from cotgen.world.render import near_miss_kinds, render_near_miss, render_scene

    try:
        lines = load_metadata(metadata)
    except (MetadataError, FileNotFoundError) as e:
        _fail(str(e))
    if near_miss:
        lines = [m for m in lines if near_miss in near_miss_kinds(m)]
        if not lines:
            _fail(f"no prompt in {metadata} admits a {near_miss!r} near miss")

    def make(i: int, line: dict):
        rng = np.random.default_rng([seed, i])
        images = []
        for _ in range(n):
            image = render_near_miss(line, rng, near_miss)[0] if near_miss else render_scene(line, rng)[0]
            images.append(degrade_image(image, rng, degrade) if degrade else image)
        return images

    try:
        write_folder(out, lines, make)
    except ValueError as e:
        _fail(str(e))
    console.print(f"{len(lines)} prompts x {n} images -> {out}")


@world_app.command("train-detector")
def world_train_detector(
    out: Path = typer.Option(DEFAULT_DETECTOR, "--out"),
    steps: int = typer.Option(3000, min=1),
    batch_size: int = typer.Option(128, min=1),
    seed: int = typer.Option(0),
) -> None:
    """Train the shapes detector's classifier (safetensors + config.json in OUT)."""
    from cotgen.world.detector import train_shapes_detector

    train_shapes_detector(out, steps=steps, seed=seed, batch_size=batch_size)
    console.print(f"shapes detector -> {out}")


@world_app.command("validate")
def world_validate(
    detector: Path = typer.Option(DEFAULT_DETECTOR, "--detector"),
    out: Path = typer.Option(Path("metrics/evaluator_validation.json"), "--out"),
    images_per_prompt: int = typer.Option(4, min=1),
    seed: int = typer.Option(0),
) -> None:
    """Validate the evaluator: ground truth, degraded renders, near misses."""
    from cotgen.geneval.report import write_summary
    from cotgen.world.prompts import build_shapes_eval_set
    from cotgen.world.validate import validate_evaluator

    metrics = validate_evaluator(_load_detector(detector), build_shapes_eval_set(), images_per_prompt, seed)
    write_summary(out, metrics)
    print(json.dumps(metrics, indent=2))


DEFAULT_GENERATOR = Path("data/generator")


def _load_generator(path: Path):
    from cotgen.generator.model import ShapesGenerator

    try:
        return ShapesGenerator.from_pretrained(path)
    except FileNotFoundError as e:
        _fail(str(e))


def _sampling_config(n: int, cfg_scale: float, temperature: float, top_k: int, seed: int):
    from cotgen.generator.sampling import SamplingConfig

    return SamplingConfig(n=n, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, seed=seed)


DEFAULT_JUDGE = Path("data/judge")
DEFAULT_CORRECTOR = Path("data/reflect/corrector")
DEFAULT_REFLECTIVE_JUDGE = Path("data/reflect/judge")


def _generation_models(world: Optional[str], params: Path, strategy: str, generator: Path, judge: Path, n: int,
                       cfg_scale: Optional[float], temperature: Optional[float], top_k: Optional[int], seed: int):
    """``generate``'s models for its world: ``(generator, load_reward (called only by the
    strategies that judge), SamplingConfig, SearchConfig thresholds)``. ``world`` None reads
    ``real.world`` of ``params`` (shapes without a params file). coco: the models of ``real:``
    (:mod:`cotgen.real.config`, ``source: tiny`` included); exits with a message for an
    unknown world, parm_pp in coco, or a missing model."""
    from dataclasses import replace

    from cotgen.real.config import WORLDS, RealConfig

    if world is not None and world not in WORLDS:
        _fail(f"--world must be one of {', '.join(WORLDS)}, got {world!r}")
    p = {} if world == "shapes" or (world is None and not params.is_file()) else _load_params(params, None)
    try:
        cfg = RealConfig.from_params({**p, "real": {**(p.get("real") or {}), **({"world": world} if world else {})}})
    except ValueError as e:
        _fail(str(e))
    if not cfg.is_real:
        from cotgen.reward.object_judge import ObjectJudge

        config = _sampling_config(n, 2.0 if cfg_scale is None else cfg_scale,
                                  1.0 if temperature is None else temperature, 0 if top_k is None else top_k, seed)
        return _load_generator(generator), lambda: ObjectJudge.from_pretrained(judge), config, {}
    from cotgen.real.config import MissingModelError, load_janus, load_judge, sampling_config

    if strategy == "parm_pp":
        _fail("parm_pp needs cotgen's reflective judge and self-correction generator: shapes world only")
    config = sampling_config(cfg, n, seed)
    given = {"cfg_scale": cfg_scale, "temperature": temperature, "top_k": top_k}
    config = replace(config, **{k: v for k, v in given.items() if v is not None})
    try:
        thresholds = {k: cfg.eval[k] for k in ("clarity_threshold", "potential_threshold")}
        return load_janus(cfg), lambda: load_judge(cfg), config, thresholds
    except (MissingModelError, ValueError) as e:
        _fail(str(e))


@app.command("generate")
def generate(
    prompt: str = typer.Argument(..., help='e.g. "a photo of a red circle left of a blue square"'),
    n: int = typer.Option(4, "-n", min=1, help="candidate paths"),
    out: Path = typer.Option(Path("outputs/generate"), "--out"),
    strategy: str = typer.Option("sample", "--strategy",
                                 help="sample (N plain candidates), best_of_n, prm, parm, parm_pp (PARM++)"),
    save_steps: bool = typer.Option(False, "--save-steps", help="also save every intermediate image"),
    generator: Path = typer.Option(DEFAULT_GENERATOR, "--generator"),
    judge: Path = typer.Option(DEFAULT_JUDGE, "--judge", help="reward model (strategies other than sample)"),
    cfg_scale: Optional[float] = typer.Option(None, "--cfg-scale", min=0.0,
                                             help="default 2.0 (shapes), real.generator's (coco)"),
    temperature: Optional[float] = typer.Option(None, min=1e-3, help="default 1.0 (shapes), real.generator's (coco)"),
    top_k: Optional[int] = typer.Option(None, min=0, help="default 0 (shapes), real.generator's (coco)"),
    seed: int = typer.Option(0),
    corrector: Path = typer.Option(DEFAULT_CORRECTOR, "--corrector", help="parm_pp: self-correction generator"),
    max_rounds: int = typer.Option(3, "--max-rounds", min=1, help="parm_pp: most generation rounds"),
    final_round: str = typer.Option("best", "--final-round", help="parm_pp: the image returned when no round is "
                                    "accepted: last (the paper's loop) or best (highest outcome P(yes))"),
    world: Optional[str] = typer.Option(None, "--world", help="shapes (the models under data/) or coco (the real "
                                        "models of params real:); default: params real.world"),
    params: Path = typer.Option(Path("params.yaml"), "--params", help="its real: section (world, coco models)"),
) -> None:
    """Generate N candidates for one prompt; writes PNGs, a grid (candidates x steps; cut
    paths end where they were cut, the chosen one is starred) and, for a search, trace.json.
    parm_pp (``--judge`` a reflective judge, ``--corrector``): the grid has every round's
    candidates (rows ``r<round>``), ``round<k>.png`` each round's chosen image, and the
    reflections are printed and in trace.json. ``--world coco``: Janus-Pro and the VLM judge
    of params.yaml's ``real:`` (its sampling knobs unless given here, ``real.eval``'s PARM
    thresholds; not parm_pp)."""
    from cotgen.generator.grid import image_grid
    from cotgen.search import STRATEGIES, SearchConfig, search, stepwise_sampler
    from cotgen.search.strategies import FINAL_ROUNDS

    if strategy not in STRATEGIES:
        _fail(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    if final_round not in FINAL_ROUNDS:
        _fail(f"unknown --final-round {final_round!r}; expected one of {', '.join(FINAL_ROUNDS)}")
    gen, load_reward, config, thresholds = _generation_models(world, params, strategy, generator, judge, n,
                                                              cfg_scale, temperature, top_k, seed)
    out.mkdir(parents=True, exist_ok=True)
    if strategy == "sample":
        try:
            sampler = stepwise_sampler(gen, [prompt], config)
        except ValueError as e:
            _fail(str(e))
        columns = []
        while not sampler.done:
            sampler.step()
            columns.append(sampler.images())
        rows = [[col[j] for col in columns] for j in range(n)]
        labels = [f"cand {j}" for j in range(n)]
        finals = columns[-1]
    elif strategy == "parm_pp":
        from cotgen.reflect.corrector import SelfCorrector
        from cotgen.reflect.judge import ReflectiveJudge

        judge = DEFAULT_REFLECTIVE_JUDGE if judge == DEFAULT_JUDGE else judge
        try:
            reward = ReflectiveJudge.from_pretrained(judge)
            fixer = SelfCorrector.from_pretrained(corrector)
            result = search(gen, reward, [prompt], config, SearchConfig(strategy, max_rounds=max_rounds,
                                                                           final_round=final_round),
                            keep_steps=True, corrector=fixer)[0]
        except (ValueError, FileNotFoundError) as e:
            _fail(str(e))
        rows, labels, finals = [], [], []
        for rd in result.rounds:
            verdict = "yes" if rd["accepted"] else "no"
            returned = " <- returned" if rd["round"] == result.compute["returned_round"] else ""
            console.print(f"round {rd['round']}: score {rd['score']:.4f} ({verdict}){returned}"
                          + (f", conditioned on: {rd['condition_reflection']!r}" if rd["condition_reflection"] else "")
                          + (f"; reflection: {rd['reflection']!r}" if rd["reflection"] else ""))
            rd["image"].save(out / f"round{rd['round']}.png")
            for t in rd["paths"]:
                mark = "*" if t.candidate == rd["chosen"] else " "
                where = f"x{t.cut_at_step}" if t.cut_at_step is not None else (
                    f"{t.outcome:.2f}" if t.outcome is not None else "")
                rows.append(rd["steps"][t.candidate])
                labels.append(f"r{rd['round']}{mark}{t.candidate} {where}")
                finals.append(rd["steps"][t.candidate][-1] if t.cut_at_step is None
                              and rd["round"] == result.compute["returned_round"] else None)
        result.image.save(out / "chosen.png")
        (out / "trace.json").write_text(json.dumps(result.trace(), indent=2) + "\n")
    else:
        try:
            reward = load_reward()
            result = search(gen, reward, [prompt], config, SearchConfig(strategy, **thresholds), keep_steps=True)[0]
        except (ValueError, FileNotFoundError) as e:
            _fail(str(e))
        rows = [result.steps[j] for j in range(n)]
        labels = []
        for t in result.paths:
            mark = "*" if t.candidate == result.chosen else " "
            where = f"cut@{t.cut_at_step}" if t.cut_at_step is not None else (
                f"{t.outcome:.2f}" if t.outcome is not None else "")
            labels.append(f"{mark}{t.candidate} {where}")
        finals = [r[-1] if t.cut_at_step is None else None for r, t in zip(rows, result.paths)]
        result.image.save(out / "chosen.png")
        (out / "trace.json").write_text(json.dumps(result.trace(), indent=2) + "\n")
    for j, image in enumerate(finals):
        if image is not None:
            image.save(out / f"{j:04d}.png")
        if save_steps:
            for s, im in enumerate(rows[j]):
                im.save(out / f"{j:04d}_step{s + 1:02d}.png")
    steps = max(len(r) for r in rows)
    image_grid(rows, row_labels=labels, col_labels=[f"s{s + 1}" for s in range(steps)]).save(out / "grid.png")
    console.print(f"{strategy}: {n} candidates" + (f", {len(result.rounds)} round(s)" if strategy == "parm_pp" else "")
                  + f", grid.png -> {out}")


@app.command("sample")
def sample(
    metadata: Path = typer.Option(..., "--metadata", help="GenEval metadata JSONL"),
    out: Path = typer.Option(..., "--out", help="GenEval folder to write"),
    n: int = typer.Option(4, "-n", min=1, help="images per prompt"),
    generator: Path = typer.Option(DEFAULT_GENERATOR, "--generator"),
    cfg_scale: float = typer.Option(2.0, "--cfg-scale", min=0.0),
    temperature: float = typer.Option(1.0, min=1e-3),
    top_k: int = typer.Option(0, min=0),
    seed: int = typer.Option(0),
) -> None:
    """Sample a GenEval folder (N images per prompt) for `cotgen geneval score`."""
    from cotgen.geneval.layout import write_folder
    from cotgen.geneval.metadata import MetadataError, load_metadata
    from cotgen.generator.sampling import sample_images

    try:
        lines = load_metadata(metadata)
    except (MetadataError, FileNotFoundError) as e:
        _fail(str(e))
    gen = _load_generator(generator)
    try:
        images = sample_images(gen, [m["prompt"] for m in lines], _sampling_config(n, cfg_scale, temperature, top_k, seed))
    except ValueError as e:
        _fail(str(e))
    write_folder(out, lines, lambda i, m: images[i])
    console.print(f"{len(lines)} prompts x {n} images -> {out}")


def _load_params(path: Path, profile: Optional[str]) -> dict:
    from cotgen.pipeline.params import ParamsError, load_params

    try:
        return load_params(path, profile)
    except ParamsError as e:
        _fail(str(e))


@app.command("evaluate-search")
def evaluate_search(
    strategy: str = typer.Argument(..., help="sample, best_of_n, prm or parm"),
    n: int = typer.Option(20, "--n", min=1, help="candidate paths per final image (N)"),
    images_per_prompt: Optional[int] = typer.Option(None, "--images-per-prompt", min=1,
                                                    help="default: evaluation.images_per_prompt"),
    params: Path = typer.Option(Path("params.yaml"), "--params"),
    profile: Optional[str] = typer.Option(None, "--profile", help="e.g. tiny"),
) -> None:
    """Run a search strategy at N on the evaluation set and score it (the ablation stages
    of ablations/dvc.yaml); writes metrics/geneval_<strategy>_n<N>.json and redraws the
    GenEval-against-N and against-tokens plots."""
    from cotgen.pipeline.stages import plot_search_curves, run_search_eval, search_eval_name
    from cotgen.search import STRATEGIES

    if strategy not in STRATEGIES:
        _fail(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    p = _load_params(params, profile)
    summary = run_search_eval(p, Path("."), strategy, n, search_eval_name(strategy, n, images_per_prompt, p["search"]["n"]),
                              images_per_prompt)
    plot_search_curves()
    print(json.dumps(summary, indent=2))


@app.command("validate")
def validate_data(
    kind: str = typer.Argument(..., help="prompts, samples, labels, pairs or reflections"),
    path: Path = typer.Argument(..., help="the file (JSONL kinds) or folder (samples, labels)"),
    report_dir: Optional[Path] = typer.Option(None, "--report-dir", help="default: reports/validation"),
    vocab_size: Optional[int] = typer.Option(None, "--vocab-size", min=1, help="default: the tokenizer's codebook"),
) -> None:
    """Check a data file against its Great Expectations suite; on failure writes
    <report-dir>/<kind>.json and .md and exits 1."""
    from rich.markup import escape

    from cotgen.pipeline.validation import DataValidationError, validate

    try:
        summary = validate(kind, path, report_dir, vocab_size=vocab_size)
    except DataValidationError as e:
        _fail(escape(str(e)), code=1)
    except (ValueError, FileNotFoundError) as e:
        _fail(escape(str(e)))
    print(json.dumps(summary, indent=2))


@app.command("train-vlm-judge")
def train_vlm_judge_cmd(
    out: Path = typer.Option(Path("data/vlm_judge"), "--out", help="output folder"),
    metrics: Path = typer.Option(Path("metrics/vlm_judge.json"), "--metrics", help="metrics JSON"),
    trajectories: Path = typer.Option(Path("data/reward/trajectories"), "--trajectories"),
    tokenizer: Path = typer.Option(Path("data/tokenizer"), "--tokenizer"),
    minutes: float = typer.Option(10.0, "--minutes", help="wall-clock training budget"),
    hidden_size: int = typer.Option(96, "--hidden-size"),
    patch_size: int = typer.Option(8, "--patch-size", help="pixels per side of a vision patch"),
    layers: int = typer.Option(2, "--layers", help="layers of each tower"),
    learning_rate: float = typer.Option(3e-4, "--lr"),
    warmup_steps: int = typer.Option(200, "--warmup-steps"),
    batch_size: int = typer.Option(32, "--batch-size"),
) -> None:
    """Train a LLaVA-architecture judge from scratch on the outcome question and report
    its held-out AUROC (the VLM route of issue 4, next to the object-centric judge)."""
    from cotgen.geneval.report import write_summary
    from cotgen.reward.data import Trajectories
    from cotgen.reward.vlm_judge import train_vlm_judge
    from cotgen.tokenizer.vq import VQTokenizer

    traj = Trajectories.load(trajectories)
    image_tokenizer = VQTokenizer.from_pretrained(tokenizer)
    image_tokenizer.eval()
    _, result = train_vlm_judge(traj, image_tokenizer, out, hidden_size=hidden_size, patch_size=patch_size,
                                vision_layers=layers, text_layers=layers, steps=1_000_000, batch_size=batch_size,
                                learning_rate=learning_rate, warmup_steps=warmup_steps, max_seconds=60 * minutes)
    write_summary(metrics, result)
    console.print(json.dumps(result, indent=2))


@app.command("stage")
def stage(
    name: str = typer.Argument(..., help="pipeline stage (see dvc.yaml)"),
    params: Path = typer.Option(Path("params.yaml"), "--params"),
    profile: Optional[str] = typer.Option(None, "--profile", help="e.g. tiny"),
) -> None:
    """Run one pipeline stage (what `dvc repro` calls)."""
    from cotgen.pipeline.stages import STAGES, run_stage

    if name not in STAGES:
        _fail(f"unknown stage {name!r}; known: {', '.join(STAGES)}")
    from rich.markup import escape

    from cotgen.pipeline.gate import GateFailedError

    try:
        metrics = run_stage(name, _load_params(params, profile))
    except GateFailedError as e:  # the package stage refuses a failed gate: say which thresholds
        _fail(escape(str(e)), code=1)
    if metrics:
        print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    app()

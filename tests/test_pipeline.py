"""The whole pipeline on the tiny profile, stage by stage, in a temporary root."""

import json
import shutil

import pytest

from cotgen.pipeline.params import ParamsError, load_params
from cotgen.pipeline.stages import PATHS, STAGES, run_stage

from .conftest import ORDER, REPO


def _expanded_commands(dvcfile):
    """cmd of every stage of a dvc.yaml, matrix stages expanded (DVC's ${item.key})."""
    import itertools

    import yaml

    cmds = {}
    for name, stage in yaml.safe_load(dvcfile.read_text())["stages"].items():
        matrix = stage.get("matrix", {})
        for values in itertools.product(*matrix.values()):
            cmd = stage["cmd"]
            for key, value in zip(matrix, values):
                cmd = cmd.replace(f"${{item.{key}}}", str(value))
            cmds[name + "".join(f"@{v}" for v in values)] = cmd
    return cmds


def test_dvc_stages_call_pipeline_functions():
    stages = _expanded_commands(REPO / "dvc.yaml")
    assert list(stages) == ORDER  # every stage of the main job, in an order DVC can run them
    for name, cmd in stages.items():
        assert cmd.startswith(f"cotgen stage {name}")
    # the on-demand files (PARM++, ablations) call the same stage functions (or `cotgen evaluate-search`)
    for dvcfile in ("reflect/dvc.yaml", "ablations/dvc.yaml"):
        for name, cmd in _expanded_commands(REPO / dvcfile).items():
            if cmd.startswith("cotgen evaluate-search "):
                continue
            assert cmd.startswith("cotgen stage "), (dvcfile, name, cmd)
            assert cmd.split()[2] in STAGES, (dvcfile, name, cmd)


def test_file_stages_lists_another_dvc_yaml_in_order(tmp_path):
    from cotgen.pipeline.orchestrate import file_stages

    names = file_stages(REPO, "reflect/dvc.yaml")
    rows = ["parm_pp_corrector_sample", "parm_pp_corrector_orm", "parm_pp_corrector_parm", "parm_pp_noreflect",
            "parm_pp"]
    assert names == [f"reflect/dvc.yaml:{n}" for n in
                     ["reflect_data", "reflect_judge", "corrector", *(f"table5@{r}" for r in rows), "package_parm_pp"]]
    (tmp_path / "x").mkdir()
    (tmp_path / "x/dvc.yaml").write_text("stages:\n  s:\n    matrix: {a: [1], b: [2]}\n    cmd: echo\n")
    with pytest.raises(ValueError, match="2 keys"):
        file_stages(tmp_path, "x/dvc.yaml")
    with pytest.raises(FileNotFoundError, match="missing"):
        file_stages(tmp_path, "y/dvc.yaml")


def test_params_profiles(tmp_path):
    tiny = load_params(REPO / "params.yaml", "tiny")
    default = load_params(REPO / "params.yaml")
    assert tiny["detector"]["steps"] < default["detector"]["steps"]
    assert tiny["detector"]["seed"] == default["detector"]["seed"]  # merged, not replaced
    with pytest.raises(ParamsError, match="unknown profile 'huge'"):
        load_params(REPO / "params.yaml", "huge")
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "absent.yaml")


def test_tiny_pipeline_writes_every_output(tiny_run):
    root, params, metrics = tiny_run
    from cotgen.pipeline.stages import ALIGN_VARIANTS

    ablation_outputs = ("registry", "replay_paths", "replay_heldout")
    for key in PATHS:
        if not key.startswith(tuple(f"{v}_" for v in ALIGN_VARIANTS)) and key not in ablation_outputs:
            assert (root / PATHS[key]).exists(), key
    for name in ("geneval_ground_truth", "geneval_baseline", "geneval_parm"):
        summary = json.loads((root / f"metrics/{name}.json").read_text())
        assert {"overall", "tags", "images", "prompts", "n"} <= set(summary)
        assert summary["prompts"] == metrics["prompts"]["eval"]["prompts"]
    validation = json.loads((root / "metrics/evaluator_validation.json").read_text())
    assert {"ground_truth_overall", "degraded_overall", "near_miss_correct_rate"} <= set(validation)
    parm = json.loads((root / "metrics/geneval_parm.json").read_text())
    assert parm["n"] == params["search"]["n"] and 0 < parm["image_tokens_per_image"] <= 3 * 256
    judge = json.loads((root / "metrics/judge.json").read_text())
    assert judge["heldout_examples"] > 0 and "clarity" in judge
    tok = json.loads((root / "metrics/tokenizer.json").read_text())
    assert 0 < tok["codebook_usage"] <= 1
    train = {json.dumps(m) for m in map(json.loads, (root / PATHS["train_prompts"]).read_text().splitlines())}
    evals = {json.loads(m)["prompt"] for m in (root / PATHS["eval_prompts"]).read_text().splitlines()}
    assert not {json.loads(m)["prompt"] for m in train} & evals


def test_failed_stage_leaves_earlier_outputs(tiny_run):
    root, params, _ = tiny_run
    before = sorted(p.name for p in (root / PATHS["generator"]).iterdir())
    stamp = (root / PATHS["generator"] / "generator.json").read_bytes()
    bad = json.loads(json.dumps(params))
    bad["generator"]["cond_dropout"] = 1.5
    with pytest.raises(ValueError, match="condition dropout"):
        run_stage("generator", bad, root)
    assert sorted(p.name for p in (root / PATHS["generator"]).iterdir()) == before
    assert (root / PATHS["generator"] / "generator.json").read_bytes() == stamp
    shutil.rmtree(root / "data/generator.tmp", ignore_errors=True)


def test_unknown_stage():
    with pytest.raises(KeyError, match="unknown stage 'nope'"):
        run_stage("nope", {})


def test_evaluate_search_cli(tiny_run, monkeypatch):
    from typer.testing import CliRunner

    from cotgen.cli import app

    root, _, _ = tiny_run
    monkeypatch.chdir(root)
    args = ["evaluate-search", "best_of_n", "--n", "2", "--params", str(REPO / "params.yaml"), "--profile", "tiny"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((root / "metrics/geneval_best_of_n_n2.json").read_text())
    assert summary["n"] == 2 and summary["strategy"] == "best_of_n"
    assert summary["image_tokens_per_image"] == 2 * 256  # best-of-N spends every path in full
    assert (root / "plots/geneval_vs_n.png").is_file() and (root / "plots/geneval_vs_tokens.png").is_file()
    bad = CliRunner().invoke(app, ["evaluate-search", "beam"])
    assert bad.exit_code == 2 and "unknown strategy 'beam'" in bad.output


def test_train_vlm_judge_cli(tiny_run, monkeypatch):
    from typer.testing import CliRunner

    from cotgen.cli import app

    root, _, _ = tiny_run
    monkeypatch.chdir(root)
    args = ["train-vlm-judge", "--out", "vlm", "--metrics", "vlm.json", "--minutes", "0.02", "--hidden-size", "16",
            "--patch-size", "16", "--layers", "1", "--warmup-steps", "0", "--batch-size", "4"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((root / "vlm.json").read_text())
    assert metrics["steps"] >= 1 and metrics["outcome"]["n"] == sum(
        p["split"] == "heldout" for p in map(json.loads, (root / PATHS["trajectories"] / "paths.jsonl").read_text().splitlines()))
    assert (root / "vlm" / "judge").is_dir()

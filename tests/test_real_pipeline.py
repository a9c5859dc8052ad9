"""The real world's pipeline (issue 9; cotgen/pipeline/coco.py, real/dvc.yaml) and
``cotgen generate --world coco`` on tiny random models (``source: tiny``): GenEval's
prompts -> PARM search with Janus and a VLM judge -> Mask2Former + CLIP scoring. CPU,
nothing downloaded."""

import json
import shutil

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from cotgen.pipeline.stages import run_stage

STEP = 16  # the tiny Janus: 8x8 codes, 4 steps of 16
CODES = 64


def real_section(geneval_dir, world="coco", **eval_knobs):
    """Every model tiny; PARM's thresholds force one cut per prompt: every path is clear at
    step 1 (clarity 0) and no potential reaches 1, so all but the most promising path of a
    prompt are cut there."""
    return {"world": world, "device": "cpu", "dtype": "float32", "geneval_dir": str(geneval_dir),
            "generator": {"source": "tiny", "tokens_per_step": STEP, "cfg_scale": 2.0},
            "judge": {"kind": "llava_onevision", "source": "tiny"},
            "detector": {"mask2former": "tiny", "clip": "tiny"},
            "eval": {"max_prompts": 3, "images_per_prompt": 1, "n": 2, "clarity_threshold": 0.0,
                     "potential_threshold": 1.0, **eval_knobs}}


@pytest.fixture(scope="module")
def coco_run(tmp_path_factory, geneval_data):
    """coco_prompts -> coco_search_parm -> coco_score_parm in a temporary root."""
    root = tmp_path_factory.mktemp("coco")
    params = {"real": real_section(geneval_data)}
    metrics = {name: run_stage(name, params, root) for name in ("coco_prompts", "coco_search_parm", "coco_score_parm")}
    return root, metrics


def test_coco_prompts_are_geneval_spread_over_tags(coco_run, geneval_data):
    from cotgen.geneval.metadata import load_metadata

    root, metrics = coco_run
    lines = load_metadata(root / "data/coco/prompts.jsonl")
    official = [json.loads(x) for x in (geneval_data / "evaluation_metadata.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and metrics["coco_prompts"]["of"] == 553
    assert all(m in official for m in lines)
    assert len({m["tag"] for m in lines}) == 3  # at most max_prompts, each from another tag


def test_coco_prompts_suite_rejects_a_class_outside_geneval(tmp_path, geneval_data):
    from cotgen.pipeline.validation import DataValidationError

    shutil.copy(geneval_data / "object_names.txt", tmp_path / "object_names.txt")
    bad = {"tag": "single_object", "include": [{"class": "unicorn", "count": 1}], "prompt": "a photo of a unicorn"}
    (tmp_path / "evaluation_metadata.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(DataValidationError, match="unicorn"):
        run_stage("coco_prompts", {"real": real_section(tmp_path)}, tmp_path / "root")
    assert not (tmp_path / "root/data/coco/prompts.jsonl").exists()


def test_coco_parm_search_writes_a_geneval_folder_and_cut_traces(coco_run):
    root, metrics = coco_run
    folder = root / "data/coco/samples/parm"
    prompts = [json.loads(x) for x in (root / "data/coco/prompts.jsonl").read_text().splitlines()]
    assert sorted(p.name for p in folder.iterdir()) == ["00000", "00001", "00002"]
    for i, meta in enumerate(prompts):
        assert json.loads((folder / f"{i:05d}/metadata.jsonl").read_text()) == meta
        assert [p.name for p in (folder / f"{i:05d}/samples").iterdir()] == ["0000.png"]
        with Image.open(folder / f"{i:05d}/samples/0000.png") as im:
            assert im.size == (32, 32) and im.mode == "RGB"
    traces = [json.loads(x) for x in (root / "data/coco/traces/parm.jsonl").read_text().splitlines()]
    assert [t["index"] for t in traces] == [0, 1, 2] and all(t["strategy"] == "parm" and t["n"] == 2 for t in traces)
    for t in traces:
        cut = [p for p in t["paths"] if p["cut_at_step"] is not None]
        kept = [p for p in t["paths"] if p["cut_at_step"] is None]
        assert len(cut) == 1 and len(kept) == 1 and t["chosen"] == kept[0]["candidate"]
        assert cut[0]["cut_at_step"] == 1 and cut[0]["image_tokens"] == STEP and kept[0]["image_tokens"] == CODES
        assert 0 < cut[0]["forward_passes"] < kept[0]["forward_passes"]
        assert t["compute"]["image_tokens"] == STEP + CODES
        assert t["compute"]["forward_passes"] == cut[0]["forward_passes"] + kept[0]["forward_passes"]
    assert metrics["coco_search_parm"]["image_tokens_per_image"] == STEP + CODES


def test_coco_score_metrics_have_the_geneval_schema(coco_run):
    root, metrics = coco_run
    m = json.loads((root / "metrics/geneval_coco_parm.json").read_text())
    assert m == metrics["coco_score_parm"]
    assert {"overall", "tags", "images", "prompts", "n", "image_tokens_per_image"} <= set(m)
    assert m["images"] == 3 and m["prompts"] == 3 and m["n"] == 2 and m["world"] == "coco"
    assert m["strategy"] == "parm" and m["image_tokens_per_image"] == STEP + CODES
    assert 0 <= m["overall"] <= 1 and set(m["tags"]) == {json.loads(x)["tag"] for x in
                                                         (root / "data/coco/prompts.jsonl").read_text().splitlines()}
    results = [json.loads(x) for x in (root / "data/coco/results/parm.jsonl").read_text().splitlines()]
    assert len(results) == 3 and all(r["filename"].endswith("samples/0000.png") for r in results)
    assert (root / "plots/geneval_coco_parm.png").is_file()


def test_coco_stages_refuse_the_shapes_world(tmp_path, geneval_data):
    params = {"real": real_section(geneval_data, world="shapes")}
    for name in ("coco_prompts", "coco_search_parm", "coco_score_best_of_n"):
        with pytest.raises(ValueError, match="real.world: coco"):
            run_stage(name, params, tmp_path)
    assert not (tmp_path / "data").exists()
    with pytest.raises(ValueError, match="real.world"):  # and no real: section at all is the shapes world
        run_stage("coco_prompts", {}, tmp_path)


def test_generate_world_coco_writes_grid_and_trace(tmp_path, geneval_data):
    from cotgen.cli import app

    # params say shapes; --world coco overrides
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"real": real_section(geneval_data, world="shapes")}))
    out = tmp_path / "out"
    args = ["generate", "a photo of a dog", "--world", "coco", "--params", str(tmp_path / "params.yaml"),
            "--out", str(out)]
    result = CliRunner().invoke(app, args + ["--strategy", "parm", "-n", "2"])
    assert result.exit_code == 0, result.output
    with Image.open(out / "grid.png") as grid, Image.open(out / "chosen.png") as chosen:
        assert chosen.size == (32, 32) and grid.width > 32
    trace = json.loads((out / "trace.json").read_text())
    assert trace["strategy"] == "parm" and trace["n"] == 2 and len(trace["paths"]) == 2
    assert sorted(p["cut_at_step"] for p in trace["paths"] if p["cut_at_step"] is not None) == [1]
    assert trace["compute"]["image_tokens"] == STEP + CODES
    bad = CliRunner().invoke(app, args + ["--strategy", "parm_pp"])
    assert bad.exit_code == 2 and "shapes world only" in bad.output

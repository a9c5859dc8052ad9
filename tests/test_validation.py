"""Great Expectations suites at the data boundaries: valid data passes, each corruption
is caught naming the expectation and the row, and a stage stops before writing."""

import json
import shutil

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cotgen.geneval.layout import write_folder
from cotgen.geneval.metadata import write_metadata
from cotgen.pipeline.params import load_params
from cotgen.pipeline.stages import PATHS, run_stage
from cotgen.pipeline.validation import KINDS, DataValidationError, validate
from cotgen.reward.data import Trajectories

from .conftest import REPO

PROMPTS = [
    {"tag": "single_object", "prompt": "a photo of a star", "include": [{"class": "star", "count": 1}]},
    {"tag": "colors", "prompt": "a photo of a red circle", "include": [{"class": "circle", "count": 1, "color": "red"}]},
    {"tag": "counting", "prompt": "a photo of two hearts",
     "include": [{"class": "heart", "count": 2}], "exclude": [{"class": "heart", "count": 3}]},
    {"tag": "position", "prompt": "a photo of a square left of a cross",
     "include": [{"class": "cross", "count": 1}, {"class": "square", "count": 1, "position": ["left of", 0]}]},
]


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default report folder: <cwd>/reports/validation


DROP = object()


def jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def check_fails(kind, path, expectation, row, **kw):
    with pytest.raises(DataValidationError) as info:
        validate(kind, path, report_dir=path.parent / "reports", **kw)
    message = str(info.value)
    assert expectation in message and row in message, message
    return info.value


# --- prompts --------------------------------------------------------------------------


def test_prompts_valid(tmp_path):
    summary = validate("prompts", jsonl(tmp_path / "p.jsonl", PROMPTS))
    assert summary["success"] and summary["tables"] == {"prompts": 4, "requirements": 6}
    assert not (tmp_path / "reports").exists()


@pytest.mark.parametrize("line, change, expectation, value", [
    (1, {"tag": "texture"}, "expect_column_values_to_be_in_set(tag", "texture"),
    (2, {"include": [{"class": "circle", "count": 1, "color": "teal"}]}, "expect_column_values_to_be_in_set(color",
     "teal"),
    (2, {"include": [{"class": "hexagon", "count": 1}]}, "expect_column_values_to_be_in_set(class", "hexagon"),
    (3, {"prompt": "a photo of a star"}, "expect_column_values_to_be_unique(prompt", "a photo of a star"),
    (3, {"include": [{"class": "heart", "count": 0}]}, "expect_column_values_to_be_between(count", "0"),
    (4, {"include": [{"class": "cross", "count": 1, "position": ["behind", 0]}]},
     "expect_column_values_to_be_in_set(relation", "behind"),
    (1, {"include": []}, "expect_column_values_to_be_between(n_include", "0"),
    (2, {"prompt": "  "}, "expect_column_values_to_match_regex(prompt", "'  '"),
])
def test_prompts_corruptions(tmp_path, line, change, expectation, value):
    rows = [dict(p) for p in PROMPTS]
    rows[line - 1].update(change)
    error = check_fails("prompts", jsonl(tmp_path / "p.jsonl", rows), expectation, f"line {line}")
    assert value in str(error)


def test_prompts_not_json_and_report(tmp_path):
    path = jsonl(tmp_path / "p.jsonl", [*PROMPTS, "{not json"])
    error = check_fails("prompts", path, "expect_column_values_to_be_null(error", "line 5: 'not valid JSON")
    report = json.loads((tmp_path / "reports/prompts.json").read_text())
    assert report["path"] == str(path) and report["failures"][0]["rows"][0]["row"] == "line 5"
    md = (tmp_path / "reports/prompts.md").read_text()
    assert "expect_column_values_to_be_null(error)" in md and "| line 5 |" in md
    assert error.report["report_md"] == str(tmp_path / "reports/prompts.md")


def test_unknown_kind_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="unknown data kind 'images'; known: prompts, samples, labels"):
        validate("images", tmp_path)
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        validate("prompts", tmp_path / "absent.jsonl")
    assert set(KINDS) == {"prompts", "samples", "labels", "pairs", "reflections"}


# --- samples --------------------------------------------------------------------------


@pytest.fixture
def samples(tmp_path):
    return write_folder(tmp_path / "folder", PROMPTS[:3], lambda i, m: [Image.new("RGB", (64, 64))] * 2)


def test_samples_valid(samples):
    summary = validate("samples", samples, images_per_prompt=2)
    assert summary["tables"] == {"images": 6}


def test_samples_missing_png(samples):
    (samples / "00001/samples/0001.png").unlink()
    check_fails("samples", samples, "expect_column_values_to_be_in_set(format", "00001/samples/0001.png: '<missing>'")


def test_samples_wrong_size_and_mode(samples):
    Image.new("RGB", (32, 64)).save(samples / "00002/samples/0000.png")
    Image.new("L", (64, 64)).save(samples / "00000/samples/0001.png")
    error = check_fails("samples", samples, "expect_column_values_to_be_in_set(width", "00002/samples/0000.png: 32")
    assert "expect_column_values_to_be_in_set(mode" in str(error) and "00000/samples/0001.png: 'L'" in str(error)


def test_samples_extra_image_gap_and_bad_metadata(samples):
    Image.new("RGB", (64, 64)).save(samples / "00000/samples/0002.png")
    (samples / "00002").rename(samples / "00003")
    (samples / "00001/metadata.jsonl").write_text('{"tag": "colors"}\n')
    error = str(check_fails("samples", samples, "expect_column_values_to_be_in_set(expected_name",
                            "00000/samples/0002.png", images_per_prompt=2))
    assert "expect_column_pair_values_to_be_equal(index, expected_index" in error and "00003/samples/0000.png" in error
    assert "expect_column_values_to_be_null(metadata_error" in error and "missing or empty 'prompt'" in error


# --- labels ---------------------------------------------------------------------------


def make_traj(path, **change):
    paths = [{"prompt": m["prompt"], "tag": m["tag"], "metadata": m, "candidate": c, "split": s, "correct": c == 0,
              "reason": ""} for m, s in zip(PROMPTS[:2], ["train", "heldout"]) for c in range(2)]
    prm = [{"path": 0, "step": 2, "correct": True, "rollouts_correct": 1},
           {"path": 2, "step": 2, "correct": False, "rollouts_correct": 0}]
    tokens = torch.arange(64).reshape(4, 16) % 32
    traj = Trajectories(tokens, paths, prm, 4)
    for key, fn in change.items():
        fn(traj)
    traj.save(path)
    return path


def test_labels_valid(tmp_path):
    summary = validate("labels", make_traj(tmp_path / "traj"), vocab_size=32)
    assert summary["tables"] == {"paths": 4, "prm": 2}


@pytest.mark.parametrize("corrupt, expectation, row", [
    (lambda t: t.tokens.__setitem__((1, 3), 40), "expect_column_values_to_be_between(token_max, max_value=31", "path 1: 40"),
    (lambda t: t.paths[2].update(split="train"), "expect_column_values_to_be_between(prompt_splits, max_value=1",
     "path 2: 2"),
    (lambda t: t.paths[3].update(split="test"), "expect_column_values_to_be_in_set(split", "path 3: 'test'"),
    (lambda t: t.paths[1].update(correct="yes"), "expect_column_values_to_be_in_set(correct_type", "path 1: 'str'"),
    (lambda t: t.prm[1].update(path=9), "expect_column_values_to_be_between(path, min_value=0, max_value=3",
     "prm line 2: 9"),
    (lambda t: t.prm[0].update(step=5), "expect_column_values_to_be_between(step, min_value=1, max_value=4",
     "prm line 1: 5"),
    (lambda t: setattr(t, "tokens", t.tokens[:3]), "expect_table_row_count_to_equal(value=3", "observed 4"),
    (lambda t: t.paths[0].update(prompt="a photo of a cat"), "expect_column_pair_values_to_be_equal(prompt",
     "path 0"),
])
def test_labels_corruptions(tmp_path, corrupt, expectation, row):
    check_fails("labels", make_traj(tmp_path / "traj", c=corrupt), expectation, row, vocab_size=32)


def test_labels_vocab_from_tokenizer_config(tmp_path):
    (tmp_path / "data/tokenizer").mkdir(parents=True)
    (tmp_path / "data/tokenizer/config.json").write_text(json.dumps({"codebook_size": 16}))
    check_fails("labels", make_traj(tmp_path / "traj"), "token_max, max_value=15", "path 1: 31", root=tmp_path)


# --- pairs and reflections -----------------------------------------------------------


PAIR = {"prompt": "a photo of a star", "chosen": [1, 2, 3], "rejected": [1, 2, 4], "metadata": PROMPTS[0]}
REFLECTION = {"prompt": "a photo of a star", "wrong_tokens": [5, 5], "reflection": "the star is missing; draw one",
              "right_tokens": [5, 6]}


@pytest.mark.parametrize("kind, good, change, expectation, value", [
    ("pairs", PAIR, {"rejected": [1, 2, 3]}, "expect_column_values_to_be_in_set(chosen_equals_rejected", "True"),
    ("pairs", PAIR, {"chosen": [1, 2, 99]}, "expect_column_values_to_be_between(token_max, max_value=31", "99"),
    ("pairs", PAIR, {"rejected": [-1, 2, 3]}, "expect_column_values_to_be_between(token_min, min_value=0", "-1"),
    ("pairs", PAIR, {"rejected": [1, 2]}, "expect_column_pair_values_to_be_equal(n_chosen, n_rejected", "[3, 2]"),
    ("pairs", PAIR, {"chosen": "1 2 3"}, "expect_column_values_to_be_in_set(chosen_is_tokens", "False"),
    ("pairs", PAIR, {"prompt": DROP}, "expect_column_values_to_be_null(missing_fields", "'prompt'"),
    ("pairs", PAIR, {"prompt": "a photo of a moon"}, "expect_column_pair_values_to_be_equal(prompt, metadata_prompt",
     "a photo of a moon"),
    ("reflections", REFLECTION, {"reflection": " "}, "expect_column_values_to_match_regex(reflection", "' '"),
    ("reflections", REFLECTION, {"right_tokens": [5, 5]},
     "expect_column_values_to_be_in_set(right_tokens_equals_wrong_tokens", "True"),
    ("reflections", REFLECTION, {"wrong_tokens": []}, "expect_column_pair_values_to_be_equal(n_right_tokens", "[2, 0]"),
])
def test_token_kinds(tmp_path, kind, good, change, expectation, value):
    other = {**good, "prompt": "a photo of a red circle", "metadata": PROMPTS[1]} if "metadata" in good else good
    assert validate(kind, jsonl(tmp_path / "ok.jsonl", [good, other]), vocab_size=32)["success"]
    bad = {k: v for k, v in {**good, **change}.items() if v is not DROP}
    error = check_fails(kind, jsonl(tmp_path / "bad.jsonl", [good, bad]), expectation, "line 2",
                        vocab_size=32)
    assert value in str(error)


# --- CLI and stages -------------------------------------------------------------------


def test_cli_validate(tmp_path):
    from cotgen.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["validate", "prompts", str(jsonl(tmp_path / "p.jsonl", PROMPTS))])
    assert ok.exit_code == 0 and json.loads(ok.stdout)["success"], ok.output
    bad = jsonl(tmp_path / "bad.jsonl", [*PROMPTS, PROMPTS[0]])
    result = runner.invoke(app, ["validate", "prompts", str(bad), "--report-dir", str(tmp_path / "r")])
    assert result.exit_code == 1 and "expect_column_values_to_be_unique" in result.output
    assert (tmp_path / "r/prompts.md").is_file()
    assert runner.invoke(app, ["validate", "nope", str(bad)]).exit_code == 2


@pytest.fixture
def tiny():
    return load_params(REPO / "params.yaml", "tiny")


def test_stage_stops_before_writing(tmp_path, tiny, monkeypatch):
    # render_ground_truth: duplicate evaluation prompts; the old renders stay.
    write_metadata(tmp_path / PATHS["eval_prompts"], [*PROMPTS, PROMPTS[1]])
    old = write_folder(tmp_path / PATHS["gt_renders"], PROMPTS[:1], lambda i, m: [Image.new("RGB", (64, 64))])
    with pytest.raises(DataValidationError, match=r"(?s)expect_column_values_to_be_unique\(prompt.*line 5"):
        run_stage("render_ground_truth", tiny, tmp_path)
    assert sorted(p.name for p in old.iterdir()) == ["00000"]
    assert (tmp_path / "reports/validation/prompts.md").is_file()
    # score_ground_truth: a missing image; no results written.
    (old / "00000/samples/0000.png").unlink()
    with pytest.raises(DataValidationError, match="00000/samples/0000.png"):
        run_stage("score_ground_truth", tiny, tmp_path)
    assert not (tmp_path / PATHS["ground_truth_results"]).exists()
    # judge: bad labels; no judge folder.
    make_traj(tmp_path / PATHS["trajectories"], c=lambda t: t.prm[0].update(step=0))
    with pytest.raises(DataValidationError, match="prm line 1"):
        run_stage("judge", tiny, tmp_path)
    assert not (tmp_path / PATHS["judge"]).exists()
    # prompts: freshly built sets that fail are not moved into place.
    before = (tmp_path / PATHS["eval_prompts"]).read_bytes()
    monkeypatch.setattr("cotgen.world.prompts.build_shapes_eval_set", lambda seed, n: [{**PROMPTS[0], "tag": "x"}])
    monkeypatch.setattr("cotgen.world.prompts.build_shapes_train_set", lambda *a, **k: PROMPTS[1:])
    with pytest.raises(DataValidationError, match="eval.jsonl.tmp"):
        run_stage("prompts", tiny, tmp_path)
    assert (tmp_path / PATHS["eval_prompts"]).read_bytes() == before
    assert not (tmp_path / PATHS["train_prompts"]).exists()
    shutil.rmtree(tmp_path / "data/prompts")

"""The model registry: candidates and promotion in the BentoML model store."""

import json

import pytest

from cotgen.pipeline.stages import PATHS, sampling_config
from cotgen.registry import (
    NoPromotedModelError, load_verified, model_metadata, promote, promoted_model, save_candidate,
)
from cotgen.search import SearchConfig


def _candidate(root, params, overall):
    scores = json.loads((root / "metrics/geneval_parm.json").read_text())
    scores = {**scores, "overall": overall}
    return save_candidate(root / PATHS["generator"], root / PATHS["judge"], sampling_config(params, 3),
                          SearchConfig("parm"), scores, root=root)


def test_candidate_promote_and_load(tiny_run):
    root, params, _ = tiny_run
    before = promoted_model()
    tag = _candidate(root, params, 0.5)
    assert tag.name == "cotgen-candidate"
    assert promoted_model() == before  # saving a candidate promotes nothing
    promoted = promote(tag)
    assert promoted.name == "cotgen-verified" and promoted.version == tag.version
    assert promote(tag) == promoted  # idempotent
    verified = load_verified()
    assert verified.tag == str(promoted)
    assert verified.search.strategy == "parm" and verified.sampling.n == 3
    assert verified.info["geneval_overall"] == 0.5 and len(verified.info["dvc_lock_sha256"]) in (4, 64)
    assert verified.generator.grid_size > 0 and verified.judge is not None
    # a newer candidate does not change the promoted model until promoted
    _candidate(root, params, 0.1)
    assert load_verified().tag == str(promoted)


def test_missing_model_errors(tiny_run, tmp_path):
    with pytest.raises(NoPromotedModelError, match="flows/retrain.py"):
        load_verified("cotgen-verified:doesnotexist")
    with pytest.raises(NoPromotedModelError, match="no candidate"):
        promote("cotgen-candidate:doesnotexist")
    root, params, _ = tiny_run
    with pytest.raises(FileNotFoundError, match="judge"):
        save_candidate(root / PATHS["generator"], tmp_path / "judge", sampling_config(params), SearchConfig(), {"overall": 0})


def test_model_metadata_flattens_tags(tmp_path):
    meta = model_metadata(tmp_path, {"overall": 0.25, "tags": {"counting": 0.5}, "image_tokens_per_image": 100.0})
    assert meta["geneval_overall"] == 0.25 and meta["geneval_counting"] == 0.5
    assert meta["dvc_lock_sha256"] == "none" and meta["image_tokens_per_image"] == 100.0

"""The service in the real world (issue 9): ``real.world: coco`` serves Janus + a VLM judge
from ``real:`` instead of the promoted shapes model. Every model is tiny (``source: tiny``:
8x8 codes, 32x32 images, 4 steps of 16 codes); CPU, nothing downloaded.

In process: :class:`cotgen.serve.core.VerifiedService` over
:func:`cotgen.real.config.verified_from_real`. End to end: one ``bentoml serve`` started by
:mod:`cotgen.serve.launch` with a params file selecting coco, over an empty model store.
"""

from __future__ import annotations

import base64
import io
import os

import pytest
import yaml
from PIL import Image

from cotgen.real.config import MissingModelError, RealConfig, check_verified_real, verified_from_real
from cotgen.serve.config import serve_config
from cotgen.serve.core import RequestError, VerifiedService
from tests.test_real_pipeline import CODES, STEP, real_section

N = 3
MAX_N = 4
PROMPT = "a photo of a dog and a purple cat"  # outside GenEval-Shapes' vocabulary: fine for Janus
SERVE = {"max_n": MAX_N, "max_prompt_chars": 2000, "max_upload_bytes": 200_000, "request_timeout": 120}


def coco_params(tmp_path) -> dict:
    """real.world coco, every source tiny, PARM over N = 3 paths with thresholds that cut
    every path but the most promising one at step 1 (see real_section)."""
    return {"real": real_section(tmp_path, n=N), "serve": dict(SERVE)}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    params = coco_params(tmp_path_factory.mktemp("real-service"))
    verified = verified_from_real(RealConfig.from_params(params))
    return VerifiedService(verified, serve_config(params["serve"]))


def _png(b64: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert im.format == "PNG"
    return im


def test_verified_from_real_has_the_real_models_and_search(service):
    from cotgen.real.janus import JanusGenerator
    from cotgen.real.judge import PretrainedVLMJudge

    v = service.verified
    assert isinstance(v.generator, JanusGenerator) and isinstance(v.judge, PretrainedVLMJudge)
    assert v.world == "coco" and v.tag == "coco:tiny+tiny"
    assert v.search.strategy == "parm" and (v.search.clarity_threshold, v.search.potential_threshold) == (0.0, 1.0)
    assert v.sampling.n == N and v.sampling.tokens_per_step == STEP and v.sampling.cfg_scale == 2.0


def test_info_reports_world_sources_and_sizes(service):
    info = service.info()
    assert info["world"] == "coco" and info["tag"] == "coco:tiny+tiny"
    assert info["sources"] == {"generator": {"kind": "janus", "source": "tiny"},
                               "judge": {"kind": "llava_onevision", "source": "tiny"}}
    assert info["strategy"] == "parm" and info["sampling"]["n"] == N
    assert info["image_size"] == 32 and info["judge_image_size"] is None
    assert info["max_prompt_tokens"] == 1024 - CODES  # the tiny Janus's positions, less the image's codes
    assert info["limits"]["max_n"] == MAX_N and "parm" in info["strategies"]


def test_generate_parm_answers_json_with_trace_and_png(service):
    d = service.generate_json(prompt=f"  {PROMPT} ", strategy="parm", n=N, seed=1, return_steps=True)
    assert d["prompt"] == PROMPT and d["strategy"] == "parm" and d["n"] == N and d["seed"] == 1
    assert d["model"] == "coco:tiny+tiny"
    image = _png(d["image_png_base64"])
    assert image.size == (32, 32) and image.mode == "RGB"
    trace = d["trace"]
    assert trace["num_steps"] == CODES // STEP
    assert [c["candidate"] for c in trace["candidates"]] == list(range(N))
    status = sorted(c["status"] for c in trace["candidates"])
    assert status == ["chosen", "cut", "cut"]  # every path clear at step 1, none with potential 1
    chosen = next(c for c in trace["candidates"] if c["status"] == "chosen")
    assert chosen["candidate"] == d["chosen"] and chosen["image_tokens"] == CODES
    assert all(c["cut_at_step"] == 1 and c["image_tokens"] == STEP for c in trace["candidates"] if c["status"] == "cut")
    assert trace["compute"]["image_tokens"] == (N - 1) * STEP + CODES and trace["compute"]["judge_calls"] > 0
    assert d["scores"]["outcome"] == chosen["outcome"] and 0 <= d["scores"]["outcome"] <= 1
    # intermediate images: one per step a candidate lived; the chosen one's last is the answer
    assert [len(s["images_png_base64"]) for s in d["steps"]] == [
        c["cut_at_step"] or trace["num_steps"] for c in trace["candidates"]]
    last = _png(d["steps"][d["chosen"]]["images_png_base64"][-1])
    assert last.tobytes() == image.tobytes()
    # the same request gives the same image; another seed another one
    again = service.generate_json(prompt=PROMPT, strategy="parm", n=N, seed=1)
    assert again["image_png_base64"] == d["image_png_base64"]
    other = service.generate_json(prompt=PROMPT, strategy="parm", n=N, seed=2)
    assert other["image_png_base64"] != d["image_png_base64"]


def test_generate_defaults_are_real_eval_and_real_generator(service):
    d = service.generate_json(prompt=PROMPT, strategy="sample")
    assert d["n"] == 1 and d["cfg_scale"] == 2.0 and d["seed"] == 0 and d["scores"]["outcome"] is None
    d = service.generate_json(prompt=PROMPT)
    assert d["strategy"] == "parm" and d["n"] == N


@pytest.mark.parametrize("request_, named", [
    ({"prompt": "   "}, "prompt is empty"),
    ({"prompt": "x" * 2001}, "2001 characters, at most 2000"),  # serve.max_prompt_chars
    ({"prompt": "a photo of a dog " * 100}, f"at most {1024 - CODES} fit"),  # the generator's positions
    ({"n": 0}, "n must be between 1 and 4"),
    ({"n": MAX_N + 1}, "n must be between 1 and 4"),
    ({"top_k": 65}, "top_k must be between 0 and 64"),  # the tiny Janus's codebook
    ({"strategy": "parm_pp"}, "unknown strategy 'parm_pp'"),
    ({"cfg_scale": -1.0}, "cfg_scale"),
])
def test_bad_generate_requests_name_the_problem(service, request_, named):
    with pytest.raises(RequestError, match=named):
        service.generate_json(**{"prompt": PROMPT, "strategy": "parm", "n": 2, **request_})


@pytest.mark.parametrize("size", [(32, 32), (17, 61), (300, 200)])
def test_score_takes_an_image_of_any_size(service, size):
    image = Image.new("RGB", size, (200, 30, 30))
    image.paste((20, 20, 220), (0, 0, size[0] // 2, size[1] // 2))
    out = service.score(PROMPT, image)
    assert out["prompt"] == PROMPT and out["model"] == "coco:tiny+tiny" and 0 <= out["outcome"] <= 1
    with pytest.raises(RequestError, match="at most"):
        service.score("a photo of a dog " * 100, image)


def test_score_agrees_with_the_search(service):
    d = service.generate_json(prompt=PROMPT, strategy="best_of_n", n=2, seed=4)
    assert service.score(PROMPT, _png(d["image_png_base64"]).convert("RGB"))["outcome"] == pytest.approx(
        d["scores"]["outcome"], abs=1e-4)


def test_start_up_check_fails_fast_naming_what_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    real = real_section(tmp_path)
    check_verified_real(RealConfig.from_params({"real": real}))  # tiny: nothing to find
    missing = {**real, "models_dir": str(tmp_path / "models"),
               "judge": {"kind": "llava_onevision", "source": "cotgen-tests/no-such-judge"}}
    with pytest.raises(MissingModelError, match="huggingface-cli download cotgen-tests/no-such-judge"):
        check_verified_real(RealConfig.from_params({"real": missing}))
    with pytest.raises(MissingModelError, match="does not exist"):
        check_verified_real(RealConfig.from_params({"real": {**real, "generator": {"source": str(tmp_path / "gone")}}}))
    with pytest.raises(ValueError, match="real.world: coco"):
        check_verified_real(RealConfig.from_params({"real": {**real, "world": "shapes"}}))
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            check_verified_real(RealConfig.from_params({"real": {**real, "device": "cuda"}}))


def test_bentoml_serve_coco_world_without_a_promoted_model(tmp_path):
    """`bentoml serve` with params selecting coco (tiny sources) over an empty model store
    starts, and /generate answers 200 with a PNG."""
    import httpx

    from cotgen.serve.launch import serving

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(coco_params(tmp_path)))
    env = {**os.environ, "COTGEN_PARAMS": str(tmp_path / "params.yaml"), "BENTOML_HOME": str(tmp_path / "empty-store")}
    with serving(env, tmp_path / "server.log", timeout=240) as server:
        url = server.url
        r = httpx.post(f"{url}/generate", json={"prompt": PROMPT, "strategy": "parm", "n": N, "seed": 1}, timeout=120)
        assert r.status_code == 200, r.text
        d = r.json()
        assert d["model"] == "coco:tiny+tiny" and d["strategy"] == "parm" and len(d["trace"]["candidates"]) == N
        assert _png(d["image_png_base64"]).size == (32, 32)
        info = httpx.post(f"{url}/info", json={}, timeout=30).json()
        assert info["world"] == "coco" and info["sources"]["generator"]["source"] == "tiny"
        bad = httpx.post(f"{url}/generate", json={"prompt": PROMPT, "top_k": 65}, timeout=30)
        assert bad.status_code == 400 and "top_k" in bad.text

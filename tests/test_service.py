"""The BentoML service (issue 6): `bentoml serve` as a subprocess on a free loopback port,
talked to with BentoML's HTTP client and plain httpx; a bounded schemathesis run.

One server for the module, against a tiny verified generator promoted into the test
session's throw-away BentoML store (tests/conftest.py); its limits come from a small
``serve:`` section (``COTGEN_PARAMS``) so that fuzzing stays cheap.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from cotgen.serve.launch import free_port, serving, start_server, stop_server
from tests.conftest import REPO

MAX_N = 4
PROMPT = "a photo of a red circle"
SERVE_PARAMS = {"serve": {"max_n": MAX_N, "max_prompt_chars": 120, "max_cfg_scale": 10.0,
                          "max_upload_bytes": 200_000, "request_timeout": 60, "max_concurrency": 16}}


@pytest.fixture(scope="module")
def promoted(tiny_run, tmp_path_factory):
    """A tiny verified generator (parm, N=3) with PARM++'s parts (a reflective judge and a
    self-correction generator, untrained heads), promoted: ``cotgen-verified:latest``."""
    from cotgen.generator.model import ShapesGenerator
    from cotgen.pipeline.stages import PATHS, sampling_config
    from cotgen.reflect.corrector import corrector_from_generator
    from cotgen.reflect.judge import ReflectiveJudge, reflector_from_judge
    from cotgen.registry import promote, save_candidate
    from cotgen.reward.object_judge import ObjectJudge
    from cotgen.search import SearchConfig

    root, params, _ = tiny_run
    parts = tmp_path_factory.mktemp("parm_pp")
    judge = ObjectJudge.from_pretrained(root / PATHS["judge"])
    ReflectiveJudge(judge, reflector_from_judge(judge)).save_pretrained(parts / "judge")
    corrector_from_generator(ShapesGenerator.from_pretrained(root / PATHS["generator"])).save_pretrained(
        parts / "corrector")
    scores = json.loads((root / "metrics/geneval_parm.json").read_text())
    tag = save_candidate(root / PATHS["generator"], parts / "judge", sampling_config(params, 3),
                         SearchConfig("parm", max_rounds=2, accept_threshold=1.0), scores, root=root,
                         corrector_dir=parts / "corrector")
    return str(promote(tag))


@pytest.fixture(scope="module")
def server(promoted, tmp_path_factory):
    """Base URL of `bentoml serve` running the promoted model on a free loopback port."""
    import yaml

    tmp = tmp_path_factory.mktemp("serve")
    (tmp / "params.yaml").write_text(yaml.safe_dump(SERVE_PARAMS))
    env = {**os.environ, "COTGEN_PARAMS": str(tmp / "params.yaml")}
    with serving(env, tmp / "server.log", timeout=180) as s:
        yield s.url


@pytest.fixture(scope="module")
def client(server):
    import bentoml

    with bentoml.SyncHTTPClient(server, server_ready_timeout=30, timeout=60) as c:
        yield c


def _png(b64: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert im.format == "PNG"
    return im


def _post(url: str, path: str, timeout: float = 60, **kwargs) -> httpx.Response:
    return httpx.post(f"{url}{path}", timeout=timeout, **kwargs)


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# -- endpoints ---------------------------------------------------------------------------


def test_health_metrics_openapi(server):
    for path in ("/healthz", "/livez", "/readyz"):
        assert httpx.get(server + path, timeout=10).status_code == 200, path
    spec = httpx.get(server + "/docs.json", timeout=10).json()
    assert {"/generate", "/generate_image", "/judge", "/info"} <= set(spec["paths"])
    strategy = spec["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "parm" in json.dumps(strategy)
    _post(server, "/info", json={})
    metrics = httpx.get(server + "/metrics", timeout=10)
    assert metrics.status_code == 200 and "request_total" in metrics.text


def test_info(client, promoted):
    info = client.info()
    assert info["tag"] == promoted and info["strategy"] == "parm" and info["sampling"]["n"] == 3
    assert "geneval_overall" in info["metadata"] and "git_revision" in info["metadata"]
    assert info["limits"]["max_n"] == MAX_N and info["image_size"] == 64
    assert set(info["strategies"]) == {"sample", "best_of_n", "prm", "parm", "parm_pp"}


def test_generate_parm_trace_and_steps(client, promoted):
    r = client.generate(prompt=PROMPT, strategy="parm", n=MAX_N, seed=3, return_steps=True)
    assert r["model"] == promoted and r["strategy"] == "parm" and r["n"] == MAX_N and r["seed"] == 3
    assert _png(r["image_png_base64"]).size == (64, 64)
    trace = r["trace"]
    assert [c["candidate"] for c in trace["candidates"]] == list(range(MAX_N))
    chosen = [c for c in trace["candidates"] if c["status"] == "chosen"]
    assert len(chosen) == 1 and chosen[0]["candidate"] == r["chosen"]
    assert r["scores"]["outcome"] == chosen[0]["outcome"] and 0 <= r["scores"]["outcome"] <= 1
    compute = trace["compute"]
    assert compute["image_tokens"] == sum(c["image_tokens"] for c in trace["candidates"]) > 0
    assert compute["forward_passes"] > 0 and compute["judge_calls"] > 0 and compute["seconds"] > 0
    for c in trace["candidates"]:
        assert (c["status"] == "cut") == (c["cut_at_step"] is not None)
        assert c["clarity_calls"] >= 1  # parm asks every path about clarity at least once
    # intermediate images: one per step each candidate lived
    assert [s["candidate"] for s in r["steps"]] == list(range(MAX_N))
    for s, c in zip(r["steps"], trace["candidates"]):
        lived = c["cut_at_step"] if c["cut_at_step"] is not None else trace["num_steps"]
        assert len(s["images_png_base64"]) == lived
        assert _png(s["images_png_base64"][-1]).size == (64, 64)
    final = r["steps"][r["chosen"]]["images_png_base64"][-1]
    assert _png(final).tobytes() == _png(r["image_png_base64"]).tobytes()


@pytest.mark.parametrize("strategy", ["sample", "best_of_n", "prm"])
def test_generate_other_strategies(server, strategy):
    body = {"prompt": PROMPT, "strategy": strategy, "n": 2, "seed": 1, "cfg_scale": 1.0}
    r = _post(server, "/generate", json=body)
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["strategy"] == strategy and d["cfg_scale"] == 1.0 and d["steps"] == []
    if strategy == "sample":
        assert d["n"] == 1 and d["scores"]["outcome"] is None and d["trace"]["compute"]["judge_calls"] == 0
    else:
        assert d["n"] == 2 and d["scores"]["outcome"] is not None
    if strategy == "prm":
        assert all(c["step_scores"] for c in d["trace"]["candidates"])
    # same request, same image
    again = _post(server, "/generate", json=body).json()
    assert again["image_png_base64"] == d["image_png_base64"]


def test_generate_parm_pp_rounds(server):
    """PARM++: the judge rejects every round (accept threshold 1.0), so both rounds run; the
    second is conditioned on the first's reflection."""
    body = {"prompt": PROMPT, "strategy": "parm_pp", "n": 2, "seed": 3}
    r = _post(server, "/generate", json=body)
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["strategy"] == "parm_pp" and [rd["round"] for rd in d["rounds"]] == [1, 2]
    first, second = d["rounds"]
    assert first["reflection"] and second["condition_reflection"] == first["reflection"]
    assert first["condition_reflection"] is None and not first["accepted"]
    assert _png(first["image_png_base64"]).size == (64, 64)
    assert second["image_png_base64"] == d["image_png_base64"] and second["chosen"] == d["chosen"]
    assert second["returned"] and not first["returned"]  # final_round "last"
    assert d["trace"]["compute"]["image_tokens"] == first["image_tokens"] + second["image_tokens"]
    assert len(d["trace"]["candidates"]) == 2  # the returned round's
    assert _post(server, "/generate", json=body).json()["image_png_base64"] == d["image_png_base64"]
    # a prompt the generator takes but the reflection cannot parse: 400 before any search
    r = _post(server, "/generate", json={**body, "prompt": "a photo of a green triangle left of a yellow cross"})
    assert r.status_code == 400 and "GenEval-style prompts only" in r.text
    ok = _post(server, "/generate", json={**body, "strategy": "parm", "prompt": "a photo of a green triangle left of a yellow cross"})
    assert ok.status_code == 200, ok.text


def test_parm_pp_final_round_best_in_process(promoted):
    """With final_round "best" the answer is the highest-scored round (every round is
    rejected here: accept threshold 1.0); exactly that round is marked, and the trace's
    candidates are its paths."""
    from dataclasses import replace

    from cotgen.registry import load_verified
    from cotgen.serve.config import serve_config
    from cotgen.serve.core import VerifiedService

    verified = load_verified(promoted)
    verified.search = replace(verified.search, final_round="best")
    service = VerifiedService(verified, serve_config(SERVE_PARAMS["serve"]))
    earlier = []
    for seed in (0, 1):
        d = service.generate_json(prompt=PROMPT, strategy="parm_pp", n=2, seed=seed)
        outcomes = [rd["outcome"] for rd in d["rounds"]]
        returned = [rd for rd in d["rounds"] if rd["returned"]]
        assert len(d["rounds"]) == 2 and len(returned) == 1
        assert returned[0]["round"] == 1 + outcomes.index(max(outcomes))
        assert returned[0]["image_png_base64"] == d["image_png_base64"] and returned[0]["chosen"] == d["chosen"]
        assert d["trace"]["compute"]["returned_round"] == returned[0]["round"]
        assert [c["candidate"] for c in d["trace"]["candidates"] if c["status"] == "chosen"] == [d["chosen"]]
        earlier.append(returned[0]["round"] < len(d["rounds"]))
    assert any(earlier)  # "last" would have answered differently here


def test_parm_pp_needs_the_self_correction_generator(tiny_run):
    """A model without PARM++'s parts serves every strategy but parm_pp, and says why."""
    from cotgen.pipeline.stages import PATHS, sampling_config
    from cotgen.registry import load_verified, save_candidate
    from cotgen.search import SearchConfig
    from cotgen.serve.config import serve_config
    from cotgen.serve.core import RequestError, VerifiedService

    root, params, _ = tiny_run
    scores = json.loads((root / "metrics/geneval_parm.json").read_text())
    tag = save_candidate(root / PATHS["generator"], root / PATHS["judge"], sampling_config(params, 2),
                         SearchConfig("parm"), scores, root=root)
    service = VerifiedService(load_verified(str(tag)), serve_config(SERVE_PARAMS["serve"]))
    assert service.strategies == ("sample", "best_of_n", "prm", "parm")
    with pytest.raises(RequestError, match="self-correction generator"):
        service.generate(PROMPT, strategy="parm_pp")


def test_generate_defaults_are_the_promoted_ones(server):
    d = _post(server, "/generate", json={"prompt": "  A photo of a  red circle "}).json()
    assert d["prompt"] == "A photo of a red circle"  # whitespace collapsed (the tokenizer lower-cases)
    assert d["strategy"] == "parm" and d["n"] == 3 and d["seed"] == 0


def test_generate_image_png(client, server):
    image = client.generate_image(prompt=PROMPT, strategy="best_of_n", n=2, seed=5)
    assert image.size == (64, 64)
    r = _post(server, "/generate_image", json={"prompt": PROMPT, "strategy": "best_of_n", "n": 2, "seed": 5})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-cotgen-chosen"].isdigit() and 0 <= float(r.headers["x-cotgen-score"]) <= 1
    as_json = _post(server, "/generate", json={"prompt": PROMPT, "strategy": "best_of_n", "n": 2, "seed": 5}).json()
    assert Image.open(io.BytesIO(r.content)).tobytes() == _png(as_json["image_png_base64"]).tobytes()


def test_judge_scores_like_the_search(client, server, tmp_path):
    d = _post(server, "/generate", json={"prompt": PROMPT, "strategy": "best_of_n", "n": 2, "seed": 7}).json()
    path = tmp_path / "chosen.png"
    path.write_bytes(base64.b64decode(d["image_png_base64"]))
    j = client.judge(prompt=PROMPT, image=path)
    assert j["outcome"] == pytest.approx(d["scores"]["outcome"], abs=1e-5)
    r = _post(server, "/judge", data={"prompt": PROMPT}, files={"image": ("x.png", path.read_bytes(), "image/png")})
    assert r.status_code == 200 and r.json()["outcome"] == pytest.approx(j["outcome"])


# -- bad input ---------------------------------------------------------------------------

GOOD = {"prompt": PROMPT, "strategy": "sample", "n": 1}
BAD_GENERATE = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt is empty"),
    ({"prompt": "a photo of a dog and a purplish cat"}, "'dog', 'purplish', 'cat'"),
    ({"prompt": "a photo of a red circle " * 5}, "at most"),
    ({"prompt": "a " * 70}, "prompt"),  # over max_prompt_chars
    ({"n": MAX_N + 1}, "n"),
    ({"n": 0}, "n"),
    ({"n": "many"}, "n"),
    ({"strategy": "beam"}, "strategy"),
    ({"cfg_scale": -1}, "cfg_scale"),
    ({"cfg_scale": 1e6}, "cfg_scale"),
    ({"temperature": 0}, "temperature"),
    ({"seed": -1}, "seed"),
]


@pytest.mark.parametrize("endpoint", ["/generate", "/generate_image"])
@pytest.mark.parametrize("override,named", BAD_GENERATE, ids=[str(i) for i in range(len(BAD_GENERATE))])
def test_bad_generate_requests_are_4xx_naming_the_problem(server, endpoint, override, named):
    r = _post(server, endpoint, json={**GOOD, **override})
    assert 400 <= r.status_code < 500, r.text
    assert named in r.text, r.text


def test_bad_requests_without_json(server):
    r = _post(server, "/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500
    r = _post(server, "/generate", json={"strategy": "sample"})  # no prompt
    assert r.status_code == 400 and "prompt" in r.text


def test_bad_uploads_are_4xx_naming_the_problem(server, client, tmp_path):
    import bentoml

    def judge(content: bytes, prompt=PROMPT, name="x.png", ctype="image/png"):
        return _post(server, "/judge", data={"prompt": prompt}, files={"image": (name, content, ctype)})

    r = judge(b"hello, I am text", name="x.txt", ctype="text/plain")
    assert r.status_code == 400 and "not an image" in r.text
    r = judge(b"")
    assert r.status_code == 400 and "empty" in r.text
    r = judge(_png_bytes(Image.new("RGB", (32, 48))))
    assert r.status_code == 400 and "64x64" in r.text
    r = judge(_png_bytes(Image.new("RGB", (64, 64))), prompt="a photo of a unicorn")
    assert r.status_code == 400 and "'unicorn'" in r.text
    r = judge(b"\x89PNG" + b"\0" * (SERVE_PARAMS["serve"]["max_upload_bytes"] + 100_000))
    assert r.status_code == 413
    r = _post(server, "/judge", data={"prompt": PROMPT})  # no file
    assert r.status_code == 400 and "image" in r.text
    r = _post(server, "/judge", content=b"--x\r\n[garbage", headers={"content-type": "multipart/form-data"})
    assert r.status_code == 400 and "multipart" in r.text
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    with pytest.raises(bentoml.exceptions.BentoMLException, match="not an image") as e:
        client.judge(prompt=PROMPT, image=bad)
    assert e.value.error_code == 400
    with pytest.raises(bentoml.exceptions.BentoMLException, match="'dog'"):
        client.generate(prompt="a photo of a dog")
    # nothing above hurt the worker
    assert httpx.get(server + "/readyz", timeout=10).status_code == 200
    assert _post(server, "/generate", json=GOOD).status_code == 200


# -- load ----------------------------------------------------------------------------------


def test_concurrent_requests(server):
    bodies = [{"prompt": p, "strategy": s, "n": 2, "seed": i % 4}
              for i, (p, s) in enumerate([(PROMPT, "parm"), ("a photo of two blue squares", "sample"),
                                          ("a photo of a star", "best_of_n"), (PROMPT, "sample")] * 2)]
    alone = [_post(server, "/generate", json=b).json()["image_png_base64"] for b in bodies[:4]]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda b: _post(server, "/generate", json=b, timeout=120), bodies))
        health = httpx.get(server + "/healthz", timeout=5)  # the event loop is not blocked
    assert health.status_code == 200
    assert [r.status_code for r in responses] == [200] * 8
    # a request answers the same inside a crowd as alone
    assert [r.json()["image_png_base64"] for r in responses] == alone * 2
    assert sum(r.json()["trace"]["compute"]["queue_seconds"] for r in responses) > 0


# -- start-up without a model ----------------------------------------------------------------


def test_startup_without_promoted_model_says_how_to_make_one(tmp_path):
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "empty-store")}
    log = tmp_path / "server.log"
    proc = start_server(env, free_port(), log)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        stop_server(proc)
        pytest.fail(f"bentoml serve kept running without a promoted model:\n{log.read_text()[-3000:]}")
    out = log.read_text()
    assert proc.returncode != 0
    assert "NoPromotedModelError" in out and "cotgen-verified:latest" in out and "flows/retrain.py" in out


# -- fuzzing -------------------------------------------------------------------------------


def _schemathesis(url: str, cwd: Path, *args: str) -> None:
    st = shutil.which("st", path=str(Path(sys.executable).parent)) or "st"
    cmd = [st, "run", f"{url}/docs.json", "--checks", "not_a_server_error", "--seed", "1", "--workers", "1",
           "--generation-database", "none", "--no-color", "--request-timeout", "60", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=cwd)  # its state files go there
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]


def test_schemathesis_finds_no_server_error(server, tmp_path):
    # cheap operations: every phase, 30 examples each
    _schemathesis(server, tmp_path, "--exclude-path-regex", "^/generate", "--max-examples", "30")
    # generation: every valid request runs a search, so fuzz with fewer examples and
    # walk the schema's boundaries with invalid values only
    _schemathesis(server, tmp_path, "--include-path-regex", "^/generate", "--phases", "examples,fuzzing",
                  "--max-examples", "15")
    _schemathesis(server, tmp_path, "--include-path-regex", "^/generate", "--phases", "coverage", "--mode", "negative")


# -- the Bento ---------------------------------------------------------------------------------


def test_bentoml_build_packs_the_promoted_model(promoted):
    """`bentoml build` (what the `package` stage calls) makes a Bento of bentofile.yaml with
    the promoted model, the cotgen package and params.yaml, into the test store."""
    import yaml

    out = subprocess.run([sys.executable, "-m", "bentoml", "build", "--output", "tag"], cwd=REPO, env=dict(os.environ),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    tag = out.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    name, version = tag.split(":")
    bento = Path(os.environ["BENTOML_HOME"]) / "bentos" / name / version
    info = yaml.safe_load((bento / "bento.yaml").read_text())
    from cotgen.registry import promoted_model

    assert [m["tag"] for m in info["models"]] == [str(promoted_model().tag)]
    assert info["service"] == "cotgen.serve.service:Cotgen"
    assert (bento / "src/cotgen/serve/service.py").is_file() and (bento / "src/params.yaml").is_file()
    assert not (bento / "src/data").exists() and not (bento / "src/.venv").exists()
    requirements = (bento / "env/python/requirements.txt").read_text()
    assert "torch==2.13.0" in requirements and "download.pytorch.org/whl/cpu" in requirements

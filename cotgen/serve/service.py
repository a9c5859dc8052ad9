"""The verified generator as a BentoML service (issue 6; DESIGN section 4).

Run it with ``bentoml serve`` in the repository root (``bentofile.yaml`` names
``cotgen.serve.service:Cotgen``). What it serves depends on ``real.world`` in the params
file it reads (``$COTGEN_PARAMS``, else ``./params.yaml``; :mod:`cotgen.serve.config`):

- ``shapes`` (the default): the promoted model, ``cotgen-verified:latest``, from the
  BentoML model store; with none promoted it stops at start-up with
  :class:`cotgen.registry.NoPromotedModelError`, which says how to make one.
- ``coco``: the real models of ``real:`` (Janus-Pro and a LLaVA-OneVision / Qwen2-VL judge,
  :func:`cotgen.real.config.verified_from_real`): sampling knobs from ``real.generator``,
  a PARM search with ``real.eval``'s ``n``, seed and thresholds; ``device`` and ``dtype``
  from ``real:``. No promoted model is needed; a model that cannot be found stops it at
  start-up with :class:`cotgen.real.config.MissingModelError` naming what to fetch.
  ``source: tiny`` serves tiny random models (tests, smoke runs).

Endpoints (all POST with a JSON body, except ``judge``, which takes multipart form data):

- ``/generate``: ``prompt``, ``strategy`` (``sample``, ``best_of_n``, ``prm``, ``parm``, and
  ``parm_pp`` when the promoted model carries PARM++'s self-correction generator:
  ``dvc repro reflect/dvc.yaml``; default: the served model's), ``n``, ``seed``,
  ``cfg_scale``, ``temperature``, ``top_k`` (defaults: the served model's),
  ``return_steps``. Answers JSON: the chosen image as a base64 PNG, its scores, the trace
  (every candidate: the step at which it became clear, its potential, where it was cut,
  its outcome score, its tokens and forward passes; the compute spent: image tokens,
  forward passes, judge calls, seconds), with ``return_steps`` every candidate's
  intermediate images, and for ``parm_pp`` every round (image, score, reflection).
- ``/generate_image``: the same request, answers the chosen image as ``image/png``
  (headers ``X-Cotgen-Chosen``, ``X-Cotgen-Score``, ``X-Cotgen-Model``).
- ``/judge``: ``prompt`` and an uploaded image file; answers the reward model's outcome
  P(yes) (shapes: a 64x64 image; coco: any size, the VLM's processor resizes it).
- ``/info``: the world, the models' sources, the tag, its strategy and sampling settings,
  its metadata (GenEval scores of a promoted model), the image sizes and the service's
  limits.
- BentoML's own: ``/healthz``, ``/livez``, ``/readyz``, ``/metrics`` (Prometheus),
  ``/docs.json`` (OpenAPI) and ``/`` (Swagger UI).

Bad input gets a 400 that names the problem (pydantic's checks of the schema, then
:class:`cotgen.serve.core.RequestError` as ``bentoml.exceptions.InvalidArgument``).
Requests are computed in BentoML's worker threads (``serve.threads``, default 1) behind a
lock, never on the event loop. Limits come from ``params.yaml``'s ``serve:`` section
(:mod:`cotgen.serve.config`).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Annotated, Literal, Optional

import bentoml
from bentoml.exceptions import InvalidArgument
from PIL import Image
from pydantic import BaseModel, Field

from cotgen.real.config import RealConfig
from cotgen.registry import PROMOTED_MODEL, NoPromotedModelError
from cotgen.search import STRATEGIES
from cotgen.serve.config import read_params, serve_config
from cotgen.serve.core import RequestError, VerifiedService, decode_upload
from cotgen.serve.guard import RequestGuard

logger = logging.getLogger("cotgen.serve")

PARAMS = read_params()
CONFIG = serve_config(PARAMS.get("serve"))
#: the world it serves: ``real.world`` (shapes: the promoted model; coco: the real models of ``real:``)
REAL = RealConfig.from_params(PARAMS)

#: Every strategy cotgen.search knows (a new one, e.g. parm_pp, appears here by itself).
Strategy = Literal[tuple(STRATEGIES)]  # type: ignore[valid-type]

Prompt = Annotated[str, Field(min_length=1, max_length=CONFIG.max_prompt_chars,
                              description="a GenEval prompt, e.g. 'a photo of a red circle' (shapes world: "
                                          "GenEval-Shapes words only)",
                              examples=["a photo of a red circle"])]
N = Annotated[Optional[int], Field(ge=1, le=CONFIG.max_n, description="candidate paths (default: the served N)")]
Seed = Annotated[Optional[int], Field(ge=0, le=2**63 - 1, description="base seed (default: the served one)")]
CfgScale = Annotated[Optional[float], Field(ge=0, le=CONFIG.max_cfg_scale, allow_inf_nan=False,
                                            description="CFG scale, 0 = no guidance (default: the served one)")]
# ge, not gt: pydantic writes gt as a number-valued exclusiveMinimum, which OpenAPI 3.0 forbids
Temperature = Annotated[Optional[float], Field(ge=1e-3, le=10, allow_inf_nan=False)]
TopK = Annotated[Optional[int], Field(ge=0, le=1_000_000)]


class PathInfo(BaseModel):
    candidate: int
    status: Literal["chosen", "finished", "cut"]
    clear_step: Optional[int] = Field(None, description="step (1-based) at which it was first judged clear")
    potential: Optional[float] = Field(None, description="P(yes) of the potential question at clear_step")
    cut_at_step: Optional[int] = Field(None, description="steps completed when it was cut")
    outcome: Optional[float] = Field(None, description="P(yes) of the outcome question on its final image")
    step_scores: list[float] = []
    clarity_calls: int = 0
    image_tokens: int = 0
    forward_passes: int = 0


class Compute(BaseModel):
    image_tokens: int
    forward_passes: int
    judge_calls: int
    seconds: float = Field(description="search wall time")
    queue_seconds: float = Field(0.0, description="time waited for the model")


class Trace(BaseModel):
    num_steps: int
    candidates: list[PathInfo]
    compute: Compute


class Scores(BaseModel):
    outcome: Optional[float] = Field(None, description="judge's P(yes) that the image matches the prompt")
    potential: Optional[float] = None
    clear_step: Optional[int] = None


class StepImages(BaseModel):
    candidate: int
    images_png_base64: list[str]


class Round(BaseModel):
    round: int = Field(description="1-based generation round of parm_pp")
    image_png_base64: str = Field(description="the round's chosen image, PNG, base64")
    outcome: Optional[float] = Field(None, description="judge's P(yes) for the round's image")
    accepted: bool = Field(description="outcome >= the accept threshold (a rejected round gets a reflection)")
    reflection: Optional[str] = Field(None, description="what the judge says is wrong (rejected rounds)")
    condition_reflection: Optional[str] = Field(None, description="the reflection this round was generated from")
    chosen: int
    image_tokens: int
    returned: bool = Field(False, description="this round's image is the answer's image (the last round, or with "
                           "final_round 'best' the highest-scored one when none was accepted)")


class GenerateResponse(BaseModel):
    prompt: str
    strategy: str
    n: int
    seed: int
    cfg_scale: float
    temperature: float
    top_k: int
    model: str
    image_png_base64: str = Field(description="the chosen image, PNG, base64")
    chosen: int
    scores: Scores
    trace: Trace
    # a list, never null: BentoML's schema drops the null of Optional[list] and its client
    # then fails to decode a null
    steps: list[StepImages] = Field(default_factory=list, description="per candidate, its image after each "
                                    "step it lived (only with return_steps)")
    rounds: list[Round] = Field(default_factory=list, description="parm_pp only: every round's image, score "
                                "and reflection (the trace's candidates are the returned round's)")


class JudgeResponse(BaseModel):
    prompt: str
    outcome: float = Field(description="P(yes) that the image matches the prompt")
    model: str


def _promoted():
    """The promoted ``bentoml.Model``; NoPromotedModelError saying how to make one if none.

    Looked up here rather than as a class-level ``bentoml.models.BentoModel``: BentoML would
    then fail before start-up with "No cloud context" instead of saying what to do."""
    from cotgen.registry import promoted_model

    stored = promoted_model()
    if stored is None:
        raise NoPromotedModelError(
            f"no promoted model {PROMOTED_MODEL}:latest in the BentoML model store "
            f"(BENTOML_HOME={os.environ.get('BENTOML_HOME', '~/bentoml')}); make one with `dvc repro` "
            "(stage `package`) or `python flows/retrain.py`, which train, evaluate, gate and promote; "
            "`bentoml models list` shows what the store holds"
        )
    return stored


def _check_models() -> None:
    """Fail fast, loading nothing: coco: :func:`cotgen.real.config.check_verified_real`
    (MissingModelError naming what to fetch); shapes: :func:`_promoted`."""
    if REAL.is_real:
        from cotgen.real.config import check_verified_real

        check_verified_real(REAL)
    else:
        _promoted()


def _load_verified():
    """The verified generator to serve: the real models of ``real:`` (coco) or the promoted one."""
    if REAL.is_real:
        from cotgen.real.config import verified_from_real

        return verified_from_real(REAL)
    from cotgen.registry import load_verified

    return load_verified(str(_promoted().tag))


def _bad(e: Exception) -> InvalidArgument:
    return InvalidArgument(str(e))


@bentoml.service(
    name="cotgen",
    description="cotgen: a verified generator (the promoted GenEval-Shapes model, or Janus-Pro with a VLM judge "
                "when params real.world is coco) with its reward model and test-time search.",
    workers=CONFIG.workers,
    threads=CONFIG.threads,
    traffic={"timeout": CONFIG.request_timeout, "max_concurrency": CONFIG.max_concurrency,
             "concurrency": CONFIG.threads},
    http={"host": CONFIG.host, "port": CONFIG.port},
    resources={"cpu": str(CONFIG.torch_threads)},
)
class Cotgen:
    """The verified generator of ``real.world``: ``generate``, ``generate_image``, ``judge``, ``info``."""

    @bentoml.on_deployment
    def check_models() -> None:
        """Runs once in the server's main process before any worker starts: with nothing
        promoted (shapes) or a real model that cannot be found (coco), ``bentoml serve``
        stops at once with the message (workers that fail at start-up would be restarted
        forever)."""
        _check_models()

    def __init__(self) -> None:
        import torch

        torch.set_num_threads(CONFIG.torch_threads)
        t0 = time.perf_counter()
        verified = _load_verified()
        self.service = VerifiedService(verified, CONFIG)
        logger.info("cotgen: loaded %s (%s world) in %.1f s", verified.tag, verified.world, time.perf_counter() - t0)

    @bentoml.api
    def generate(
        self,
        prompt: Prompt,
        strategy: Optional[Strategy] = None,
        n: N = None,
        seed: Seed = None,
        cfg_scale: CfgScale = None,
        temperature: Temperature = None,
        top_k: TopK = None,
        return_steps: bool = False,
    ) -> GenerateResponse:
        """Generate an image with test-time verification; the chosen image (base64 PNG),
        its scores and the trace of every candidate path."""
        try:
            return GenerateResponse(**self.service.generate_json(
                prompt=prompt, strategy=strategy, n=n, seed=seed, cfg_scale=cfg_scale, temperature=temperature,
                top_k=top_k, return_steps=return_steps))
        except RequestError as e:
            raise _bad(e) from None

    @bentoml.api
    def generate_image(
        self,
        ctx: bentoml.Context,
        prompt: Prompt,
        strategy: Optional[Strategy] = None,
        n: N = None,
        seed: Seed = None,
        cfg_scale: CfgScale = None,
        temperature: Temperature = None,
        top_k: TopK = None,
    ) -> Image.Image:
        """The chosen image only, as a PNG."""
        try:
            result, _, _, _ = self.service.generate(prompt=prompt, strategy=strategy, n=n, seed=seed,
                                                    cfg_scale=cfg_scale, temperature=temperature, top_k=top_k)
        except RequestError as e:
            raise _bad(e) from None
        ctx.response.metadata["X-Cotgen-Chosen"] = str(result.chosen)
        ctx.response.metadata["X-Cotgen-Score"] = "" if result.score is None else f"{result.score:.6f}"
        ctx.response.metadata["X-Cotgen-Model"] = self.service.verified.tag
        image = result.image.copy()
        image.format = "PNG"
        return image

    @bentoml.api
    def judge(
        self,
        prompt: Prompt,
        image: Path,
    ) -> JudgeResponse:
        """The reward model's outcome score P(yes) for (prompt, uploaded image)."""
        try:
            pil = decode_upload(Path(image).read_bytes(), CONFIG.max_upload_bytes)
            return JudgeResponse(**self.service.score(prompt, pil))
        except RequestError as e:
            raise _bad(e) from None

    @bentoml.api
    async def info(self) -> dict:
        """The world, model sources and tag, strategy, sampling settings, metadata, and the limits."""
        return self.service.info()


# bounded request bodies; malformed multipart bodies get a 400, not BentoML's 500
Cotgen.add_asgi_middleware(RequestGuard, max_body_bytes=CONFIG.max_upload_bytes + 64 * 1024)

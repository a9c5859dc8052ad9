"""What the service does, without HTTP: check a request, run the search, shape the answer.

:class:`VerifiedService` wraps a loaded :class:`cotgen.registry.VerifiedGenerator` of
either world: the promoted shapes model (:func:`cotgen.registry.load_verified`) or the
real models (:func:`cotgen.real.config.verified_from_real`). It asks the generator and
judge what they accept (``check_prompt``, ``max_prompt_tokens``, ``codebook_size``,
``image_size``; ``required_image_size``) instead of knowing either world. Its methods
raise :class:`RequestError` (a ``ValueError``) for anything wrong with a request, with a
message that names the problem; the BentoML service turns that into a 400. Everything
else is a bug.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from dataclasses import asdict, replace

from PIL import Image, UnidentifiedImageError

from cotgen.serve.config import ServeConfig


class RequestError(ValueError):
    """A bad request; the message names the problem."""


def png_base64(image: Image.Image) -> str:
    """``image`` as a base64 PNG (ASCII)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_upload(data: bytes, max_bytes: int, what: str = "image") -> Image.Image:
    """An uploaded file as an RGB PIL image.

    Raises:
        RequestError: empty, too large, or not an image PIL can read (named).
    """
    if not data:
        raise RequestError(f"the uploaded {what} is empty")
    if len(data) > max_bytes:
        raise RequestError(f"the uploaded {what} has {len(data)} bytes, at most {max_bytes} are accepted")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        head = data[:16]
        raise RequestError(
            f"the uploaded {what} is not an image PIL can read (PNG, JPEG, ...): {type(e).__name__}; "
            f"it starts with {head!r}"
        ) from None


class VerifiedService:
    """A verified generator (the promoted one, or the real models) behind a lock, with
    request checks.

    Args:
        verified: a loaded :class:`cotgen.registry.VerifiedGenerator` (or anything with its
            attributes).
        config: the service's limits.
    """

    def __init__(self, verified, config: ServeConfig) -> None:
        from cotgen.search import STRATEGIES

        self.verified = verified
        self.config = config
        self.generator = verified.generator
        self.judge = verified.judge
        #: PARM++'s self-correction generator, when the model carries one (``package_parm_pp``)
        self.corrector = getattr(verified, "corrector", None)
        self.strategies = tuple(s for s in STRATEGIES if s == "sample" or (
            self.judge is not None and (s != "parm_pp" or self.corrector is not None)))
        self._lock = threading.Lock()

    # -- checks ---------------------------------------------------------------------------

    def check_prompt(self, prompt: str) -> str:
        """The prompt, whitespace collapsed; RequestError if empty, over
        ``serve.max_prompt_chars``, or refused by the generator's ``check_prompt`` (shapes:
        words outside the vocabulary, more words than the prompt block; coco: more tokens
        than fit before the image)."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise RequestError("prompt is empty")
        if len(prompt) > self.config.max_prompt_chars:
            raise RequestError(f"prompt has {len(prompt)} characters, at most {self.config.max_prompt_chars} are accepted")
        prompt = " ".join(prompt.split())
        try:
            self.generator.check_prompt(prompt)
        except ValueError as e:
            raise RequestError(f"prompt {prompt!r}: {e}") from None
        return prompt

    def check_strategy(self, strategy: str | None) -> str:
        strategy = strategy or self.verified.search.strategy
        if strategy not in self.strategies:
            extra = "" if self.judge is not None else " (the promoted model has no judge)"
            if strategy == "parm_pp" and self.judge is not None:
                extra = (" (parm_pp needs a model with PARM++'s self-correction generator: "
                         "`dvc repro reflect/dvc.yaml` adds one to the promoted model)")
            raise RequestError(f"unknown strategy {strategy!r}; expected one of {', '.join(self.strategies)}{extra}")
        return strategy

    def check_reflectable(self, prompt: str) -> None:
        """RequestError unless the judge can reflect on ``prompt`` (parm_pp): the reflection
        names failures against the prompt's GenEval metadata, so the prompt must follow one
        of GenEval's six templates (:func:`cotgen.reflect.text.parse_prompt`). Checked
        before any search runs."""
        from cotgen.reflect.text import parse_prompt

        try:
            parse_prompt(prompt)
        except ValueError:
            raise RequestError(
                f"parm_pp reflects on GenEval-style prompts only (one of GenEval's six templates: one object, two "
                f"objects, a count, a colour, a relation between two uncoloured objects, two coloured objects); "
                f"{prompt!r} is none of them (the other strategies accept it)") from None

    def sampling(self, n, seed, cfg_scale, temperature, top_k):
        """The promoted SamplingConfig with the request's overrides; RequestError if out of bounds."""
        base = self.verified.sampling
        n = base.n if n is None else n
        cfg_scale = base.cfg_scale if cfg_scale is None else cfg_scale
        temperature = base.temperature if temperature is None else temperature
        top_k = base.top_k if top_k is None else top_k
        seed = base.seed if seed is None else seed
        if not 1 <= n <= self.config.max_n:
            raise RequestError(f"n must be between 1 and {self.config.max_n} (serve.max_n), got {n}")
        if not 0 <= cfg_scale <= self.config.max_cfg_scale:
            raise RequestError(f"cfg_scale must be between 0 and {self.config.max_cfg_scale}, got {cfg_scale}")
        if not 1e-3 <= temperature <= 10:
            raise RequestError(f"temperature must be between 0.001 and 10, got {temperature}")
        if not 0 <= top_k <= self.generator.codebook_size:
            raise RequestError(f"top_k must be between 0 and {self.generator.codebook_size} (0 = all), got {top_k}")
        if not 0 <= seed < 2**63:
            raise RequestError(f"seed must be between 0 and 2**63 - 1, got {seed}")
        return replace(base, n=int(n), cfg_scale=float(cfg_scale), temperature=float(temperature), top_k=int(top_k),
                       seed=int(seed))

    # -- endpoints ------------------------------------------------------------------------

    def generate(self, prompt: str, strategy: str | None = None, n: int | None = None, seed: int | None = None,
                 cfg_scale: float | None = None, temperature: float | None = None, top_k: int | None = None,
                 return_steps: bool = False):
        """Run one search. Returns ``(SearchResult, sampling config, strategy, seconds waited for the lock)``."""
        from cotgen.search import search

        prompt = self.check_prompt(prompt)
        strategy = self.check_strategy(strategy)
        if strategy == "parm_pp":
            self.check_reflectable(prompt)
        sampling = self.sampling(n, seed, cfg_scale, temperature, top_k)
        config = replace(self.verified.search, strategy=strategy)
        t0 = time.perf_counter()
        with self._lock:
            waited = time.perf_counter() - t0
            try:
                generator, extra = self._search_inputs(strategy)
                result = search(generator, self.judge, [prompt], sampling, config, keep_steps=return_steps,
                                **extra)[0]
            except ValueError as e:  # a knob the checks above missed: still the request's fault
                raise RequestError(str(e)) from None
        return result, sampling, strategy, waited

    def _search_inputs(self, strategy: str) -> tuple[object, dict]:
        """``(generator, extra search kwargs)``: parm_pp runs the self-correction generator
        in every round (round 1 from a blank canvas, as the Table-5 rows that gated it did);
        the others the promoted generator."""
        if strategy != "parm_pp":
            return self.generator, {}
        return self.corrector.generator, self.corrector.first_round_search_kwargs(1)

    def generate_json(self, return_steps: bool = False, **request) -> dict:
        """:meth:`generate` as the JSON answer (see :mod:`cotgen.serve.service`)."""
        result, sampling, strategy, waited = self.generate(return_steps=return_steps, **request)
        returned = result.compute.get("returned_round")  # parm_pp: the round whose image is returned
        paths = result.rounds[returned - 1]["paths"] if result.rounds else result.paths
        chosen = next(t for t in paths if t.candidate == result.chosen)
        num_steps = self.generator.num_image_tokens // (sampling.tokens_per_step or self.generator.grid_size)
        candidates = []
        for t in paths:
            status = "chosen" if t.candidate == result.chosen else ("cut" if t.cut_at_step is not None else "finished")
            candidates.append({**asdict(t), "status": status})
        answer = {
            "prompt": result.prompt,
            "strategy": strategy,
            "n": result.n,
            "seed": sampling.seed,
            "cfg_scale": sampling.cfg_scale,
            "temperature": sampling.temperature,
            "top_k": sampling.top_k,
            "model": self.verified.tag,
            "image_png_base64": png_base64(result.image),
            "chosen": result.chosen,
            "scores": {"outcome": chosen.outcome, "potential": chosen.potential, "clear_step": chosen.clear_step},
            "trace": {
                "num_steps": num_steps,
                "candidates": candidates,
                "compute": {**result.compute, "queue_seconds": waited},
            },
            "steps": [],
            "rounds": [
                {"round": rd["round"], "image_png_base64": png_base64(rd["image"]), "outcome": rd["score"],
                 "accepted": rd["accepted"], "reflection": rd["reflection"],
                 "condition_reflection": rd["condition_reflection"], "chosen": rd["chosen"],
                 "image_tokens": rd["compute"]["image_tokens"], "returned": rd["round"] == returned}
                for rd in (result.rounds or [])
            ],
        }
        if return_steps and result.steps is not None:
            answer["steps"] = [
                {"candidate": j, "images_png_base64": [png_base64(im) for im in images]}
                for j, images in sorted(result.steps.items())
            ]
        return answer

    def score(self, prompt: str, image: Image.Image) -> dict:
        """The judge's outcome P(yes) for (prompt, image)."""
        if self.judge is None:
            raise RequestError("the promoted model has no judge")
        prompt = self.check_prompt(prompt)
        size = self.judge.required_image_size
        if size is not None and image.size != (size, size):
            raise RequestError(f"expected a {size}x{size} image, got {image.size[0]}x{image.size[1]} (width x height)")
        with self._lock:
            try:
                outcome = float(self.judge.score("outcome", [prompt], [image], [1.0])[0])
            except ValueError as e:
                raise RequestError(str(e)) from None
        return {"prompt": prompt, "outcome": outcome, "model": self.verified.tag}

    def info(self) -> dict:
        v = self.verified
        return {
            "world": v.world,
            "sources": v.sources,
            "tag": v.tag,
            "strategy": v.search.strategy,
            "strategies": list(self.strategies),
            "sampling": asdict(v.sampling),
            "search": asdict(v.search),
            "metadata": v.info,
            "limits": {k: getattr(self.config, k) for k in ("max_n", "max_prompt_chars", "max_cfg_scale",
                                                             "max_upload_bytes", "request_timeout", "max_concurrency")},
            "image_size": self.generator.image_size,
            "max_prompt_tokens": self.generator.max_prompt_tokens,
            "judge_image_size": None if self.judge is None else self.judge.required_image_size,
        }

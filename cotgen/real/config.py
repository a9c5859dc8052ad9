"""Which world cotgen runs in, and loading the real models (issue 9).

``params.yaml``'s ``real:`` section selects the world (``real.world``: ``shapes``, the
embedded GenEval-Shapes world, or ``coco``, real GenEval with real models) and names the
real models, each by a local folder or a Hugging Face hub id (``source``). The section is
top-level so that switching worlds does not change the ``world:`` parameters the shapes
stages of ``dvc.yaml`` track.

Loading is offline-aware: a local folder is used as it is; a hub id is looked up in the
Hugging Face cache first (``HF_HUB_OFFLINE=1`` / ``TRANSFORMERS_OFFLINE=1`` forbid any
download); a model that cannot be found raises :class:`MissingModelError`, which names
what to fetch and where to put it.

``source: tiny`` (the generator, the judge, either detector part) builds the tiny randomly
initialised configs of :mod:`cotgen.real.tiny` instead: nothing is loaded or downloaded,
the images are noise, and the whole coco path (``real/dvc.yaml``, ``cotgen generate
--world coco``) runs on a CPU in seconds, for tests and smoke runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

WORLDS = ("shapes", "coco")

#: ``source:`` value that builds a tiny random model (:mod:`cotgen.real.tiny`) instead of loading one
TINY = "tiny"

#: the paper's real-world models (README "GPU users / real models")
DEFAULT_REAL = {
    "world": "shapes",
    "models_dir": "models",
    "geneval_dir": "../shared/data/geneval",
    "device": "cuda",
    "dtype": "bfloat16",
    "generator": {"kind": "janus", "source": "deepseek-community/Janus-Pro-7B", "cfg_scale": 4.0,
                  "temperature": 1.0, "top_k": 0, "tokens_per_step": 72},
    "judge": {"kind": "llava_onevision", "source": "llava-hf/llava-onevision-qwen2-7b-ov-hf"},
    "detector": {"mask2former": "facebook/mask2former-swin-small-coco-instance",
                 "clip": "openai/clip-vit-large-patch14"},
    # real GenEval runs (cotgen/pipeline/coco.py, real/dvc.yaml): max_prompts null = all 553
    # (else at most that many, spread evenly over the tags); n candidate paths per final image
    "eval": {"max_prompts": None, "images_per_prompt": 4, "n": 20, "batch_prompts": 1, "seed": 0,
             "clarity_threshold": 0.5, "potential_threshold": 0.5},
}


class MissingModelError(FileNotFoundError):
    """A real model is neither a local folder nor in the Hugging Face cache (or may not be
    downloaded); the message says what to fetch and where to put it."""


@dataclass
class RealConfig:
    """``params.yaml`` ``real:`` with defaults (:data:`DEFAULT_REAL`)."""

    world: str = "shapes"
    models_dir: str = "models"
    geneval_dir: str = "../shared/data/geneval"
    device: str = "cuda"
    dtype: str = "bfloat16"
    generator: dict = field(default_factory=lambda: dict(DEFAULT_REAL["generator"]))
    judge: dict = field(default_factory=lambda: dict(DEFAULT_REAL["judge"]))
    detector: dict = field(default_factory=lambda: dict(DEFAULT_REAL["detector"]))
    eval: dict = field(default_factory=lambda: dict(DEFAULT_REAL["eval"]))

    @classmethod
    def from_params(cls, params: dict) -> RealConfig:
        """From a loaded ``params.yaml`` (its ``real:`` section; absent = the shapes world).

        Raises:
            ValueError: unknown world or keys.
        """
        section = dict(params.get("real") or {})
        unknown = set(section) - set(DEFAULT_REAL)
        if unknown:
            raise ValueError(f"params real: unknown keys {sorted(unknown)}; known: {sorted(DEFAULT_REAL)}")
        merged = {k: ({**DEFAULT_REAL[k], **section.get(k, {})} if isinstance(DEFAULT_REAL[k], dict)
                      else section.get(k, DEFAULT_REAL[k])) for k in DEFAULT_REAL}
        if merged["world"] not in WORLDS:
            raise ValueError(f"params real.world must be one of {list(WORLDS)}, got {merged['world']!r}")
        return cls(**merged)

    @property
    def is_real(self) -> bool:
        return self.world == "coco"

    def require_coco(self, what: str) -> None:
        """Refuse ``what`` (a stage or command of the real world) outside ``real.world: coco``.

        Raises:
            ValueError: ``real.world`` is not ``coco`` (the message names the setting).
        """
        if not self.is_real:
            raise ValueError(f"{what} runs real models on real GenEval and needs params.yaml `real.world: coco` "
                             f"(it is {self.world!r}); set it, or use the shapes stages of dvc.yaml")

    def at_root(self, root: str | Path) -> RealConfig:
        """A copy whose relative ``models_dir`` and ``geneval_dir`` are taken relative to
        ``root`` (the repository root a stage writes into) instead of the working folder."""
        def under(p: str) -> str:
            return p if Path(p).expanduser().is_absolute() else str(Path(root) / p)

        return replace(self, models_dir=under(self.models_dir), geneval_dir=under(self.geneval_dir))


def offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` forbid downloads."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _fetch_hint(source: str, models_dir: str | Path, what: str) -> str:
    local = Path(models_dir) / source.split("/")[-1]
    return (f"{what} {source!r} is not available locally. Fetch it on a machine with internet access:\n"
            f"  huggingface-cli download {source} --local-dir {local}\n"
            f"then set its `source:` in params.yaml `real:` to that folder ({local}), or copy the Hugging Face "
            f"cache (~/.cache/huggingface/hub, or $HF_HOME) to this machine and keep HF_HUB_OFFLINE=1.")


def resolve_model(source: str, what: str = "model", models_dir: str | Path = "models",
                  allow_download: bool | None = None) -> str:
    """A loadable location for ``source``: a local folder (must hold ``config.json``), a
    folder under ``models_dir`` named like the hub id's last part, or the hub id itself
    when it is in the Hugging Face cache (or downloads are allowed).

    ``allow_download`` defaults to "not offline" (:func:`offline`) and is only used for
    hub ids that are not cached.

    Raises:
        MissingModelError: none of those holds the model (names what to fetch, where to
            put it).
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MissingModelError(f"{what} folder {path} has no config.json (is it a complete "
                                    f"save_pretrained / huggingface-cli download folder?)")
        return str(path)
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise MissingModelError(f"{what} folder {source} does not exist; point params.yaml `real:` at a folder "
                                f"holding the model (config.json + safetensors) or at a hub id")
    local = Path(models_dir) / source.split("/")[-1]
    if (local / "config.json").is_file():
        return str(local)
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, "config.json")
    except Exception:  # noqa: BLE001 - a malformed id or cache counts as not cached
        cached = None
    if isinstance(cached, str):
        return source
    if allow_download is None:
        allow_download = not offline()
    if allow_download:
        return source
    raise MissingModelError(_fetch_hint(source, models_dir, what))


def generator_location(cfg: RealConfig, allow_download: bool | None = None) -> str:
    """Where :func:`load_janus` loads the generator from: :data:`TINY`, or what
    :func:`resolve_model` finds for ``real.generator.source``. Loads nothing.

    Raises:
        ValueError: a generator kind other than ``janus``.
        MissingModelError: the source cannot be found.
    """
    spec = cfg.generator
    if spec.get("kind", "janus") != "janus":
        raise ValueError(f"unknown generator kind {spec.get('kind')!r}; cotgen's real generator is 'janus'")
    if spec["source"] == TINY:
        return TINY
    return resolve_model(spec["source"], "Janus-Pro generator", cfg.models_dir, allow_download)


def judge_location(cfg: RealConfig, allow_download: bool | None = None) -> str:
    """Where :func:`load_judge` loads the judge from: :data:`TINY`, or what
    :func:`resolve_model` finds for ``real.judge.source``. Loads nothing.

    Raises:
        ValueError: an unknown judge kind.
        MissingModelError: the source cannot be found.
    """
    from cotgen.real.judge import JUDGE_CLASSES

    spec = cfg.judge
    if spec["kind"] not in JUDGE_CLASSES:
        raise ValueError(f"unknown judge kind {spec['kind']!r}; expected one of {sorted(JUDGE_CLASSES)}")
    if spec["source"] == TINY:
        return TINY
    return resolve_model(spec["source"], f"{spec['kind']} judge", cfg.models_dir, allow_download)


def load_janus(cfg: RealConfig, allow_download: bool | None = None):
    """The Janus-Pro generator of ``cfg`` (:class:`cotgen.real.janus.JanusGenerator`) on
    ``cfg.device`` in ``cfg.dtype``; ``source: tiny``: :func:`cotgen.real.tiny.tiny_janus`
    (8x8 codes, 32x32 images).

    Raises:
        ValueError: a generator kind other than ``janus``.
        MissingModelError: the source cannot be found (see :func:`resolve_model`).
    """
    import torch

    from cotgen.real.janus import JanusGenerator

    where = generator_location(cfg, allow_download)
    if where == TINY:
        from cotgen.real.tiny import tiny_janus

        generator = tiny_janus()
        generator.model.to(device=cfg.device, dtype=getattr(torch, cfg.dtype))
        return generator
    return JanusGenerator.from_pretrained(where, dtype=getattr(torch, cfg.dtype), device=cfg.device)


def load_judge(cfg: RealConfig, allow_download: bool | None = None):
    """The VLM judge of ``cfg`` (:class:`cotgen.real.judge.PretrainedVLMJudge`) on
    ``cfg.device`` in ``cfg.dtype``; ``source: tiny``: the tiny model of its ``kind``
    (:func:`cotgen.real.tiny.tiny_llava_onevision`, :func:`cotgen.real.tiny.tiny_qwen2vl`).

    Raises:
        ValueError: an unknown judge kind.
        MissingModelError: the source cannot be found (see :func:`resolve_model`).
    """
    import torch

    from cotgen.real.judge import PretrainedVLMJudge, load_vlm_judge

    spec = cfg.judge
    where = judge_location(cfg, allow_download)
    if where == TINY:
        from cotgen.real import tiny

        model, processor = {"llava_onevision": tiny.tiny_llava_onevision, "qwen2_vl": tiny.tiny_qwen2vl}[spec["kind"]]()
        return PretrainedVLMJudge(model.to(device=cfg.device, dtype=getattr(torch, cfg.dtype)), processor)
    return load_vlm_judge(spec["kind"], where, dtype=getattr(torch, cfg.dtype), device=cfg.device)


def load_detector(cfg: RealConfig, allow_download: bool | None = None):
    """The GenEval detector of ``cfg`` (:class:`cotgen.real.detector.Mask2FormerClipDetector`)
    on ``cfg.device`` (float32); a part whose source is ``tiny`` is
    :func:`cotgen.real.tiny.tiny_mask2former` / :func:`cotgen.real.tiny.tiny_clip`. Class
    names: ``<geneval_dir>/object_names.txt``.

    Raises:
        MissingModelError: a source cannot be found (see :func:`resolve_model`).
    """
    from transformers import AutoImageProcessor, AutoProcessor, CLIPModel, Mask2FormerForUniversalSegmentation

    from cotgen.real import tiny
    from cotgen.real.detector import ClipColorClassifier, Mask2FormerClipDetector, geneval_object_names

    def part(source: str, what: str, build_tiny, model_class, processor_class):
        if source == TINY:
            model, processor = build_tiny()
        else:
            where = resolve_model(source, what, cfg.models_dir, allow_download)
            model, processor = model_class.from_pretrained(where), processor_class.from_pretrained(where)
        return model.to(cfg.device), processor

    model, processor = part(cfg.detector["mask2former"], "Mask2Former (Swin-S COCO instance) detector",
                            tiny.tiny_mask2former, Mask2FormerForUniversalSegmentation, AutoImageProcessor)
    clip_model, clip_processor = part(cfg.detector["clip"], "CLIP ViT-L/14 colour classifier", tiny.tiny_clip,
                                      CLIPModel, AutoProcessor)
    names = geneval_object_names(Path(cfg.geneval_dir) / "object_names.txt")
    return Mask2FormerClipDetector(model, processor, ClipColorClassifier(clip_model, clip_processor),
                                   object_names=names)


def sampling_config(cfg: RealConfig, n: int = 1, seed: int = 0):
    """The real generator's :class:`~cotgen.generator.sampling.SamplingConfig` (``real.generator``'s
    ``cfg_scale``, ``temperature``, ``top_k``, ``tokens_per_step``) with ``n`` paths per prompt."""
    from cotgen.generator.sampling import SamplingConfig

    g = cfg.generator
    return SamplingConfig(n=n, cfg_scale=g["cfg_scale"], temperature=g["temperature"], top_k=g["top_k"], seed=seed,
                          tokens_per_step=g["tokens_per_step"])


def check_verified_real(cfg: RealConfig, allow_download: bool | None = None) -> None:
    """Fail fast, loading nothing, where :func:`verified_from_real` would fail: the world is
    not coco, a generator or judge source cannot be found (:class:`MissingModelError`,
    naming what to fetch), an unknown kind, or ``real.device`` is CUDA on a machine
    without one (the service's start-up check).

    Raises:
        ValueError, MissingModelError: see above.
    """
    cfg.require_coco("serving the real models")
    generator_location(cfg, allow_download)
    judge_location(cfg, allow_download)
    if cfg.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"params real.device is {cfg.device!r} but torch sees no CUDA device here; "
                             "set real.device (e.g. cpu, with dtype float32) or run on a GPU machine")


def verified_from_real(cfg: RealConfig, allow_download: bool | None = None):
    """The real world's verified generator (what the service serves with ``real.world:
    coco``): :func:`load_janus` and :func:`load_judge` of ``cfg``, sampling from
    :func:`sampling_config` with ``real.eval``'s ``n`` and ``seed``, and a PARM search with
    ``real.eval``'s thresholds. Its ``tag`` is ``coco:<generator>+<judge>`` (the sources'
    last path parts), its ``sources`` the kinds and sources of ``real:``.

    Returns:
        a :class:`cotgen.registry.VerifiedGenerator` (``world`` ``coco``).
    Raises:
        ValueError, MissingModelError: see :func:`load_janus`, :func:`load_judge`.
    """
    from cotgen.registry import VerifiedGenerator
    from cotgen.search import SearchConfig

    cfg.require_coco("serving the real models")
    e = cfg.eval
    search = SearchConfig("parm", e["clarity_threshold"], e["potential_threshold"])
    search.check()
    sources = {"generator": {"kind": cfg.generator.get("kind", "janus"), "source": cfg.generator["source"]},
               "judge": {"kind": cfg.judge["kind"], "source": cfg.judge["source"]}}
    tag = "coco:" + "+".join(Path(s["source"]).name for s in sources.values())
    return VerifiedGenerator(load_janus(cfg, allow_download), load_judge(cfg, allow_download),
                             sampling_config(cfg, e["n"], e["seed"]), search, tag,
                             info={"device": cfg.device, "dtype": cfg.dtype}, world="coco", sources=sources)

"""Limits and server settings of the service: the ``serve:`` section of ``params.yaml``.

The service reads its params file once, when its module is imported (``bentoml serve``
and ``bentoml build`` both import it): ``$COTGEN_PARAMS`` if set, else ``params.yaml`` in
the working directory (the repository root, or the Bento's ``src/``), else the defaults
below (:func:`read_params`). Its ``serve:`` section sets the limits; its ``real:`` section
picks the world the service answers in (``real.world: coco``: the real models of
``real:``, see :mod:`cotgen.serve.service`). Unknown keys are an error, so a typo does not
silently keep a default.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class ServeConfig:
    """Knobs of the BentoML service.

    Attributes:
        host: address it listens on (``bentoml serve --host`` overrides it).
        port: TCP port (``bentoml serve --port`` overrides it).
        max_n: most candidate paths (N) one request may ask for.
        max_prompt_chars: longest prompt, in characters (the generator's prompt block
            also caps it in words).
        max_cfg_scale: largest CFG scale accepted.
        max_upload_bytes: largest image upload the judge accepts.
        request_timeout: seconds before BentoML answers 504 (a request still queued is
            then never run; one already running finishes in the background).
        max_concurrency: requests in flight per worker; more are answered 429.
        threads: requests computed at the same time per worker (the rest wait in line,
            off the event loop, so health checks stay responsive).
        torch_threads: intra-op threads torch uses per worker.
        workers: BentoML worker processes (each loads the model).
    """

    host: str = "127.0.0.1"
    port: int = 3000
    max_n: int = 20
    max_prompt_chars: int = 200
    max_cfg_scale: float = 20.0
    max_upload_bytes: int = 2_000_000
    request_timeout: float = 120.0
    max_concurrency: int = 32
    threads: int = 1
    torch_threads: int = 2
    workers: int = 1

    def check(self) -> ServeConfig:
        for name in ("port", "max_n", "max_prompt_chars", "max_upload_bytes", "max_concurrency", "threads",
                     "torch_threads", "workers"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"serve.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_cfg_scale", "request_timeout"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"serve.{name} must be > 0, got {getattr(self, name)}")
        return self

    def as_dict(self) -> dict:
        return asdict(self)


def serve_config(section: dict | None) -> ServeConfig:
    """A :class:`ServeConfig` from a ``serve:`` mapping (missing keys keep their defaults).

    Raises:
        ValueError: an unknown key or a bad value (named).
    """
    section = dict(section or {})
    known = {f.name: f.type for f in fields(ServeConfig)}
    unknown = sorted(set(section) - set(known))
    if unknown:
        raise ValueError(f"unknown serve settings: {', '.join(unknown)}; known: {', '.join(known)}")
    defaults = ServeConfig()
    typed = {k: type(getattr(defaults, k))(v) for k, v in section.items()}
    return ServeConfig(**typed).check()


def params_path() -> Path:
    """The params file the service reads: ``$COTGEN_PARAMS``, else ``./params.yaml``."""
    return Path(os.environ.get("COTGEN_PARAMS", "params.yaml"))


def read_params(path: str | Path | None = None) -> dict:
    """The params file ``path`` (default: :func:`params_path`) as a dict; ``{}`` if there is
    no such file."""
    import yaml

    path = Path(path or params_path())
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def load_serve_config(path: str | Path | None = None) -> ServeConfig:
    """The ``serve:`` section of ``path`` (default: :func:`params_path`); the defaults if
    there is no such file or section."""
    return serve_config(read_params(path).get("serve"))

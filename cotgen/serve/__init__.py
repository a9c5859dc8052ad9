"""Serving the promoted verified generator with BentoML (issue 6).

- :mod:`cotgen.serve.config`: the ``serve:`` section of ``params.yaml`` (limits, host).
- :mod:`cotgen.serve.core`: request checks, search and answers, without HTTP.
- :mod:`cotgen.serve.service`: the ``@bentoml.service`` (``bentoml serve`` in the repo root).
"""

from cotgen.serve.config import ServeConfig, load_serve_config

__all__ = ["ServeConfig", "load_serve_config"]

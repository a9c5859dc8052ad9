"""Promote a candidate verified generator, through the GenEval gate.

``cotgen-candidate:<version>`` models (saved by the ``package`` stage, or by hand with
:func:`cotgen.registry.save_candidate`) carry their GenEval-Shapes scores in their
metadata. This flow checks them against ``params.yaml``'s ``gate`` thresholds and the
currently promoted model (no regression beyond ``gate.max_regression``); if they pass it
promotes the candidate to ``cotgen-verified:latest``, otherwise it ends Failed naming
every failed threshold and the promoted model stays as it was. ``force`` skips the gate
(recorded in the artifact)::

    python flows/promote.py cotgen-candidate:abc123
    python flows/promote.py cotgen-candidate:abc123 --profile tiny --force
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

from prefect import flow, get_run_logger  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402

from cotgen.pipeline.gate import GateFailedError, check_gate, gate_thresholds  # noqa: E402
from cotgen.pipeline.orchestrate import geneval_markdown  # noqa: E402


def scores_from_metadata(meta: dict) -> dict:
    """A GenEval summary (``overall``, ``tags``, ``prompts``, ``images``) rebuilt from a
    model's metadata (``geneval_overall``, ``geneval_<tag>``)."""
    tags = {k[len("geneval_"):]: float(v) for k, v in meta.items() if k.startswith("geneval_") and k != "geneval_overall"}
    out = {"overall": float(meta["geneval_overall"]), "tags": tags}
    for key in ("prompts", "images", "image_tokens_per_image"):
        if key in meta:
            out[key] = meta[key]
    return out


@flow(name="cotgen-promote")
def promote_candidate(tag: str, root: str = ".", profile: str | None = None, force: bool = False) -> str:
    """Gate and promote candidate ``tag``; returns the promoted tag.

    Raises:
        GateFailedError: the gate failed (and not ``force``); nothing promoted.
        cotgen.registry.NoPromotedModelError: no model under ``tag``.
    """
    import bentoml
    from bentoml.exceptions import NotFound

    from cotgen.pipeline.params import load_params
    from cotgen.registry import NoPromotedModelError, promote, promoted_model

    logger = get_run_logger()
    try:
        cand = bentoml.models.get(tag)
    except NotFound as e:
        raise NoPromotedModelError(f"no candidate model {tag}: {e}") from e
    meta = dict(cand.info.metadata)
    if "geneval_overall" not in meta:
        raise ValueError(f"{tag} has no GenEval scores in its metadata (geneval_overall); evaluate it first")
    current = promoted_model()
    verdict = check_gate(scores_from_metadata(meta), gate_thresholds(load_params(Path(root) / "params.yaml", profile)),
                         dict(current.info.metadata) if current is not None else None,
                         str(current.tag) if current is not None else None)
    markdown = geneval_markdown({str(cand.tag): scores_from_metadata(meta)}, verdict, title=f"Promotion of {cand.tag}")
    if not verdict.passed and not force:
        create_markdown_artifact(markdown, key="cotgen-promotion", description=f"refused: {cand.tag}")
        raise GateFailedError(f"{verdict.message()} -- {cand.tag} not promoted; the promoted model stays "
                              f"{verdict.promoted or '(none)'}")
    promoted = promote(cand.tag)
    note = " (gate FORCED)" if not verdict.passed else ""
    create_markdown_artifact(markdown + f"\nPromoted `{promoted}`{note}.\n", key="cotgen-promotion",
                             description=f"promoted {promoted}")
    logger.info(f"promoted {cand.tag} -> {promoted}{note}")
    return str(promoted)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Promote a candidate model through the GenEval gate (Prefect flow)")
    ap.add_argument("tag")
    ap.add_argument("--root", default=".")
    ap.add_argument("--profile")
    ap.add_argument("--force", action="store_true", help="promote even if the gate fails")
    a = ap.parse_args(argv)
    try:
        print(promote_candidate(a.tag, a.root, a.profile, a.force))
    except GateFailedError as e:
        print(f"GATE FAILED: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

"""Reflection groups (PARM++'s self-correction data): per training prompt, a wrong
image's tokens, its reflection (built from the evaluator's reason,
:func:`cotgen.reflect.text.reflection_text`) and a right image's tokens of the same
prompt. Rows follow the ``reflections`` data kind of :mod:`cotgen.pipeline.validation`:
``{prompt, wrong_tokens, reflection, right_tokens, metadata}`` plus ``kind`` (the
failure's kind, for measurement) and ``right_source`` (``generator`` | ``render`` |
``edit``).

Two ways to choose the right image (``reflect.data.right``):

- ``edit`` (params.yaml's choice): the wrong image with its faults repaired in pixels
  (:mod:`cotgen.reflect.edit`), so that the target depends on the wrong image and on
  the fault the reflection names;
- ``sample``: a correct sample of the same prompt drawn at random (else a rendered
  scene). The target is then independent of the wrong image and of its reflection, and
  the corrector learns p(right | prompt) (stop 23, ``scripts/corrector_inputs.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from cotgen.jsonl import read_jsonl, write_jsonl
from cotgen.reflect.text import Failure, primary_failure, render_failure


def reflection_groups(
    traj,
    image_tokenizer=None,
    detector=None,
    seed: int = 0,
    splits: Sequence[str] = ("train",),
    render_right: bool = True,
    style=None,
    right: str = "sample",
    max_edits: int = 3,
) -> list[dict]:
    """One group per wrong path (of ``splits``) whose reason parses.

    With ``right="sample"`` the right image is a correct path of the same prompt (drawn
    at random, seeded); a prompt without one gets, with ``render_right`` (needs
    ``image_tokenizer`` and ``detector``), a rendered scene (``style``, default the
    generator's CANONICAL) encoded by the image tokenizer and kept only if the evaluator
    finds its decoded image correct; otherwise its wrong paths give no group.

    With ``right="edit"`` (needs ``image_tokenizer`` and ``detector``) it is the wrong
    image repaired (:func:`edited_right_tokens`); wrong paths whose repair fails give no
    group.

    Raises:
        ValueError: an unknown ``right``, or ``edit`` without a tokenizer and detector.
    """
    from cotgen.geneval.scoring import judge_image

    if right not in ("sample", "edit"):
        raise ValueError(f"right must be 'sample' or 'edit', got {right!r}")
    if right == "edit":
        if image_tokenizer is None or detector is None:
            raise ValueError("right='edit' needs the image tokenizer and the detector")
        return _edited_groups(traj, image_tokenizer, detector, seed, splits, style, max_edits)
    rng = np.random.default_rng(seed)
    by_prompt: dict[str, dict] = {}
    for i, p in enumerate(traj.paths):
        if p["split"] not in splits:
            continue
        slot = by_prompt.setdefault(p["prompt"], {"right": [], "wrong": [], "meta": p["metadata"]})
        slot["right" if p["correct"] else "wrong"].append(i)
    groups = []
    for prompt, slot in by_prompt.items():
        wrong = [(i, f) for i in slot["wrong"] if (f := primary_failure(traj.paths[i]["reason"], slot["meta"]))]
        if not wrong:
            continue
        right = [("generator", traj.tokens[i].tolist()) for i in slot["right"]]
        if not right and render_right and image_tokenizer is not None and detector is not None:
            from cotgen.world.render import CANONICAL, render_scene

            image = render_scene(slot["meta"], rng, style=style or CANONICAL)[0]
            grid = image_tokenizer.encode_images([image])
            with torch.no_grad():
                decoded = image_tokenizer.decode_images(grid)
            tokens = grid.flatten(1)
            if judge_image(detector, decoded[0], slot["meta"])[0]:
                right = [("render", tokens[0].tolist())]
        if not right:
            continue
        for i, f in wrong:
            source, tokens = right[int(rng.integers(len(right)))]
            groups.append({"prompt": prompt, "wrong_tokens": traj.tokens[i].tolist(),
                           "reflection": render_failure(f, slot["meta"], rng), "right_tokens": tokens,
                           "metadata": slot["meta"], "kind": f.kind, "right_source": source})
    return groups


def failed_paths(traj, splits: Sequence[str] = ("train",)) -> list[tuple[int, dict, Failure]]:
    """``(row, path, failure)`` of every wrong path of ``splits`` whose evaluator reason parses
    (:func:`cotgen.reflect.text.primary_failure`): the paths a group can be made from."""
    return [(i, p, f) for i, p in enumerate(traj.paths) if p["split"] in splits and not p["correct"]
            and (f := primary_failure(p["reason"], p["metadata"]))]


def _edited_groups(traj, image_tokenizer, detector, seed, splits, style, max_edits) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = failed_paths(traj, splits)
    right = edited_right_tokens(traj.tokens[[i for i, _, _ in rows]], [p["metadata"] for _, p, _ in rows],
                                image_tokenizer, detector, rng, style, max_edits)
    return [
        {
            "prompt": p["prompt"],
            "wrong_tokens": traj.tokens[i].tolist(),
            "reflection": render_failure(f, p["metadata"], rng),
            "right_tokens": tokens,
            "metadata": p["metadata"],
            "kind": f.kind,
            "right_source": "edit",
            "edits": edits,
        }
        for (i, p, f), (tokens, edits) in zip(rows, right)
        if tokens is not None
    ]


def edited_right_tokens(wrong_tokens: torch.Tensor, metadata: Sequence[dict], image_tokenizer, detector,
                        rng: np.random.Generator, style=None, max_edits: int = 3,
                        batch_size: int = 256) -> list[tuple[list[int] | None, int]]:
    """Right images made by repairing wrong ones (:func:`cotgen.reflect.edit.repair_until_correct`
    on the decoded image; the edited cells' codes spliced into the wrong codes,
    :func:`cotgen.reflect.edit.splice_tokens`), kept only when the evaluator finds the
    decoded result correct.

    Args:
        wrong_tokens: long ``(M, g*g)``, wrong images' codes.
        metadata: M GenEval metadata lines.
        rng: NumPy generator (placements, colours).
        style: how new objects are drawn (default the generator's CANONICAL).
    Returns:
        M ``(right codes as a list of g*g ints, or None; edits made)``.
    """
    from cotgen.geneval.scoring import judge_image
    from cotgen.reflect.edit import repair_until_correct, splice_tokens
    from cotgen.world.render import CANONICAL
    from PIL import Image

    g = image_tokenizer.grid_size
    out: list[tuple[list[int] | None, int]] = []
    for start in range(0, len(wrong_tokens), batch_size):
        grid = wrong_tokens[start:start + batch_size].view(-1, g, g)
        metas = metadata[start:start + batch_size]
        wrong = [np.asarray(im) for im in image_tokenizer.decode_images(grid)]
        edited = [
            repair_until_correct(im, detector, m, rng, style or CANONICAL, max_edits)
            for im, m in zip(wrong, metas)
        ]
        done = [k for k, (im, _) in enumerate(edited) if im is not None]
        codes = image_tokenizer.encode_images([Image.fromarray(edited[k][0]) for k in done]) if done else []
        spliced = {k: splice_tokens(grid[k], c, wrong[k], edited[k][0]) for k, c in zip(done, codes)}
        decoded = {}
        if spliced:
            decoded = dict(zip(spliced, image_tokenizer.decode_images(torch.stack(list(spliced.values())))))
        for k, (_, edits) in enumerate(edited):
            ok = k in decoded and judge_image(detector, decoded[k], metas[k])[0]
            out.append((spliced[k].flatten().tolist() if ok else None, edits))
    return out


write_groups = write_jsonl  # reflection groups as JSON lines
read_groups = read_jsonl

"""Reflection groups (PARM++'s self-correction data): per training prompt, a wrong
image's tokens, its reflection (built from the evaluator's reason,
:func:`cotgen.reflect.text.reflection_text`) and a right image's tokens of the same
prompt. Rows follow the ``reflections`` data kind of :mod:`cotgen.pipeline.validation`:
``{prompt, wrong_tokens, reflection, right_tokens, metadata}`` plus ``kind`` (the
failure's kind, for measurement) and ``right_source`` (``generator`` | ``render``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from cotgen.jsonl import read_jsonl, write_jsonl
from cotgen.reflect.text import primary_failure, render_failure


def reflection_groups(traj, image_tokenizer=None, detector=None, seed: int = 0, splits: Sequence[str] = ("train",),
                      render_right: bool = True, style=None) -> list[dict]:
    """One group per wrong path (of ``splits``) whose reason parses. The right image is
    a correct path of the same prompt (drawn at random, seeded); a prompt without one
    gets, with ``render_right`` (needs ``image_tokenizer`` and ``detector``), a rendered
    scene (``style``, default the generator's CANONICAL) encoded by the image tokenizer
    and kept only if the evaluator finds its decoded image correct; otherwise its wrong
    paths give no group."""
    from cotgen.geneval.scoring import judge_image

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


write_groups = write_jsonl  # reflection groups as JSON lines
read_groups = read_jsonl

"""The Judge interface (DESIGN section 4): P(yes) for the paper's questions.

A judge answers one of the paper's questions about (prompt, image) pairs; its score is
the probability of "yes" at the first answer position, normalised over "yes" and "no"
(paper section 3; its public code scores the same way). Every judge of cotgen (the
compact object-centric one of the embedded world, the VLM one) implements this.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

# The paper's questions (section 3.2 / 3.4; wording follows its released prompts).
QUESTIONS: dict[str, str] = {
    "outcome": "Does this image accurately represent the prompt? Please answer yes or no.",
    "step": "This is an intermediate image of the generation. Is the generation correct so far? "
    "Please answer yes or no.",
    "clarity": "This is an intermediate image of the generation. Is it clear enough to judge "
    "whether it will match the prompt? Please answer yes or no.",
    "potential": "This is an intermediate image of the generation. Does it have the potential to "
    "become an image that accurately represents the prompt? Please answer yes or no.",
}


def check_question(question: str) -> str:
    """Return ``question`` if it is one of :data:`QUESTIONS`; else ValueError naming it."""
    if question not in QUESTIONS:
        raise ValueError(f"unknown question {question!r}; expected one of {sorted(QUESTIONS)}")
    return question


@runtime_checkable
class Judge(Protocol):
    """A reward model.

    ``score(question, prompts, images, progress)`` returns P(yes) for each pair as a
    float64 array of shape ``(B,)`` with values in [0, 1].

    Args of ``score``:
        question: a key of :data:`QUESTIONS` (outcome, step, clarity, potential).
        prompts: B prompt texts.
        images: B RGB PIL images (64x64 in the embedded world); intermediate images
            draw tokens not generated yet as background.
        progress: optional B fractions of the image tokens generated so far, in
            [0, 1] (1 for final images). A raster-order model's intermediate image
            does not show how far generation got, so the step number is part of the
            input, as the paper's judge sees it in blurriness; judges may ignore it.
    Raises:
        ValueError: unknown question, or lengths that differ.
    """

    def score(
        self,
        question: str,
        prompts: Sequence[str],
        images: Sequence[Image.Image],
        progress: Sequence[float] | None = None,
    ) -> np.ndarray: ...


def check_batch(prompts: Sequence[str], images: Sequence, progress: Sequence[float] | None) -> np.ndarray:
    """Validate a judge batch; return progress as float32 ``(B,)`` (ones if None)."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
    if progress is None:
        return np.ones(len(prompts), dtype=np.float32)
    p = np.asarray(progress, dtype=np.float32)
    if p.shape != (len(prompts),) or (p < 0).any() or (p > 1).any():
        raise ValueError(f"progress must be {len(prompts)} fractions in [0, 1]")
    return p

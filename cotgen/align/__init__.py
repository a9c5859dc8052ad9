"""Preference alignment of the generator (DESIGN section 1, lever 2): preference pairs
from labelled samples of training prompts (:mod:`cotgen.align.pairs`) and DPO with trl's
``DPOTrainer`` and LoRA adapters through peft (:mod:`cotgen.align.dpo`)."""

from cotgen.align.pairs import build_pairs, judge_scores, read_pairs, write_pairs

__all__ = ["build_pairs", "judge_scores", "read_pairs", "write_pairs"]

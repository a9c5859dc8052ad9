"""Pretrained VLM judges (issue 9): LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``)
and Qwen2-VL (``Qwen2VLForConditionalGeneration``) through
:class:`cotgen.reward.vlm_judge.VLMJudge` (processor chat template, the paper's questions,
P(yes) at the first answer position normalised over yes/no; LoRA fine-tuning with
:func:`cotgen.reward.vlm_judge.finetune_vlm_judge`).

A pretrained chat model answers "Yes" as often as "yes", so :class:`PretrainedVLMJudge`
(zero-shot ORM) sums the probabilities of each answer's single-token spellings ("yes",
"Yes", "YES"; "no", "No", "NO") before normalising; a judge fine-tuned on cotgen's
lowercase answers is scored the same way.
"""

from __future__ import annotations

import numpy as np
import torch

from cotgen.reward.judge import check_batch, check_question
from cotgen.reward.vlm_judge import VLMJudge

#: model kinds -> transformers class names (``params.yaml`` ``real.judge.kind``)
JUDGE_CLASSES = {
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
}

ANSWER_SPELLINGS = {"yes": ("yes", "Yes", "YES"), "no": ("no", "No", "NO")}


class PretrainedVLMJudge(VLMJudge):
    """:class:`VLMJudge` scoring P(yes) as the summed probability of the single-token
    spellings of "yes" over those of "yes" and "no" (see the module)."""

    def __init__(self, model, processor) -> None:
        super().__init__(model, processor)
        tok = processor.tokenizer
        self.spelling_ids = {}
        for answer, spellings in ANSWER_SPELLINGS.items():
            ids = set()
            for word in spellings:
                enc = tok.encode(word, add_special_tokens=False)
                if len(enc) == 1 and enc[0] != tok.unk_token_id:
                    ids.add(enc[0])
            self.spelling_ids[answer] = sorted(ids)

    @torch.no_grad()
    def score(self, question, prompts, images, progress=None) -> np.ndarray:
        check_question(question)
        check_batch(prompts, images, progress)
        if not len(prompts):
            return np.zeros(0)
        texts = self.prompt_texts(question, prompts)
        inputs = self.processor(images=[im.convert("RGB") for im in images], text=texts, return_tensors="pt",
                                padding=True, padding_side="left").to(self.model.device)
        probs = self.model(**inputs).logits[:, -1].float().softmax(-1)
        yes = probs[:, self.spelling_ids["yes"]].sum(-1)
        no = probs[:, self.spelling_ids["no"]].sum(-1)
        return (yes / (yes + no).clamp(min=1e-30)).double().cpu().numpy()


def load_vlm_judge(kind: str, source: str, dtype=None, device=None, pretrained_answers: bool = True) -> VLMJudge:
    """Load a judge of ``kind`` (:data:`JUDGE_CLASSES`) from a local folder or hub id
    (resolve it with :func:`cotgen.real.config.resolve_model` first to get a clear
    error when it is missing).

    ``pretrained_answers`` picks :class:`PretrainedVLMJudge` (summed answer spellings)
    over the plain :class:`VLMJudge`.
    """
    import transformers
    from transformers import AutoProcessor

    if kind not in JUDGE_CLASSES:
        raise ValueError(f"unknown judge kind {kind!r}; expected one of {sorted(JUDGE_CLASSES)}")
    cls = getattr(transformers, JUDGE_CLASSES[kind])
    model = cls.from_pretrained(source, dtype=dtype or "auto")
    if device is not None:
        model = model.to(device)
    processor = AutoProcessor.from_pretrained(source)
    return (PretrainedVLMJudge if pretrained_answers else VLMJudge)(model, processor)

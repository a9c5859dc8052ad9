"""The judge's reflection (PARM++): the object judge learns to say what is wrong.

:class:`ObjectReflectorModel` is the object-centric judge (:class:`ObjectJudgeModel`,
same object tokens, word tokens and BertModel encoder; initialised from the trained
judge's weights) with a *reflection head*: a learned reflection query takes the place
of the question token, and five linear heads on its output predict the structured
failure of :class:`cotgen.reflect.text.Failure`: its kind (ok / missing / count /
colour / position), which include failed, the count seen, the colour seen and the
relation seen. The prediction is rendered with the reflection templates
(:func:`cotgen.reflect.text.render_failure`) against the prompt's metadata
(:func:`cotgen.reflect.text.parse_prompt`): an answer of the same form as the training
targets, with the evaluator's facts replaced by what the judge saw.

:class:`ReflectiveJudge` is the Judge interface (``score`` for the paper's four
questions, answered by the judge exactly as before) plus ``reflect(prompts, images)``
-> ``"yes"`` or the reflection, i.e. "reflection" is one more question. The reflection
question for text-generating judges (the VLM route, :func:`vlm_reflect`) is
:data:`REFLECTION_QUESTION`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from cotgen.reflect.text import COLORS, KINDS, MAX_COUNT_SEEN, RELATIONS, YES, Failure, parse_prompt, render_failure
from cotgen.reward.judge import check_batch
from cotgen.reward.object_judge import ObjectJudge, ObjectJudgeConfig, ObjectJudgeModel, image_features

REFLECTION_QUESTION = ("Does this image accurately represent the prompt? Answer yes, or say in one sentence what is "
                       "wrong with it.")
MAX_INCLUDES = 2  # GenEval prompts have one or two includes
REFLECTOR_DIR = "reflector"


class ObjectReflectorConfig(ObjectJudgeConfig):
    """:class:`ObjectJudgeConfig` plus the reflection head's sizes (fixed by the world:
    kinds, includes, counts 0..MAX_COUNT_SEEN, colours + none, relations + none)."""

    model_type = "cotgen-object-reflector"

    def __init__(self, max_includes: int = MAX_INCLUDES, **kwargs) -> None:
        self.max_includes = max_includes
        super().__init__(**kwargs)


class ObjectReflectorModel(ObjectJudgeModel):
    """The judge with a reflection head (see the module). ``forward`` is the judge's
    yes/no forward, unchanged; :meth:`reflect_logits` / :meth:`reflection_loss` are the
    reflection question's."""

    config_class = ObjectReflectorConfig

    def __init__(self, config: ObjectReflectorConfig) -> None:
        super().__init__(config)
        d = config.hidden_size
        self.reflection_query = nn.Parameter(torch.zeros(d))
        self.reflection_heads = nn.ModuleDict({
            "kind": nn.Linear(d, len(KINDS)),
            "include": nn.Linear(d, config.max_includes),
            "count": nn.Linear(d, MAX_COUNT_SEEN + 1),
            "color": nn.Linear(d, len(COLORS) + 1),
            "relation": nn.Linear(d, len(RELATIONS) + 1),
        })
        self.post_init()

    def _encode(self, crops, geometry, object_mask, words):
        """Encoder state of the reflection query over [objects][words], and the perception logits."""
        q = self.reflection_query + self.progress(torch.ones(len(words), 1, device=words.device))  # a final image
        h, tokens = self.query_state(q, crops, geometry, object_mask, words)
        return h, tokens.shape_logits, tokens.color_logits

    def reflect_logits(self, crops, geometry, object_mask, words) -> dict[str, torch.Tensor]:
        """Logits of each reflection head: name -> ``(B, classes)``."""
        h, _, _ = self._encode(crops, geometry, object_mask, words)
        return {k: head(h) for k, head in self.reflection_heads.items()}

    def reflection_loss(self, crops, geometry, object_mask, words, targets: dict[str, torch.Tensor],
                        shape_targets=None, color_targets=None) -> torch.Tensor:
        """Cross-entropy of every head (targets long ``(B,)``, -100 = not said), plus the
        perception loss when its soft targets are given (as the judge's training)."""
        h, shape_logits, color_logits = self._encode(crops, geometry, object_mask, words)
        loss = h.new_zeros(())
        for k, head in self.reflection_heads.items():
            t = targets[k]
            if (t != -100).any():
                loss = loss + nn.functional.cross_entropy(head(h), t, ignore_index=-100)
        if shape_targets is not None and color_targets is not None:
            loss = loss + self.perception_loss(object_mask, shape_logits, color_logits, shape_targets, color_targets)
        return loss


def failure_targets(failure: Failure | None) -> dict[str, int]:
    """Head targets of a failure (None: a correct image); -100 where nothing is said."""
    if failure is None:
        return {"kind": 0, "include": -100, "count": -100, "color": -100, "relation": -100}
    return {
        "kind": KINDS.index(failure.kind),
        "include": min(failure.include, MAX_INCLUDES - 1),
        "count": failure.count_seen if failure.kind in ("missing", "count") and failure.count_seen is not None else -100,
        "color": (COLORS.index(failure.color_seen) if failure.color_seen else len(COLORS)) if failure.kind == "color" else -100,
        "relation": ((RELATIONS.index(failure.relation_seen) if failure.relation_seen else len(RELATIONS))
                     if failure.kind == "position" else -100),
    }


def decode_failures(logits: dict[str, torch.Tensor], metadatas: Sequence[dict], force: bool = False) -> list[Failure | None]:
    """Structured failures from head logits (None = "yes"). With ``force`` a failure is
    always named (the most likely kind other than ok). Predictions the prompt cannot
    have (an include it lacks, a position failure without a relation, a colour failure
    without a colour) are ruled out."""
    out = []
    for i, meta in enumerate(metadatas):
        inc = meta["include"]
        kind_scores = logits["kind"][i].float().clone()
        inc_scores = logits["include"][i].float().clone()
        inc_scores[len(inc):] = -math.inf
        if not any("position" in r for r in inc):
            kind_scores[KINDS.index("position")] = -math.inf
        if not any("color" in r for r in inc):
            kind_scores[KINDS.index("color")] = -math.inf
        if not any(r["count"] > 1 for r in inc) and not meta.get("exclude"):
            kind_scores[KINDS.index("count")] = -math.inf
        if force:
            kind_scores[0] = -math.inf
        kind = KINDS[int(kind_scores.argmax())]
        if kind == "ok":
            out.append(None)
            continue
        if kind == "position":
            j = next(j for j, r in enumerate(inc) if "position" in r)
        elif kind == "color":
            allowed = [j for j, r in enumerate(inc) if "color" in r]
            j = max(allowed, key=lambda a: inc_scores[a])
        elif kind == "count":
            allowed = [j for j, r in enumerate(inc) if r["count"] > 1] or [0]
            j = max(allowed, key=lambda a: inc_scores[a])
        else:
            j = int(inc_scores.argmax())
        count = logits["count"][i].float().clone()
        if kind == "missing":
            seen_count = 0
        else:
            count[0] = -math.inf
            count[inc[j]["count"]] = -math.inf  # a count failure saw another count than asked
            seen_count = int(count.argmax())
        color = logits["color"][i].float().clone()
        if "color" in inc[j]:
            color[COLORS.index(inc[j]["color"])] = -math.inf
        c = int(color.argmax())
        rel = logits["relation"][i].float().clone()
        if "position" in inc[j]:
            rel[RELATIONS.index(inc[j]["position"][0])] = -math.inf
        r = int(rel.argmax())
        out.append(Failure(kind, j, count_seen=seen_count if kind in ("missing", "count") else None,
                           color_seen=COLORS[c] if kind == "color" and c < len(COLORS) else None,
                           relation_seen=RELATIONS[r] if kind == "position" and r < len(RELATIONS) else None))
    return out


class ReflectiveJudge(ObjectJudge):
    """The object judge (Judge interface: ``score``, answered by ``judge``'s model, as
    before) plus the reflection question (``reflect``) answered by ``reflector``.

    Args:
        judge: the trained :class:`ObjectJudge`.
        reflector: an :class:`ObjectReflectorModel` (trained by :func:`train_reflector`).
        seed: seed of the wording drawn for each reflection (fixed: same image, same text).
    """

    def __init__(self, judge: ObjectJudge, reflector: ObjectReflectorModel, seed: int = 0) -> None:
        super().__init__(judge.model, judge.text_tokenizer)
        self.reflector = reflector.eval()
        self.seed = seed

    @torch.no_grad()
    def failures(self, prompts: Sequence[str], images, force: bool = False) -> list[Failure | None]:
        """The structured failure of each (prompt, image); None = "yes"."""
        check_batch(prompts, images, None)
        if not len(prompts):
            return []
        feats = image_features(images, self.reflector.config)
        logits = self.reflector.reflect_logits(**feats, words=self.encode_prompts(prompts))
        return decode_failures(logits, [parse_prompt(p) for p in prompts], force)

    def reflect(self, prompts: Sequence[str], images, force: bool = False) -> list[str]:
        """``"yes"`` or a one-sentence reflection for each (prompt, image); with ``force``
        always a reflection (the search asks once the outcome score said no)."""
        out = []
        for i, (p, f) in enumerate(zip(prompts, self.failures(prompts, images, force))):
            rng = np.random.default_rng([self.seed, i, sum(map(ord, p))])
            out.append(YES if f is None else render_failure(f, parse_prompt(p), rng))
        return out

    def save_pretrained(self, path: str | Path) -> None:
        """``model/`` + ``text_tokenizer/`` (the judge, as :class:`ObjectJudge`) and ``reflector/``."""
        super().save_pretrained(path)
        self.reflector.save_pretrained(Path(path) / REFLECTOR_DIR)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ReflectiveJudge:
        """Raises FileNotFoundError naming what is missing."""
        path = Path(path)
        if not (path / REFLECTOR_DIR / "config.json").is_file():
            raise FileNotFoundError(f"no reflective judge at {path} ({REFLECTOR_DIR}/config.json missing); "
                                    "run `dvc repro reflect/dvc.yaml:reflect_judge`")
        return cls(ObjectJudge.from_pretrained(path), ObjectReflectorModel.from_pretrained(path / REFLECTOR_DIR))


def reflector_from_judge(judge: ObjectJudge) -> ObjectReflectorModel:
    """A reflector initialised with the judge's weights (reflection head fresh)."""
    import inspect

    names = [k for k in inspect.signature(ObjectJudgeConfig.__init__).parameters if k not in ("self", "kwargs")]
    cfg = ObjectReflectorConfig(**{k: getattr(judge.model.config, k) for k in names})
    model = ObjectReflectorModel(cfg)
    missing, unexpected = model.load_state_dict(judge.model.state_dict(), strict=False)
    if unexpected or any(not k.startswith("reflection_") for k in missing):
        raise ValueError(f"judge and reflector weights disagree: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():  # the query starts as the outcome question
        from cotgen.reward.object_judge import QUESTION_IDS

        model.reflection_query.copy_(model.questions.weight[QUESTION_IDS["outcome"]])
    return model


def train_reflector(
    judge: ObjectJudge,
    traj,
    examples: Sequence[dict],
    image_tokenizer,
    steps: int = 1000,
    batch_size: int = 64,
    learning_rate: float = 5e-4,
    seed: int = 0,
    max_seconds: float | None = None,
    perception_labeller=None,
    progress: bool = True,
) -> tuple[ObjectReflectorModel, dict]:
    """Train the reflection head (and fine-tune the judge's encoder under it) on the
    ``train`` examples of :func:`cotgen.reflect.text.reflection_examples`; AdamW with
    linear warm-up and cosine decay, ``max_seconds`` wall-clock cap. Returns the model
    and ``{"steps", "seconds", "first_loss", "last_loss"}`` (mean of the first / last
    tenth of the steps)."""
    from transformers import get_cosine_schedule_with_warmup

    from cotgen.reward.train import FeatureBank

    torch.manual_seed(seed)
    train = [e for e in examples if e["split"] == "train"]
    if not train:
        raise ValueError("no training reflection examples")
    model = reflector_from_judge(judge)
    final = traj.num_steps
    keyed = [{**e, "step": final} for e in train]
    bank = FeatureBank(traj, image_tokenizer, keyed, model.config, progress, perception_labeller=perception_labeller)
    rows = torch.tensor([bank.index[(e["path"], final)] for e in train])
    words = judge.encode_prompts([traj.paths[e["path"]]["prompt"] for e in train])
    targets = {k: torch.tensor([failure_targets(Failure(**e["failure"]) if e["failure"] else None)[k] for e in train])
               for k in ("kind", "include", "count", "color", "relation")}
    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    sched = get_cosine_schedule_with_warmup(opt, min(100, steps // 10), steps)
    gen = torch.Generator().manual_seed(seed)
    losses, start = [], time.monotonic()
    model.train()
    for _ in tqdm(range(steps), desc="reflector", disable=not progress):
        idx = torch.randint(len(train), (min(batch_size, len(train)),), generator=gen)
        feats = bank.get(rows[idx].tolist())
        loss = model.reflection_loss(feats["crops"], feats["geometry"], feats["object_mask"], words[idx],
                                     {k: v[idx] for k, v in targets.items()}, feats.get("shape_targets"),
                                     feats.get("color_targets"))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if max_seconds is not None and time.monotonic() - start > max_seconds:
            break
    model.eval()
    tenth = max(1, len(losses) // 10)
    return model, {"steps": len(losses), "seconds": time.monotonic() - start, "train_examples": len(train),
                   "first_loss": float(np.mean(losses[:tenth])), "last_loss": float(np.mean(losses[-tenth:]))}


def evaluate_reflections(judge: ReflectiveJudge, traj, examples: Sequence[dict], image_tokenizer,
                         batch_size: int = 256) -> dict:
    """Held-out reflection metrics on ``examples`` (their images decoded from ``traj``):

    - ``kind_accuracy``: over wrong images, the forced reflection names the evaluator's
      primary failure kind (the bar: >= 0.8); ``kind_accuracy_any``: names one of the
      evaluator's failure kinds; per kind in ``by_kind``;
    - ``include_accuracy``, ``count_accuracy`` (count failures: the count seen),
      ``color_accuracy`` (colour failures: the colour seen);
    - ``yes_accuracy``: unforced, the reflection is "yes" exactly when the image is correct;
    - ``examples``: a few (prompt, evaluator reason, reflection) for people to read.
    """
    from cotgen.reward.train import decode_steps

    final = traj.num_steps
    rows = list(examples)
    preds, forced = [], []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s : s + batch_size]
        images = decode_steps(traj, image_tokenizer, [(e["path"], final) for e in chunk])
        prompts = [traj.paths[e["path"]]["prompt"] for e in chunk]
        preds += judge.failures(prompts, images)
        forced += judge.failures(prompts, images, force=True)
    wrong = [(e, f) for e, f in zip(rows, forced) if e["kind"] != "ok"]
    out: dict = {"examples_n": len(rows), "wrong_n": len(wrong)}
    if wrong:
        out["kind_accuracy"] = float(np.mean([f.kind == e["kind"] for e, f in wrong]))
        out["kind_accuracy_any"] = float(np.mean([f.kind in e["kinds"] for e, f in wrong]))
        out["majority_kind_rate"] = max(float(np.mean([e["kind"] == k for e, _ in wrong])) for k in KINDS)
        out["by_kind"] = {k: {"n": sum(e["kind"] == k for e, _ in wrong),
                              "accuracy": float(np.mean([f.kind == k for e, f in wrong if e["kind"] == k]))}
                          for k in KINDS[1:] if any(e["kind"] == k for e, _ in wrong)}
        same = [(e, f) for e, f in wrong if f.kind == e["kind"]]
        out["include_accuracy"] = float(np.mean([f.include == e["failure"]["include"] for e, f in same])) if same else None
        cnt = [(e, f) for e, f in same if e["kind"] == "count"]
        out["count_accuracy"] = float(np.mean([f.count_seen == e["failure"]["count_seen"] for e, f in cnt])) if cnt else None
        col = [(e, f) for e, f in same if e["kind"] == "color"]
        out["color_accuracy"] = float(np.mean([f.color_seen == e["failure"]["color_seen"] for e, f in col])) if col else None
    out["yes_accuracy"] = float(np.mean([(p is None) == (e["kind"] == "ok") for e, p in zip(rows, preds)])) if rows else None
    rng = np.random.default_rng(0)
    show = [wrong[i] for i in rng.choice(len(wrong), size=min(8, len(wrong)), replace=False)] if wrong else []
    out["samples"] = [{"prompt": traj.paths[e["path"]]["prompt"], "reason": traj.paths[e["path"]]["reason"],
                       "target": e["text"], "reflection": render_failure(f, traj.paths[e["path"]]["metadata"])}
                      for e, f in show]
    return out


def vlm_reflect(judge, prompts: Sequence[str], images, max_new_tokens: int = 32) -> list[str]:
    """The reflection question put to a VLM judge (:class:`cotgen.reward.vlm_judge.VLMJudge`,
    the real-model route): its chat template, greedy generation, the answer's text.
    A VLM fine-tuned on :func:`vlm_reflection_rows` answers ``"yes"`` or a reflection."""
    check_batch(prompts, images, None)
    if not len(prompts):
        return []
    texts = [judge.processor.apply_chat_template(_vlm_messages(p), add_generation_prompt=True, tokenize=False)
             for p in prompts]
    inputs = judge.processor(images=[im.convert("RGB") for im in images], text=texts, return_tensors="pt",
                             padding=True, padding_side="left")
    with torch.no_grad():
        out = judge.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1]:]
    return [t.strip() for t in judge.processor.tokenizer.batch_decode(new, skip_special_tokens=True)]


def _vlm_messages(prompt: str, answer: str | None = None) -> list[dict]:
    out = [{"role": "user", "content": [{"type": "image"},
                                        {"type": "text", "text": f'The prompt is " {prompt} " . {REFLECTION_QUESTION}'}]}]
    if answer is not None:
        out.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return out


def vlm_reflection_rows(prompts: Sequence[str], images, texts: Sequence[str]) -> list[dict]:
    """Conversational prompt-completion rows (trl ``SFTTrainer``) teaching a VLM judge
    the reflection question: image + prompt + :data:`REFLECTION_QUESTION` -> ``text``."""
    return [{"images": [im.convert("RGB")], "prompt": _vlm_messages(p), "completion": _vlm_messages(p, t)[1:]}
            for p, im, t in zip(prompts, images, texts)]

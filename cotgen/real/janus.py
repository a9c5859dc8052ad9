"""Janus-Pro as cotgen's Generator (DESIGN section 4; issue 9).

``JanusForConditionalGeneration`` generates an image as ``g*g`` VQ codes in raster order
(Janus-Pro: 24x24 = 576 codes of a 16,384-entry codebook, 384x384 pixels). The language
model reads the chat-formatted prompt ending in ``<begin_of_image>``; every generated
code re-enters through ``generation_embeddings`` + ``generation_aligner``
(:meth:`~transformers.JanusForConditionalGeneration.prepare_embeddings_for_image_generation`)
and the next code is predicted by ``generation_head`` (not ``lm_head``).

:class:`JanusGenerator` wraps a model and its ``JanusProcessor``; :class:`JanusSampler`
mirrors :class:`cotgen.generator.sampling.StepwiseSampler` (``paths``, ``alive``,
``drop``, ``step``, ``done``, ``images``, ``token_grid``), so :func:`cotgen.search.search`
drives it unchanged (it asks the generator for ``stepwise_sampler``):

- **CFG** as in Janus: the unconditional row is the prompt with every token except BOS
  and ``<begin_of_image>`` replaced by the pad token; ``logits = cond + s * (cond -
  uncond)``, so Janus's ``cfg_weight`` w is ``cfg_scale = w - 1`` (Janus-Pro's default 5
  is ``cfg_scale 4``). ``cfg_scale = 0`` skips the unconditional rows.
- **Batching**: prompts are left-padded with an attention mask and explicit position ids,
  so a prompt gives the same logits inside a batch as alone.
- **KV cache** (``DynamicCache``) and **path dropping**: dropped paths leave the cache,
  the attention mask and the position rows at once (``batch_select_indices``).
- **Intermediate images**: codes not generated yet are filled with ``fill_code`` for the
  VQ decoder, and their cells are painted grey afterwards (``paint_unknown``).
- **DPO**: :meth:`JanusGenerator.image_logprobs` scores images through the generation
  head; :func:`train_janus_dpo` runs trl's ``DPOTrainer`` (cotgen/align's trainer, config
  and loss) on :class:`JanusImageLM`, a causal-LM view of Janus whose output layer *is*
  the generation head, so trl's per-token log-probabilities equal ``image_logprobs``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Sequence
from pathlib import Path as FsPath

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

from cotgen.generator.sampling import Path, SamplingConfig, path_seed

#: grey painted over cells not generated yet (intermediate images)
UNKNOWN_RGB = (128, 128, 128)


def pixels_to_pil(x: torch.Tensor) -> list[Image.Image]:
    """``(B, 3, H, W)`` float in [-1, 1] -> RGB PIL images."""
    arr = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a, "RGB") for a in arr]


class JanusGenerator:
    """Janus-Pro behind the Generator interface.

    Args:
        model: a ``JanusForConditionalGeneration`` (eval mode is set).
        processor: its ``JanusProcessor`` (tokenizer with ``boi_token``; a chat template
            formats prompts when it has one, as Janus-Pro's does).
        fill_code: code given to positions not generated yet when decoding intermediate
            images.
        paint_unknown: paint those cells grey after decoding.
    Raises:
        ValueError: the tokenizer lacks a pad or ``<begin_of_image>`` token.
    """

    def __init__(self, model, processor, fill_code: int = 0, paint_unknown: bool = True) -> None:
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        vq = model.config.vq_config
        self.codebook_size = int(vq.num_embeddings)
        self.grid_size = int(vq.num_patches)
        self.num_image_tokens = self.grid_size**2
        self.fill_code = int(fill_code)
        self.paint_unknown = paint_unknown
        self.pad_id = self.tokenizer.pad_token_id
        self.boi_id = self.tokenizer.convert_tokens_to_ids(getattr(self.tokenizer, "boi_token", None) or "<begin_of_image>")
        self.bos_id = self.tokenizer.bos_token_id
        if self.pad_id is None or self.boi_id is None or self.boi_id == self.tokenizer.unk_token_id:
            raise ValueError(f"Janus tokenizer needs a pad and a <begin_of_image> token (pad {self.pad_id}, boi {self.boi_id})")

    # ------------------------------------------------------------------ devices
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.model.generation_head.vision_head.weight.dtype

    @property
    def image_size(self) -> int:
        """Side of the images it makes, pixels: the code grid times the VQ decoder's
        upsampling (one doubling per level after the first; Janus-Pro: 24 x 16 = 384)."""
        vq = self.model.config.vq_config
        return self.grid_size * 2 ** (len(vq.channel_multiplier) - 1)

    @property
    def max_prompt_tokens(self) -> int:
        """Most prompt tokens (chat template and ``<begin_of_image>`` included) that leave
        room for the image's codes in the language model's positions."""
        return int(self.model.config.get_text_config().max_position_embeddings) - self.num_image_tokens

    def check_prompt(self, prompt: str) -> None:
        """ValueError naming the problem unless ``prompt`` is non-empty and, formatted
        (:meth:`prompt_ids`), at most :attr:`max_prompt_tokens` tokens. Any text
        tokenizes (no out-of-vocabulary words), so there is no vocabulary check."""
        tokens = len(self.prompt_ids([prompt])[0])
        if tokens > self.max_prompt_tokens:
            raise ValueError(f"prompt has {tokens} tokens (chat template included), at most "
                             f"{self.max_prompt_tokens} fit before the {self.num_image_tokens} image codes")

    # ------------------------------------------------------------------ prompts
    def prompt_text(self, prompt: str) -> str:
        """The prompt as Janus-Pro reads it (its chat template, generation prompt on);
        ``<begin_of_image>`` is appended when tokenizing."""
        if not prompt or not prompt.strip():
            raise ValueError("empty prompt")
        if getattr(self.processor, "chat_template", None):
            msgs = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
            return self.processor.apply_chat_template(msgs, add_generation_prompt=True)
        return prompt

    def prompt_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids per prompt, unpadded, ending in ``<begin_of_image>``."""
        out = []
        for p in prompts:
            enc = self.processor(text=[self.prompt_text(p)], generation_mode="image", return_tensors="pt")
            ids = enc["input_ids"][0][enc["attention_mask"][0].bool()].tolist()
            if ids[-1] != self.boi_id:
                ids.append(self.boi_id)
            out.append(ids)
        return out

    def unconditional(self, ids: Sequence[int]) -> list[int]:
        """Janus's null prompt: every token but BOS and ``<begin_of_image>`` -> pad."""
        return [t if t in (self.bos_id, self.boi_id) else self.pad_id for t in ids]

    def batch(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-pad id rows: ``(input_ids, attention_mask, position_ids)``, ``(B, L)``."""
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, length - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, length - len(r):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        return ids, mask, pos

    def embed(self, input_ids: torch.Tensor | None = None, codes: torch.Tensor | None = None) -> torch.Tensor:
        """Text embeddings (language model) and/or image-code embeddings (generation
        embeddings + aligner), concatenated along the sequence."""
        parts = []
        if input_ids is not None:
            parts.append(self.model.get_input_embeddings()(input_ids.to(self.device)))
        if codes is not None:
            parts.append(self.model.prepare_embeddings_for_image_generation(codes.to(self.device)))
        return torch.cat(parts, dim=1)

    def forward(self, embeds, attention_mask, position_ids, cache=None) -> tuple[torch.Tensor, object]:
        """Language model + generation head: ``(image-code logits (B, T, K) float32, cache)``."""
        out = self.model.model.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask.to(self.device),
            position_ids=position_ids.to(self.device), cache=cache, use_cache=cache is not None,
        )
        return self.model.model.generation_head(out.last_hidden_state).float(), cache

    # ------------------------------------------------------------------ sampling
    def stepwise_sampler(self, prompts: Sequence[str], config: SamplingConfig, prefix_tokens=None) -> JanusSampler:
        """A :class:`JanusSampler` (what :func:`cotgen.search.search` asks for)."""
        return JanusSampler(self, prompts, config, prefix_tokens)

    def sample(self, prompts: Sequence[str], config: SamplingConfig) -> list[list[Image.Image]]:
        """Plain sampling: ``config.n`` final images per prompt."""
        sampler = self.stepwise_sampler(prompts, config)
        sampler.run()
        images = sampler.images()
        return [images[i * config.n : (i + 1) * config.n] for i in range(len(prompts))]

    # ------------------------------------------------------------------ scoring
    def image_logprobs(self, prompts: Sequence[str], image_tokens: torch.Tensor) -> torch.Tensor:
        """log p(image codes | prompt) through the generation head, summed over the
        ``g*g`` codes: ``(B,)`` float32 (conditional row, no guidance)."""
        codes = torch.as_tensor(image_tokens, dtype=torch.long).reshape(len(prompts), -1)
        if codes.shape[1] != self.num_image_tokens:
            raise ValueError(f"expected {self.num_image_tokens} image tokens per image, got {codes.shape[1]}")
        if codes.min() < 0 or codes.max() >= self.codebook_size:
            raise ValueError(f"image codes must lie in [0, {self.codebook_size})")
        ids, mask, pos = self.batch(self.prompt_ids(prompts))
        n = codes.shape[1]
        mask = torch.cat([mask, torch.ones(len(prompts), n - 1, dtype=torch.long)], dim=1)
        pos = torch.cat([pos, pos[:, -1:] + torch.arange(1, n)], dim=1)
        logits, _ = self.forward(self.embed(ids, codes[:, :-1]), mask, pos)
        logp = torch.log_softmax(logits[:, ids.shape[1] - 1 :], dim=-1)
        return logp.gather(-1, codes.to(logp.device).unsqueeze(-1)).squeeze(-1).sum(-1).cpu()

    # ------------------------------------------------------------------ images
    @torch.no_grad()
    def decode(self, codes: torch.Tensor, known: torch.Tensor | None = None) -> list[Image.Image]:
        """Codes ``(B, g, g)`` or ``(B, g*g)`` -> RGB PIL images through the VQ decoder;
        with ``known`` (same shape, bool), unknown positions are filled with
        ``fill_code`` and (``paint_unknown``) their cells painted grey."""
        g = self.grid_size
        codes = torch.as_tensor(codes, dtype=torch.long).reshape(-1, g * g).clone()
        if known is not None:
            known = torch.as_tensor(known, dtype=torch.bool).reshape(-1, g * g)
            codes[~known] = self.fill_code
        pixels = self.model.decode_image_tokens(codes.to(self.device)).permute(0, 3, 1, 2).float()
        if known is not None and self.paint_unknown:
            h, w = pixels.shape[-2:]
            cell = (~known).view(-1, 1, g, g).float()
            cell = torch.nn.functional.interpolate(cell, size=(h, w), mode="nearest").to(pixels.device).bool()
            grey = torch.tensor(UNKNOWN_RGB, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1) / 127.5 - 1
            pixels = torch.where(cell, grey, pixels)
        return pixels_to_pil(pixels)

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, path: str | FsPath) -> None:
        """``model/`` and ``processor/`` under ``path`` (safetensors)."""
        path = FsPath(path)
        self.model.save_pretrained(path / "model")
        self.processor.save_pretrained(path / "processor")

    @classmethod
    def from_pretrained(cls, path: str | FsPath, dtype=None, device=None, **kwargs) -> JanusGenerator:
        """Load a folder written by :meth:`save_pretrained` (``model/`` + ``processor/``)
        or a Janus-Pro checkpoint folder / hub id (``deepseek-community/Janus-Pro-7B``);
        see :func:`cotgen.real.config.load_janus` for the checked, offline-aware loader."""
        from transformers import JanusForConditionalGeneration, JanusProcessor

        path = FsPath(path) if FsPath(str(path)).exists() else path
        mpath, ppath = (path / "model", path / "processor") if isinstance(path, FsPath) and (path / "model").is_dir() else (path, path)
        model = JanusForConditionalGeneration.from_pretrained(mpath, dtype=dtype or "auto")
        if device is not None:
            model = model.to(device)
        return cls(model, JanusProcessor.from_pretrained(ppath), **kwargs)


class JanusSampler:
    """N paths per prompt with Janus, one step (``tokens_per_step`` codes) at a time.

    Same interface and semantics as :class:`cotgen.generator.sampling.StepwiseSampler`:
    per-path seeds (a prompt gives the same images alone or in a batch), CFG, temperature,
    top-k, KV cache, ``drop`` that frees rows, roll-outs from ``prefix_tokens``, per-path
    ``image_tokens`` and ``forward_passes``.
    """

    def __init__(self, generator: JanusGenerator, prompts: Sequence[str], config: SamplingConfig,
                 prefix_tokens: torch.Tensor | None = None) -> None:
        self.g = generator
        self.prompts = list(prompts)
        self.config = config
        self.tokens_per_step = config.check(generator.num_image_tokens, generator.grid_size)
        self.num_steps = generator.num_image_tokens // self.tokens_per_step
        self.step_index = 0
        self.cfg = config.cfg_scale > 0
        n, P = config.n, len(self.prompts)
        self.paths = [Path(i, p, j) for i, (p, j) in enumerate((p, j) for p in range(P) for j in range(n))]
        start = torch.zeros((P, 0), dtype=torch.long)
        if prefix_tokens is not None:
            start = torch.as_tensor(prefix_tokens, dtype=torch.long).reshape(P, -1)
            length = start.shape[1]
            if length % self.tokens_per_step or length >= generator.num_image_tokens:
                raise ValueError(f"prefix of {length} tokens must be a multiple of the step ({self.tokens_per_step}) "
                                 f"and shorter than the image ({generator.num_image_tokens})")
            if length and (start.min() < 0 or start.max() >= generator.codebook_size):
                raise ValueError(f"prefix codes must lie in [0, {generator.codebook_size})")
            self.step_index = length // self.tokens_per_step
            for path in self.paths:
                path.tokens = start[path.prompt_index].tolist()
        self._rngs = {p.id: torch.Generator().manual_seed(path_seed(config.seed, self.prompts[p.prompt_index], p.candidate))
                      for p in self.paths}
        self._rows = [p.id for p in self.paths]
        rows = generator.prompt_ids(self.prompts)
        if self.cfg:
            rows = rows + [generator.unconditional(r) for r in rows]
        ids, mask, pos = generator.batch(rows)
        L = start.shape[1]
        if L:
            starts = torch.cat([start, start]) if self.cfg else start
            mask = torch.cat([mask, torch.ones(len(rows), L, dtype=torch.long)], dim=1)
            pos = torch.cat([pos, pos[:, -1:] + torch.arange(1, L + 1)], dim=1)
            embeds = generator.embed(ids, starts)
        else:
            embeds = generator.embed(ids)
        self._cache = DynamicCache()
        with torch.no_grad():
            logits, _ = generator.forward(embeds, mask, pos, self._cache)
        expand = torch.arange(P).repeat_interleave(n)
        if self.cfg:
            expand = torch.cat([expand, expand + P])
        self._cache.batch_select_indices(expand.to(generator.device))
        self._mask = mask[expand]
        self._next_pos = pos[expand, -1] + 1
        self._next_logits = logits[:, -1][expand.to(logits.device)]
        for path in self.paths:
            path.forward_passes += 2 if self.cfg else 1

    # ------------------------------------------------------------------ state
    @property
    def done(self) -> bool:
        return self.step_index >= self.num_steps or not self._rows

    def alive(self) -> list[Path]:
        return [self.paths[i] for i in self._rows]

    def drop(self, path_ids: Iterable[int]) -> None:
        """Stop the given paths now; their rows leave the batch, the KV cache and the
        attention mask. Raises KeyError for an unknown path id."""
        ids = set(path_ids)
        for i in ids:
            if not 0 <= i < len(self.paths):
                raise KeyError(f"no path {i}")
        keep = [r for r, pid in enumerate(self._rows) if pid not in ids]
        if len(keep) == len(self._rows):
            return
        for pid in ids:
            path = self.paths[pid]
            if path.alive:
                path.alive, path.dropped_at_step = False, self.step_index
        index = torch.tensor(keep, dtype=torch.long)
        if self.cfg:
            index = torch.cat([index, index + len(self._rows)])
        self._rows = [self._rows[r] for r in keep]
        if self._rows:
            self._cache.batch_select_indices(index.to(self.g.device))
            self._next_logits = self._next_logits[index.to(self._next_logits.device)]
            self._mask, self._next_pos = self._mask[index], self._next_pos[index]

    @property
    def batch_rows(self) -> int:
        """Rows in the model's batch now (alive paths, doubled with CFG)."""
        return len(self._rows) * (2 if self.cfg else 1)

    # ------------------------------------------------------------------ sampling
    def _guided(self) -> torch.Tensor:
        logits = self._next_logits
        if not self.cfg:
            return logits
        cond, uncond = logits.chunk(2)
        return cond + self.config.cfg_scale * (cond - uncond)

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float().cpu() / self.config.temperature
        if self.config.top_k and self.config.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.config.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        cdf = torch.softmax(logits, dim=-1).cumsum(-1)
        u = torch.stack([torch.rand(1, generator=self._rngs[pid], dtype=torch.float32) for pid in self._rows])
        return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1).clamp_(max=logits.shape[-1] - 1)

    @torch.no_grad()
    def step(self) -> None:
        """Generate the next ``tokens_per_step`` codes of every alive path.
        Raises RuntimeError when finished."""
        if self.done:
            raise RuntimeError("sampling is finished (all steps done or no path alive)")
        for _ in range(self.tokens_per_step):
            codes = self._sample(self._guided())
            for pid, code in zip(self._rows, codes.tolist()):
                self.paths[pid].tokens.append(code)
                self.paths[pid].image_tokens += 1
            if len(self.paths[self._rows[0]].tokens) == self.g.num_image_tokens:
                break  # the last code needs no forward pass
            if self.cfg:
                codes = torch.cat([codes, codes])
            self._mask = torch.cat([self._mask, torch.ones(len(codes), 1, dtype=torch.long)], dim=1)
            logits, _ = self.g.forward(self.g.embed(codes=codes[:, None]), self._mask, self._next_pos[:, None], self._cache)
            self._next_pos = self._next_pos + 1
            self._next_logits = logits[:, -1]
            for pid in self._rows:
                self.paths[pid].forward_passes += 2 if self.cfg else 1
        self.step_index += 1

    def run(self) -> list[Path]:
        while not self.done:
            self.step()
        return self.paths

    # ------------------------------------------------------------------ images
    def token_grid(self, path_ids: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        ids = list(path_ids) if path_ids is not None else [p.id for p in self.paths]
        g = self.g.grid_size
        codes = torch.zeros(len(ids), g * g, dtype=torch.long)
        known = torch.zeros(len(ids), g * g, dtype=torch.bool)
        for row, pid in enumerate(ids):
            toks = self.paths[pid].tokens
            codes[row, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            known[row, : len(toks)] = True
        return codes.view(-1, g, g), known.view(-1, g, g)

    def images(self, path_ids: Sequence[int] | None = None) -> list[Image.Image]:
        """Intermediate (or final) images through the VQ decoder; unfinished positions
        filled (see :class:`JanusGenerator`)."""
        codes, known = self.token_grid(path_ids)
        if not len(codes):
            return []
        return self.g.decode(codes, None if bool(known.all()) else known)


# ---------------------------------------------------------------------------- DPO
class _ImageBackbone(nn.Module):
    """Unified ids -> the generation head's hidden features: ids ``< K`` are image codes
    (generation embeddings + aligner), ids ``>= K`` are text ids ``+ K`` (text embeddings);
    the language model runs on them and the output passes ``proj_out`` and the activation
    of ``generation_head`` (its last linear, ``vision_head``, is :class:`JanusImageLM`'s
    output layer)."""

    def __init__(self, janus) -> None:
        super().__init__()
        self.janus = janus
        self.codebook_size = janus.config.vq_config.num_embeddings

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        K = self.codebook_size
        is_image = input_ids < K
        text = self.janus.get_input_embeddings()((input_ids - K).clamp(min=0))
        image = self.janus.prepare_embeddings_for_image_generation(input_ids.clamp(max=K - 1))
        embeds = torch.where(is_image.unsqueeze(-1), image.to(text.dtype), text)
        out = self.janus.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                              position_ids=position_ids, use_cache=False)
        head = self.janus.model.generation_head
        return BaseModelOutput(last_hidden_state=head.activation_fn(head.proj_out(out.last_hidden_state)))


class JanusImageLM(PreTrainedModel):
    """A causal-LM view of Janus for trl's ``DPOTrainer``: vocabulary = ``K`` image codes
    followed by the text ids (text id ``t`` is ``K + t``); output layer = the generation
    head's ``vision_head`` (``K`` logits), so the log-softmax runs over image codes only,
    as in sampling and :meth:`JanusGenerator.image_logprobs`. The modules are Janus's own
    (shared, not copied)."""

    base_model_prefix = "backbone"
    main_input_name = "input_ids"
    _supports_sdpa = True

    def __init__(self, janus) -> None:
        super().__init__(janus.config)
        self.backbone = _ImageBackbone(janus)
        self.generation_config = janus.generation_config

    def get_output_embeddings(self):
        return self.backbone.janus.model.generation_head.vision_head

    def get_input_embeddings(self):
        return self.backbone.janus.get_input_embeddings()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, **kwargs):
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
        return CausalLMOutput(logits=self.get_output_embeddings()(hidden))


def janus_pairs_dataset(generator: JanusGenerator, pairs: Sequence[dict]):
    """Pre-tokenized preference pairs in :class:`JanusImageLM`'s ids: ``prompt_ids``
    (chat-formatted prompt + ``<begin_of_image>``, text ids + K), ``chosen_ids`` /
    ``rejected_ids`` (the ``g*g`` codes). Raises ValueError naming a bad pair."""
    from datasets import Dataset

    if not pairs:
        raise ValueError("no preference pairs to train on")
    K, rows = generator.codebook_size, []
    for i, (pair, ids) in enumerate(zip(pairs, generator.prompt_ids([p["prompt"] for p in pairs]))):
        row = {"prompt_ids": [K + t for t in ids]}
        for side in ("chosen", "rejected"):
            codes = torch.as_tensor(pair[side], dtype=torch.long).reshape(-1)
            if codes.numel() != generator.num_image_tokens or codes.min() < 0 or codes.max() >= K:
                raise ValueError(f"pair {i} ({pair['prompt']!r}): {side} must be {generator.num_image_tokens} codes in [0, {K})")
            row[f"{side}_ids"] = codes.tolist()
        rows.append(row)
    return Dataset.from_list(rows)


def janus_lora_config(rank: int = 8, alpha: int = 16, target_modules: Sequence[str] = ("q_proj", "v_proj")):
    """LoRA on the language model's layers only (not the understanding vision tower)."""
    from peft import LoraConfig

    names = "|".join(target_modules)
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                      target_modules=rf".*language_model\.layers\.\d+\..*\.({names})")


def build_janus_trainer(generator: JanusGenerator, pairs: Sequence[dict], args, lora, heldout: Sequence[dict] = (),
                        callbacks=()):
    """cotgen/align's ``ImageDPOTrainer`` (trl's DPOTrainer taking pre-tokenized pairs)
    on :class:`JanusImageLM` of ``generator.model`` (reference = adapters disabled)."""
    from cotgen.align.dpo import _trainer_class

    lm = JanusImageLM(generator.model)
    lm.train()
    return _trainer_class()(
        model=lm, args=args, train_dataset=janus_pairs_dataset(generator, pairs),
        eval_dataset=janus_pairs_dataset(generator, heldout) if heldout else None,
        processing_class=generator.tokenizer, peft_config=lora, callbacks=list(callbacks),
    )


def train_janus_dpo(
    generator: JanusGenerator,
    pairs: Sequence[dict],
    out_dir: str | FsPath,
    heldout: Sequence[dict] = (),
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    lora_rank: int = 8,
    lora_alpha: int = 16,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    steps: int = 100,
    batch_size: int = 8,
    learning_rate: float = 5e-4,
    warmup_steps: int = 0,
    seed: int = 0,
    copy_model: bool = True,
    progress: bool = True,
) -> tuple[JanusGenerator, dict]:
    """DPO with LoRA on Janus through trl (cotgen/align's config and trainer, trl's loss).

    ``pairs``: ``{"prompt", "chosen", "rejected"}`` with ``g*g`` codes per side. Writes
    ``out_dir/adapter`` (peft) and ``out_dir/generator`` (merged model + processor).
    ``copy_model=False`` trains ``generator.model`` in place (saves GPU memory for 7B).

    Returns ``(aligned generator, metrics)``: ``pairs``, ``steps``, ``seconds``,
    ``train_loss``, ``log`` (trl's loss / margin / accuracy per logged step) and, with
    ``heldout``, trl's eval metrics.
    """
    from cotgen.align.dpo import _history, dpo_config

    out_dir = FsPath(out_dir)
    model = copy.deepcopy(generator.model) if copy_model else generator.model
    text_cfg = model.config.get_text_config()
    saved_pad = text_cfg.pad_token_id, model.generation_config.pad_token_id
    policy = JanusGenerator(model, generator.processor, generator.fill_code, generator.paint_unknown)
    args = dpo_config(out_dir, beta, loss_type, steps, batch_size, learning_rate, warmup_steps, seed, progress)
    start = time.monotonic()
    trainer = build_janus_trainer(policy, pairs, args, janus_lora_config(lora_rank, lora_alpha, target_modules), heldout)
    result = trainer.train()
    metrics = {"pairs": len(pairs), "steps": int(trainer.state.global_step), "seconds": time.monotonic() - start,
               "train_loss": float(result.training_loss), **_history(trainer.state.log_history)}
    if heldout:
        metrics["heldout"] = {k.removeprefix("eval_"): float(v) for k, v in trainer.evaluate().items()
                              if isinstance(v, (int, float))}
    trainer.model.save_pretrained(out_dir / "adapter")
    trainer.model.merge_and_unload()  # merges into the shared Janus modules
    text_cfg.pad_token_id, model.generation_config.pad_token_id = saved_pad
    model.eval()
    aligned = JanusGenerator(model, generator.processor, generator.fill_code, generator.paint_unknown)
    aligned.save_pretrained(out_dir / "generator")
    return aligned, metrics


def pair_margins(generator: JanusGenerator, pairs: Sequence[dict]) -> np.ndarray:
    """``image_logprobs(chosen) - image_logprobs(rejected)`` per pair."""
    with torch.no_grad():
        prompts = [p["prompt"] for p in pairs]
        c = generator.image_logprobs(prompts, torch.tensor([p["chosen"] for p in pairs]))
        r = generator.image_logprobs(prompts, torch.tensor([p["rejected"] for p in pairs]))
    return (c - r).double().numpy()

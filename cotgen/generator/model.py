"""The embedded AR generator: a transformers ``LlamaForCausalLM`` over one sequence
``[prompt block][<boi>][image tokens in raster order]`` (LlamaGen style, DESIGN sections 3-4).

Vocabulary layout: text token ids ``[0, T)`` come from the text tokenizer (``T`` =
its size); image code ``k`` of the VQ codebook is token ``T + k``. The prompt block has
a fixed length ``prompt_len``: prompt words left-padded with ``<pad>``. The
unconditional ("null") prompt used for classifier-free guidance is a block of
``<pad>`` only, which condition dropout trains. Because every row has the same layout,
no attention mask is needed, and a prompt gives the same logits inside any batch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


class ImageTokenizer(Protocol):
    """What the generator needs of an image tokenizer (``cotgen.tokenizer.vq``)."""

    codebook_size: int
    grid_size: int

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, g, g)`` long codes -> ``(B, 3, H, W)`` float in [-1, 1]."""

    def decode_masked(self, tokens: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        """Like :meth:`decode`; positions where ``known`` is False drawn as background."""


GENERATOR_FILE = "generator.json"


class ShapesGenerator:
    """An AR text-to-image generator: LlamaForCausalLM + text tokenizer + VQ tokenizer.

    Args:
        model: the causal LM; its vocabulary must be ``len(text_tokenizer) + codebook_size``.
        text_tokenizer: word-level tokenizer with ``<pad>`` and ``<boi>``.
        image_tokenizer: VQ tokenizer (decodes token grids to images).
        prompt_len: words in the fixed prompt block.
    Raises:
        ValueError: the vocabulary sizes do not add up, or a special token is missing.
    """

    def __init__(
        self,
        model: LlamaForCausalLM,
        text_tokenizer: PreTrainedTokenizerFast,
        image_tokenizer: ImageTokenizer,
        prompt_len: int = 12,
    ) -> None:
        self.model = model
        self.text_tokenizer = text_tokenizer
        self.image_tokenizer = image_tokenizer
        self.prompt_len = prompt_len
        self.text_vocab = len(text_tokenizer)
        self.codebook_size = image_tokenizer.codebook_size
        self.grid_size = image_tokenizer.grid_size
        self.num_image_tokens = self.grid_size**2
        expected = self.text_vocab + self.codebook_size
        if model.config.vocab_size != expected:
            raise ValueError(
                f"model vocabulary {model.config.vocab_size} != text {self.text_vocab} + codebook {self.codebook_size}"
            )
        ids = {t: text_tokenizer.convert_tokens_to_ids(t) for t in ("<pad>", "<boi>")}
        if any(i is None or i == text_tokenizer.unk_token_id for i in ids.values()):
            raise ValueError(f"text tokenizer lacks a special token: {ids}")
        self.pad_id, self.boi_id = ids["<pad>"], ids["<boi>"]
        #: ``(split, shift)``: sequence indices from ``split`` on take RoPE position ``index - shift``
        #: (None: positions are the indices). PARM++'s self-correction generator sets it so that
        #: its new image shares the previous image's positions (:mod:`cotgen.reflect.corrector`).
        self.position_shift: tuple[int, int] | None = None
        #: PARM++'s copy input: an input at sequence index ``i`` in ``[copy_split, copy_split + g*g)``
        #: (it predicts image cell ``j = i - copy_split``) also receives :attr:`copy_embedding` of the
        #: code ``g*g`` indices earlier (cell ``j`` of the image before), so copying a cell is a
        #: lookup, not an attention pattern (:mod:`cotgen.reflect.corrector`). None: no copy input.
        self.copy_split: int | None = None
        self.copy_embedding: torch.nn.Embedding | None = None

    def position_ids(self, start: int, length: int) -> torch.Tensor | None:
        """RoPE positions of the sequence indices ``[start, start + length)``, long
        ``(length,)``, or None where they are the indices themselves (no
        :attr:`position_shift`): pass them to the model as ``position_ids``."""
        if self.position_shift is None:
            return None
        split, shift = self.position_shift
        index = torch.arange(start, start + length)
        return torch.where(index >= split, index - shift, index)

    def position_kwargs(self, start: int, length: int, rows: int, cached: bool = False) -> dict:
        """Keyword arguments of a model call over the sequence indices ``[start, start +
        length)`` for ``rows`` rows: ``{}`` without :attr:`position_shift`, else
        ``position_ids`` long ``(rows, length)`` and, for a call without a KV cache, an
        all-ones ``attention_mask`` (without one, transformers reads the drop in the
        positions as packed sequences and masks attention across it)."""
        pos = self.position_ids(start, length)
        if pos is None:
            return {}
        out = {"position_ids": pos[None].expand(rows, -1)}
        if not cached:
            out["attention_mask"] = torch.ones(rows, length, dtype=torch.long)
        return out

    def model_inputs(self, ids: torch.Tensor, start: int = 0, cached: bool = False,
                     context: torch.Tensor | None = None) -> dict:
        """Keyword arguments of a model call on the inputs ``ids`` ``(B, L)`` long (model ids),
        which sit at the sequence indices ``[start, start + L)``: ``input_ids`` (or, with a
        :attr:`copy_embedding`, ``inputs_embeds`` ``(B, L, hidden)`` in the model's dtype) and
        :meth:`position_kwargs`.

        Args:
            cached: the call extends a KV cache.
            context: ``(B, >= start + L - g*g)`` long, the sequence's ids from index 0, where
                the copy input reads the copied codes (default: ``ids`` itself, for a call
                from index 0); only read with a :attr:`copy_embedding`.
        Raises:
            ValueError: the copy input needs codes the context does not hold.
        """
        rows, length = ids.shape
        kw = self.position_kwargs(start, length, rows, cached)
        if self.copy_embedding is None:
            return {"input_ids": ids, **kw}
        embeds = self.model.get_input_embeddings()(ids)
        index = torch.arange(start, start + length)
        cell = index - self.copy_split
        inside = (cell >= 0) & (cell < self.num_image_tokens)
        if inside.any():
            context = ids if context is None else context
            source = index[inside] - self.num_image_tokens
            if source.min() < 0 or source.max() >= context.shape[1]:
                raise ValueError(f"the copy input reads indices {source.min()}..{source.max()}; "
                                 f"the context holds {context.shape[1]}")
            codes = (context[:, source] - self.text_vocab).clamp(0, self.codebook_size - 1)
            extra = torch.zeros_like(embeds)
            extra[:, inside] = self.copy_embedding(codes).to(embeds.dtype)
            embeds = embeds + extra
        return {"inputs_embeds": embeds, **kw}

    # ------------------------------------------------------------------ config
    @staticmethod
    def llama_config(text_vocab: int, codebook_size: int, prompt_len: int, grid_size: int, **size) -> LlamaConfig:
        """A LlamaConfig for this layout; ``size`` sets hidden_size, num_hidden_layers,
        num_attention_heads, intermediate_size (defaults: a ~2M-parameter model)."""
        defaults = dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512)
        defaults.update(size)
        return LlamaConfig(
            vocab_size=text_vocab + codebook_size,
            max_position_embeddings=prompt_len + 1 + grid_size**2,
            num_key_value_heads=defaults["num_attention_heads"],
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
            **defaults,
        )

    @property
    def sequence_length(self) -> int:
        return self.prompt_len + 1 + self.num_image_tokens

    @property
    def image_size(self) -> int:
        """Side of the images it makes, pixels."""
        return int(self.image_tokenizer.config.image_size)

    @property
    def max_prompt_tokens(self) -> int:
        """Most prompt tokens that fit (one per word: the prompt block)."""
        return self.prompt_len

    def check_prompt(self, prompt: str) -> None:
        """ValueError naming the problem unless ``prompt`` fits the prompt block (words in
        the vocabulary, at most :attr:`max_prompt_tokens`); see :meth:`encode_prompts`."""
        self.encode_prompts([prompt])

    # ------------------------------------------------------------------ prompts
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompt blocks, ``(P, prompt_len)`` long, words left-padded with ``<pad>``.

        Raises:
            ValueError: words outside the vocabulary (named), an empty prompt, or a
                prompt longer than ``prompt_len`` words.
        """
        from cotgen.tokenizer.text import encode_prompt

        rows = []
        for prompt in prompts:
            ids = encode_prompt(self.text_tokenizer, prompt)
            if not ids:
                raise ValueError("empty prompt")
            if len(ids) > self.prompt_len:
                raise ValueError(f"prompt has {len(ids)} words, at most {self.prompt_len} fit: {prompt!r}")
            rows.append([self.pad_id] * (self.prompt_len - len(ids)) + ids)
        return torch.tensor(rows, dtype=torch.long)

    def null_prompts(self, n: int) -> torch.Tensor:
        """``n`` unconditional prompt blocks (all ``<pad>``), ``(n, prompt_len)`` long."""
        return torch.full((n, self.prompt_len), self.pad_id, dtype=torch.long)

    def prefix(self, prompt_blocks: torch.Tensor) -> torch.Tensor:
        """``[prompt block][<boi>]``, ``(P, prompt_len + 1)`` long."""
        boi = torch.full((prompt_blocks.shape[0], 1), self.boi_id, dtype=torch.long)
        return torch.cat([prompt_blocks, boi], dim=1)

    def sequences(self, prompt_blocks: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Full training sequences ``(B, prompt_len + 1 + g*g)`` from prompt blocks
        ``(B, prompt_len)`` and image codes ``(B, g, g)`` or ``(B, g*g)`` (0..K-1)."""
        codes = image_tokens.reshape(image_tokens.shape[0], -1)
        if codes.shape[1] != self.num_image_tokens:
            raise ValueError(f"expected {self.num_image_tokens} image tokens per image, got {codes.shape[1]}")
        if codes.min() < 0 or codes.max() >= self.codebook_size:
            raise ValueError(f"image codes must lie in [0, {self.codebook_size}), got [{codes.min()}, {codes.max()}]")
        return torch.cat([self.prefix(prompt_blocks), codes + self.text_vocab], dim=1)

    # ------------------------------------------------------------------ scoring
    def image_logprobs(self, prompts: Sequence[str], image_tokens: torch.Tensor) -> torch.Tensor:
        """log p(image tokens | prompt), summed over the g*g tokens: ``(B,)`` float32.

        Only image codes compete (text logits are masked out), as in sampling.
        """
        seq = self.sequences(self.encode_prompts(prompts), image_tokens)
        logits = self.model(input_ids=seq).logits[:, self.prompt_len : -1, self.text_vocab :]
        logp = torch.log_softmax(logits.float(), dim=-1)
        target = seq[:, self.prompt_len + 1 :] - self.text_vocab
        return logp.gather(-1, target.unsqueeze(-1)).squeeze(-1).sum(-1)

    # ------------------------------------------------------------------ images
    def decode(self, image_tokens: torch.Tensor):
        """Image codes ``(B, g, g)`` -> list of ``B`` RGB PIL images."""
        from cotgen.tokenizer.vq import tensor_to_pil

        with torch.no_grad():
            return tensor_to_pil(self.image_tokenizer.decode(image_tokens.reshape(-1, self.grid_size, self.grid_size)))

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, path: str | Path) -> None:
        """Write ``model/`` (safetensors), ``text_tokenizer/``, ``image_tokenizer/`` and
        ``generator.json`` under ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path / "model")
        self.text_tokenizer.save_pretrained(path / "text_tokenizer")
        self.image_tokenizer.save_pretrained(path / "image_tokenizer")
        (path / GENERATOR_FILE).write_text(json.dumps({"prompt_len": self.prompt_len}, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ShapesGenerator:
        """Load what :meth:`save_pretrained` wrote.

        Raises:
            FileNotFoundError: ``path`` holds no generator (names what is missing).
        """
        from cotgen.tokenizer.vq import VQTokenizer

        path = Path(path)
        if not (path / GENERATOR_FILE).is_file():
            raise FileNotFoundError(f"no generator at {path} ({GENERATOR_FILE} missing); train one with `dvc repro generator`")
        cfg = json.loads((path / GENERATOR_FILE).read_text())
        model = LlamaForCausalLM.from_pretrained(path / "model")
        model.eval()
        text = PreTrainedTokenizerFast.from_pretrained(path / "text_tokenizer")
        image = VQTokenizer.from_pretrained(path / "image_tokenizer")
        image.eval()
        return cls(model, text, image, prompt_len=cfg["prompt_len"])

"""Step-wise sampling with N candidate paths per prompt, CFG, temperature, top-k and a
KV cache (DESIGN sections 1 and 4; LlamaGen's ``generate.py`` for the CFG form).

A *step* is a block of ``tokens_per_step`` consecutive image tokens in raster order
(default: one row of the token grid, so a 16x16 grid has 16 steps). Between steps the
caller may decode intermediate images, drop paths, and go on. A dropped path is removed
from the batch and its KV cache, so it costs nothing afterwards. The KV cache
(:class:`PreallocatedLayer`) is written in place: transformers' ``DynamicCache``
concatenates every layer's keys and values at every token (a third of the search's
time), and its ``StaticCache`` attends over the whole allocated length through a mask
(slower again on CPU). All three give the same codes (tests/test_generator.py).

CFG: ``logits = cond + cfg_scale * (cond - uncond)``; ``cfg_scale = 0`` is plain
conditional sampling and skips the unconditional rows entirely.

Sampling noise is per path: path ``j`` of prompt ``p`` draws from its own
``torch.Generator`` seeded by ``(seed, p's text, j)``, so a prompt gives the same
images alone or inside any batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, DynamicLayer

from cotgen.generator.model import ShapesGenerator


class PreallocatedLayer(DynamicLayer):
    """One layer's KV cache: a transformers ``DynamicLayer`` (attention sees only the
    filled positions, so decoding needs no mask) whose keys and values live in buffers of
    ``max_cache_len`` positions allocated at the first update, ``(B, heads, max_cache_len,
    head_dim)`` in the model's dtype; a token is written in place instead of concatenated.

    Raises:
        ValueError: more than ``max_cache_len`` positions.
    """

    def __init__(self, max_cache_len: int) -> None:
        super().__init__()
        self.max_cache_len = max_cache_len
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, _ = key_states.shape
        self.device = key_states.device
        self._k = key_states.new_zeros(b, h, self.max_cache_len, key_states.shape[-1])
        self._v = value_states.new_zeros(b, h, self.max_cache_len, value_states.shape[-1])
        self.keys, self.values = self._k[:, :, :0], self._v[:, :, :0]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.max_cache_len:
            raise ValueError(f"KV cache of {self.max_cache_len} positions cannot take position {end}")
        self._k[:, :, self.length : end] = key_states
        self._v[:, :, self.length : end] = value_states
        self.length = end
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep (and order) the batch rows ``beam_idx``."""
        if self.length:
            self._k, self._v = self._k.index_select(0, beam_idx), self._v.index_select(0, beam_idx)
            self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]

    batch_select_indices = reorder_cache


def preallocated_cache(config, max_cache_len: int) -> Cache:
    """A transformers ``Cache`` of :class:`PreallocatedLayer` for a decoder ``config``."""
    return Cache(layers=[PreallocatedLayer(max_cache_len) for _ in range(config.num_hidden_layers)])


@dataclass
class SamplingConfig:
    """Knobs of one sampling run.

    Attributes:
        n: candidate paths per prompt (>= 1).
        cfg_scale: guidance weight (>= 0; 0 = no guidance).
        temperature: softmax temperature (> 0).
        top_k: keep the k most likely codes (0 = all).
        seed: base seed.
        tokens_per_step: image tokens per step (default: one grid row); must divide g*g.
    """

    n: int = 4
    cfg_scale: float = 2.0
    temperature: float = 1.0
    top_k: int = 0
    seed: int = 0
    tokens_per_step: int | None = None

    def check(self, num_image_tokens: int, grid_size: int) -> int:
        """Validate; return tokens per step. Raises ValueError naming the bad knob."""
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0, got {self.cfg_scale}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        tps = self.tokens_per_step or grid_size
        if tps < 1 or num_image_tokens % tps:
            raise ValueError(f"tokens_per_step {tps} must divide the {num_image_tokens} image tokens")
        return tps


@dataclass
class Path:
    """One candidate path.

    Attributes:
        id: index in :attr:`StepwiseSampler.paths`.
        prompt_index, candidate: which prompt, which of its N candidates.
        tokens: image codes generated so far (raster order, 0..K-1).
        alive: False once dropped.
        dropped_at_step: number of steps completed when it was dropped.
        image_tokens: image tokens generated for this path.
        forward_passes: model evaluations spent on this path (prefill 1, each token 1;
            doubled with CFG for the unconditional row).
    """

    id: int
    prompt_index: int
    candidate: int
    tokens: list[int] = field(default_factory=list)
    alive: bool = True
    dropped_at_step: int | None = None
    image_tokens: int = 0
    forward_passes: int = 0


def path_seed(seed: int, prompt: str, candidate: int) -> int:
    """A stable 63-bit seed for one path."""
    digest = hashlib.sha256(f"{seed}\x00{prompt}\x00{candidate}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class StepwiseSampler:
    """Samples N paths for each of a batch of prompts, one step at a time.

    Args:
        generator: the AR generator.
        prompts: P prompts (words of the world's vocabulary).
        config: sampling knobs.
        prefix_tokens: optional ``(P, L)`` long image codes every path of a prompt starts
            from (roll-outs from a step, Math-Shepherd style); ``L`` must be a multiple
            of the step size. Sampling then starts at step ``L / tokens_per_step``;
            the prefix counts in ``Path.tokens`` but not in ``image_tokens``.
        condition: optional ``(P, C)`` long token ids (the model's own ids) placed
            between each prompt's block and ``<boi>``: the layout becomes ``[prompt
            block][condition][<boi>][image]`` (PARM++'s self-correction generator reads
            a reflection and the previous image there, :mod:`cotgen.reflect.corrector`).
        null_condition: the condition of the unconditional (CFG) rows, ``(P, C)``;
            default: ``condition`` itself (guidance then contrasts the prompt only).
    Raises:
        ValueError: a bad knob, prompt or prefix (named).
    """

    def __init__(
        self,
        generator: ShapesGenerator,
        prompts: Sequence[str],
        config: SamplingConfig,
        prefix_tokens: torch.Tensor | None = None,
        condition: torch.Tensor | None = None,
        null_condition: torch.Tensor | None = None,
    ) -> None:
        self.g = generator
        self.prompts = list(prompts)
        self.config = config
        self.tokens_per_step = config.check(generator.num_image_tokens, generator.grid_size)
        self.num_steps = generator.num_image_tokens // self.tokens_per_step
        self.step_index = 0
        self.cfg = config.cfg_scale > 0
        blocks = generator.encode_prompts(self.prompts)
        n = config.n
        self.paths = [Path(i, p, j) for i, (p, j) in enumerate((p, j) for p in range(len(prompts)) for j in range(n))]
        start = torch.zeros((len(prompts), 0), dtype=torch.long)
        if prefix_tokens is not None:
            start = torch.as_tensor(prefix_tokens, dtype=torch.long).reshape(len(prompts), -1)
            length = start.shape[1]
            if length % self.tokens_per_step or length >= generator.num_image_tokens:
                raise ValueError(
                    f"prefix of {length} tokens must be a multiple of the step ({self.tokens_per_step}) "
                    f"and shorter than the image ({generator.num_image_tokens})"
                )
            if length and (start.min() < 0 or start.max() >= generator.codebook_size):
                raise ValueError(f"prefix codes must lie in [0, {generator.codebook_size})")
            self.step_index = length // self.tokens_per_step
            for path in self.paths:
                path.tokens = start[path.prompt_index].tolist()
        self._rngs = {
            path.id: torch.Generator().manual_seed(path_seed(config.seed, self.prompts[path.prompt_index], path.candidate))
            for path in self.paths
        }
        self._rows = [path.id for path in self.paths]  # batch row -> path id (cond half)
        null = generator.null_prompts(len(prompts))
        if condition is not None:
            condition = torch.as_tensor(condition, dtype=torch.long).reshape(len(prompts), -1)
            null_condition = condition if null_condition is None else torch.as_tensor(null_condition, dtype=torch.long)
            if null_condition.shape != condition.shape:
                raise ValueError(f"null_condition {tuple(null_condition.shape)} must match condition {tuple(condition.shape)}")
            blocks, null = torch.cat([blocks, condition], 1), torch.cat([null, null_condition], 1)
        prefix = torch.cat([generator.prefix(blocks), start + generator.text_vocab], dim=1)
        if self.cfg:
            null = generator.prefix(null)
            prefix = torch.cat([prefix, torch.cat([null, start + generator.text_vocab], dim=1)])
        self._cache = preallocated_cache(
            generator.model.config, max_cache_len=prefix.shape[1] + generator.num_image_tokens - start.shape[1]
        )
        with torch.no_grad():
            out = generator.model(cache=self._cache, use_cache=True, **generator.model_inputs(prefix, cached=True))
        expand = torch.arange(len(prompts)).repeat_interleave(n)
        if self.cfg:
            expand = torch.cat([expand, expand + len(prompts)])
        self._cache.reorder_cache(expand)
        # the copy input's source codes, per batch row (kept in step with the cache's rows)
        self._context = prefix[expand] if generator.copy_embedding is not None else None
        self._next_logits = out.logits[:, -1, generator.text_vocab :].float()[expand]
        for path in self.paths:
            path.forward_passes += 2 if self.cfg else 1

    # ------------------------------------------------------------------ state
    @property
    def done(self) -> bool:
        return self.step_index >= self.num_steps or not self._rows

    def alive(self) -> list[Path]:
        return [self.paths[i] for i in self._rows]

    def drop(self, path_ids: Iterable[int]) -> None:
        """Stop the given paths now; their rows leave the batch and the KV cache.

        Raises:
            KeyError: an unknown path id.
        """
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
                path.alive = False
                path.dropped_at_step = self.step_index
        index = torch.tensor(keep, dtype=torch.long)
        if self.cfg:
            index = torch.cat([index, index + len(self._rows)])
        self._rows = [self._rows[r] for r in keep]
        if self._rows:
            self._cache.reorder_cache(index)
            self._next_logits = self._next_logits[index]
            if self._context is not None:
                self._context = self._context[index]

    # ------------------------------------------------------------------ sampling
    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        """One code per alive path from ``(B, K)`` guided logits."""
        logits = logits / self.config.temperature
        if self.config.top_k and self.config.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.config.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        cdf = torch.softmax(logits, dim=-1).cumsum(-1)
        u = torch.stack([torch.rand(1, generator=self._rngs[pid], dtype=torch.float32) for pid in self._rows])
        codes = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)
        return codes.clamp_(max=logits.shape[-1] - 1)

    def _guided(self) -> torch.Tensor:
        logits = self._next_logits
        if not self.cfg:
            return logits
        cond, uncond = logits.chunk(2)
        return cond + self.config.cfg_scale * (cond - uncond)

    @torch.no_grad()
    def step(self) -> None:
        """Generate the next ``tokens_per_step`` tokens of every alive path.

        Raises:
            RuntimeError: all steps are done or no path is alive.
        """
        if self.done:
            raise RuntimeError("sampling is finished (all steps done or no path alive)")
        for _ in range(self.tokens_per_step):
            codes = self._sample(self._guided())
            for pid, code in zip(self._rows, codes.tolist()):
                path = self.paths[pid]
                path.tokens.append(code)
                path.image_tokens += 1
            if len(self.paths[self._rows[0]].tokens) == self.g.num_image_tokens:
                break  # the last token needs no forward pass
            ids = codes + self.g.text_vocab
            if self.cfg:
                ids = torch.cat([ids, ids])
            index = self._cache.get_seq_length()  # sequence index of this input
            out = self.g.model(cache=self._cache, use_cache=True,
                               **self.g.model_inputs(ids[:, None], index, cached=True, context=self._context))
            self._next_logits = out.logits[:, -1, self.g.text_vocab :].float()
            for pid in self._rows:
                self.paths[pid].forward_passes += 2 if self.cfg else 1
        self.step_index += 1

    def run(self) -> list[Path]:
        """Finish every alive path; returns all paths."""
        while not self.done:
            self.step()
        return self.paths

    # ------------------------------------------------------------------ images
    def token_grid(self, path_ids: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes (B, g, g) long, known (B, g, g) bool)``: generated codes so far, and
        which positions are generated; unknown positions hold 0."""
        ids = list(path_ids) if path_ids is not None else [p.id for p in self.paths]
        g = self.g.grid_size
        codes = torch.zeros(len(ids), g * g, dtype=torch.long)
        known = torch.zeros(len(ids), g * g, dtype=torch.bool)
        for row, pid in enumerate(ids):
            toks = self.paths[pid].tokens
            codes[row, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            known[row, : len(toks)] = True
        return codes.view(-1, g, g), known.view(-1, g, g)

    def images(self, path_ids: Sequence[int] | None = None):
        """Intermediate (or final) images of the given paths (default: all) as RGB PIL
        images; tokens not generated yet are drawn as background."""
        from cotgen.tokenizer.vq import tensor_to_pil

        codes, known = self.token_grid(path_ids)
        with torch.no_grad():
            return tensor_to_pil(self.g.image_tokenizer.decode_masked(codes, known))


def sample_images(
    generator: ShapesGenerator, prompts: Sequence[str], config: SamplingConfig, batch_prompts: int = 16
) -> list[list]:
    """Plain sampling: ``config.n`` final images per prompt, as lists of PIL images."""
    out = []
    for start in range(0, len(prompts), batch_prompts):
        chunk = prompts[start : start + batch_prompts]
        sampler = StepwiseSampler(generator, chunk, config)
        sampler.run()
        images = sampler.images()
        out += [images[i * config.n : (i + 1) * config.n] for i in range(len(chunk))]
    return out

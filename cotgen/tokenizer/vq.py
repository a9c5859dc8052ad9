"""VQ image tokenizer of the GenEval-Shapes world (issue 3; LlamaGen's VQ-VAE, small).

A 64x64 RGB scene becomes a 16x16 grid of codebook indices (downsample 4) and back:

    conv encoder -> 1x1 conv to ``embed_dim`` -> l2-normalised nearest-code lookup
    (straight-through estimator; codebook + commitment losses) -> conv decoder

As in LlamaGen the lookup is done on l2-normalised vectors in a low-dimensional code
space (``embed_dim`` 8 by default), which keeps codebook usage high; codes that stay
unused during training are restarted on random encoder outputs (dead-code restarts).

Conventions (all public functions):

- pixel tensors are float32 ``(B, 3, H, W)`` in ``[-1, 1]`` (``x = rgb / 127.5 - 1``),
  or uint8 ``(B, H, W, 3)`` in ``[0, 255]`` where an input says so;
- token grids are int64 ``(B, 16, 16)`` with values in ``[0, codebook_size)``;
  raster order (row-major) is the generation order of an AR generator.

Checkpoints are Hugging Face style: ``save_pretrained(dir)`` writes ``config.json`` and
``model.safetensors``; ``VQTokenizer.from_pretrained(dir)`` reads them. The checkpoint
also holds ``background_tokens``, the token grid of a blank background scene, used by
:meth:`VQTokenizer.decode_partial` to draw not-yet-generated positions as background.

Train with ``python -m cotgen.tokenizer.vq --out data/tokenizer --steps N`` or
:func:`train_vq_tokenizer`; check with :func:`reconstruction_check`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as hf_init

from cotgen.world.vocab import BACKGROUND_RGB, IMAGE_SIZE


# ---------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------
class VQConfig(PretrainedConfig):
    """Hyper-parameters of :class:`VQTokenizer`.

    Args:
        image_size: side of the (square) input image, pixels.
        patch_size: stride of the encoder's first conv (and sub-pixel factor of the
            decoder's last one).
        channels: widths per resolution after the stem; ``len(channels) - 1`` stride-2
            downsamplings, so the token grid side is
            ``image_size / (patch_size * 2**(len(channels)-1))`` (16 by default).
        num_res_blocks: residual blocks per resolution (encoder and decoder).
        extra_decoder_blocks: further residual blocks per resolution in the decoder.
        codebook_size: number of codes.
        embed_dim: dimension of the code space.
        l2_normalize: look codes up on the unit sphere (LlamaGen); otherwise plain l2.
        commitment_beta: weight of the commitment loss ``||z - sg(q)||^2``.
        codebook_weight: weight of the codebook loss ``||sg(z) - q||^2``.
        restart_every: steps between dead-code restarts during training (0: never).
        restart_threshold: a code is dead when its EMA usage count per batch is below this.
        usage_decay: decay of the EMA of code usage counts.
    """

    model_type = "cotgen_vq"

    def __init__(
        self,
        image_size: int = IMAGE_SIZE,
        patch_size: int = 2,
        channels: Sequence[int] = (32, 96),
        num_res_blocks: int = 1,
        extra_decoder_blocks: int = 0,
        codebook_size: int = 512,
        embed_dim: int = 8,
        l2_normalize: bool = True,
        commitment_beta: float = 0.25,
        codebook_weight: float = 1.0,
        restart_every: int = 50,
        restart_threshold: float = 0.03,
        usage_decay: float = 0.99,
        **kwargs,
    ) -> None:
        self.image_size = int(image_size)
        self.patch_size = int(patch_size)
        self.channels = [int(c) for c in channels]
        self.num_res_blocks = int(num_res_blocks)
        self.extra_decoder_blocks = int(extra_decoder_blocks)
        self.codebook_size = int(codebook_size)
        self.embed_dim = int(embed_dim)
        self.l2_normalize = bool(l2_normalize)
        self.commitment_beta = float(commitment_beta)
        self.codebook_weight = float(codebook_weight)
        self.restart_every = int(restart_every)
        self.restart_threshold = float(restart_threshold)
        self.usage_decay = float(usage_decay)
        super().__init__(**kwargs)

    @property
    def downsample(self) -> int:
        return self.patch_size * 2 ** (len(self.channels) - 1)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample


# ---------------------------------------------------------------------------------------
# modules
# ---------------------------------------------------------------------------------------
def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, c // 4), c, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.norm1 = _norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Encoder(nn.Module):
    """``(B, 3, S, S)`` -> ``(B, embed_dim, S/d, S/d)``: a stride-``patch_size`` conv
    stem, then residual blocks per resolution with stride-2 convs between them."""

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        ch, p = cfg.channels, cfg.patch_size
        self.conv_in = nn.Conv2d(3, ch[0], 2 * p if p > 1 else 3, stride=p, padding=p // 2 if p > 1 else 1)
        blocks: list[nn.Module] = []
        c = ch[0]
        for i, c_out in enumerate(ch):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(c, c_out))
                c = c_out
            if i < len(ch) - 1:
                blocks.append(nn.Conv2d(c, ch[i + 1], 4, stride=2, padding=1))
                c = ch[i + 1]
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, cfg.embed_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(x)))))


class Decoder(nn.Module):
    """``(B, embed_dim, S/d, S/d)`` -> ``(B, 3, S, S)``: mirror of the encoder, with
    sub-pixel (pixel-shuffle) upsampling."""

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        ch, p = list(reversed(cfg.channels)), cfg.patch_size
        self.conv_in = nn.Conv2d(cfg.embed_dim, ch[0], 3, padding=1)
        blocks: list[nn.Module] = []
        c = ch[0]
        for i, c_out in enumerate(ch):
            for _ in range(cfg.num_res_blocks + cfg.extra_decoder_blocks):
                blocks.append(ResBlock(c, c_out))
                c = c_out
            if i < len(ch) - 1:
                blocks += [nn.Conv2d(c, 4 * ch[i + 1], 3, padding=1), nn.PixelShuffle(2)]
                c = ch[i + 1]
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, 3 * p * p, 3, padding=1)
        self.shuffle = nn.PixelShuffle(p)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.conv_out(F.silu(self.norm_out(self.blocks(self.conv_in(z))))))


class VectorQuantizer(nn.Module):
    """Nearest-code lookup with straight-through gradients, codebook/commitment losses and
    dead-code restarts (training only)."""

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.codebook = nn.Embedding(cfg.codebook_size, cfg.embed_dim)
        # EMA of how often each code is picked per batch; training bookkeeping only.
        self.register_buffer("usage", torch.ones(cfg.codebook_size), persistent=False)

    def codes(self) -> torch.Tensor:
        w = self.codebook.weight
        return F.normalize(w, dim=-1) if self.cfg.l2_normalize else w

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """``z`` (N, D) -> nearest code index (N,) int64."""
        if self.cfg.l2_normalize:
            z = F.normalize(z, dim=-1)
        e = self.codes()
        d = z.pow(2).sum(1, keepdim=True) - 2 * z @ e.t() + e.pow(2).sum(1)[None]
        return d.argmin(1)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """``idx`` (B, h, w) int64 -> code vectors (B, D, h, w)."""
        return self.codes()[idx].permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        if self.cfg.l2_normalize:
            flat = F.normalize(flat, dim=-1)
        idx = self.lookup(flat)
        q = self.codes()[idx]
        codebook_loss = F.mse_loss(q, flat.detach())
        commit_loss = F.mse_loss(flat, q.detach())
        q = flat + (q - flat).detach()
        if self.training:
            self._track_usage(idx)
        q = q.view(b, h, w, d).permute(0, 3, 1, 2).contiguous()
        return q, idx.view(b, h, w), {"codebook": codebook_loss, "commitment": commit_loss, "_flat": flat.detach()}

    @torch.no_grad()
    def _track_usage(self, idx: torch.Tensor) -> None:
        counts = torch.bincount(idx, minlength=self.cfg.codebook_size).float()
        self.usage.mul_(self.cfg.usage_decay).add_(counts, alpha=1 - self.cfg.usage_decay)

    @torch.no_grad()
    def restart_dead_codes(self, flat: torch.Tensor) -> int:
        """Move codes whose usage EMA is below the threshold onto random encoder outputs
        of the current batch (``flat`` (N, D)); returns how many were restarted."""
        dead = (self.usage < self.cfg.restart_threshold).nonzero().flatten()
        if len(dead) == 0:
            return 0
        pick = torch.randint(0, flat.shape[0], (len(dead),))
        new = flat[pick] + 0.01 * torch.randn(len(dead), flat.shape[1])
        self.codebook.weight.data[dead] = new
        self.usage[dead] = 1.0
        return int(len(dead))


# ---------------------------------------------------------------------------------------
# the tokenizer
# ---------------------------------------------------------------------------------------
class VQTokenizer(PreTrainedModel):
    """VQ-VAE image tokenizer: ``(B, 3, 64, 64)`` pixels <-> ``(B, 16, 16)`` tokens.

    ``forward`` is the training pass; use :meth:`encode`, :meth:`decode`,
    :meth:`decode_partial` and the PIL helpers for inference (they run without
    gradients, in whatever train/eval mode the model is in; call ``.eval()`` first —
    the modules have no dropout or batch statistics, so the mode changes nothing but
    usage bookkeeping).
    """

    config_class = VQConfig
    base_model_prefix = "vq"
    main_input_name = "pixel_values"

    def __init__(self, config: VQConfig) -> None:
        super().__init__(config)
        self.encoder = Encoder(config)
        self.quantizer = VectorQuantizer(config)
        self.decoder = Decoder(config)
        g = config.grid_size
        # Token grid of a blank background scene (set by :meth:`refresh_background_tokens`).
        self.register_buffer("background_tokens", torch.zeros(g, g, dtype=torch.long))
        self.post_init()

    # -- HF weight init: PyTorch's defaults, through HF's guarded init functions --------
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            hf_init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                fan_in = module.weight.shape[1] * module.weight[0, 0].numel()
                bound = 1 / math.sqrt(fan_in)
                hf_init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.GroupNorm):
            hf_init.ones_(module.weight)
            hf_init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            hf_init.normal_(module.weight, mean=0.0, std=1.0)
        elif isinstance(module, VectorQuantizer):
            hf_init.ones_(module.usage)  # non-persistent: not in checkpoints, re-made on load

    # -- properties ------------------------------------------------------------------
    @property
    def grid_size(self) -> int:
        """Side of the token grid (16 with the default config)."""
        return self.config.grid_size

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def num_tokens(self) -> int:
        """Tokens per image (``grid_size ** 2``)."""
        return self.config.grid_size**2

    # -- training pass -----------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training pass on float ``(B, 3, H, W)`` pixels in ``[-1, 1]``.

        Returns ``{"reconstruction" (B,3,H,W) float, "tokens" (B,h,w) int64, "codebook",
        "commitment" (scalar losses), "vq_loss" (weighted sum of both), "z" (N, D) the
        detached normalised encoder outputs}``.
        """
        z = self.encoder(pixel_values)
        q, idx, losses = self.quantizer(z)
        rec = self.decoder(q)
        vq_loss = self.config.codebook_weight * losses["codebook"] + self.config.commitment_beta * losses["commitment"]
        return {
            "reconstruction": rec,
            "tokens": idx,
            "codebook": losses["codebook"],
            "commitment": losses["commitment"],
            "vq_loss": vq_loss,
            "z": losses["_flat"],
        }

    # -- inference -------------------------------------------------------------------
    def _check_pixels(self, images: torch.Tensor) -> torch.Tensor:
        s = self.config.image_size
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dtype == torch.uint8:
            if images.dim() != 4 or tuple(images.shape[1:]) != (s, s, 3):
                raise ValueError(f"uint8 images must have shape (B, {s}, {s}, 3), got {tuple(images.shape)}")
            return images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        if images.is_floating_point():
            if images.dim() != 4 or tuple(images.shape[1:]) != (3, s, s):
                raise ValueError(f"float images must have shape (B, 3, {s}, {s}), got {tuple(images.shape)}")
            return images.float()
        raise ValueError(f"images must be uint8 (B,H,W,3) or float (B,3,H,W), got dtype {images.dtype}")

    def _check_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        g = self.grid_size
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32, torch.int16):
            raise ValueError("tokens must be an integer torch.Tensor of shape (B, %d, %d)" % (g, g))
        if tokens.dim() == 2 and tokens.shape[1] == g * g:
            tokens = tokens.view(-1, g, g)
        if tokens.dim() != 3 or tuple(tokens.shape[1:]) != (g, g):
            raise ValueError(f"tokens must have shape (B, {g}, {g}) or (B, {g * g}), got {tuple(tokens.shape)}")
        tokens = tokens.long()
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.codebook_size):
            raise ValueError(f"token values must be in [0, {self.codebook_size}), got [{int(tokens.min())}, {int(tokens.max())}]")
        return tokens

    @torch.no_grad()
    def encode(self, images: torch.Tensor, snap_background: bool = True) -> torch.Tensor:
        """Images -> token grids.

        Args:
            images: uint8 ``(B, 64, 64, 3)`` in ``[0, 255]`` or float ``(B, 3, 64, 64)``
                in ``[-1, 1]``.
            snap_background: patches whose pixels, and those of their 8 neighbour
                patches, are all plain background (``BACKGROUND_RGB`` within 2 sRGB
                units) get the blank scene's code at that position
                (:attr:`background_tokens`). Without it the encoder's near-ties give
                plain background dozens of different codes, which an AR generator then
                has to learn as noise.
        Returns:
            int64 ``(B, 16, 16)``, values in ``[0, codebook_size)``.
        Raises:
            ValueError: wrong shape or dtype. TypeError: not a tensor.
        """
        x = self._check_pixels(images).to(self.device)
        z = self.encoder(x)
        b, d, h, w = z.shape
        idx = self.quantizer.lookup(z.permute(0, 2, 3, 1).reshape(-1, d)).view(b, h, w)
        if snap_background:
            bg = torch.tensor(BACKGROUND_RGB, dtype=torch.float32, device=x.device).div(127.5).sub(1.0)
            off = (x - bg.view(1, 3, 1, 1)).abs().amax(dim=1)  # (B, H, W)
            plain = F.max_pool2d(off[:, None], self.config.downsample)[:, 0] <= 2.0 / 127.5
            # only patches whose 3x3 neighbourhood is plain too: codes next to an object
            # carry part of its edge through the decoder's receptive field
            plain = -F.max_pool2d(-plain[:, None].float(), 3, 1, 1)[:, 0] > 0.5
            idx = torch.where(plain, self.background_tokens.to(idx.device).expand_as(idx), idx)
        return idx

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token grids -> images.

        Args:
            tokens: integer ``(B, 16, 16)`` (or flat raster ``(B, 256)``) in
                ``[0, codebook_size)``.
        Returns:
            float32 ``(B, 3, 64, 64)`` clamped to ``[-1, 1]``.
        Raises:
            ValueError: wrong shape, dtype or out-of-range values.
        """
        tokens = self._check_tokens(tokens).to(self.device)
        return self.decoder(self.quantizer.embed(tokens)).clamp(-1.0, 1.0)

    def fill_unknown(self, tokens: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        """Replace unknown positions by the background grid's tokens.

        Args:
            tokens: integer ``(B, 16, 16)`` or ``(B, 256)``; values at unknown positions
                are ignored (may be anything, e.g. a mask id or -1).
            known: bool, same shape as ``tokens`` (or broadcastable, e.g. ``(16, 16)``).
        Returns:
            int64 ``(B, 16, 16)``.
        Raises:
            ValueError: shapes do not match the grid.
        """
        g = self.grid_size
        if tokens.dim() == 2 and tokens.shape[1] == g * g:
            tokens = tokens.reshape(-1, g, g)
        if tokens.dim() != 3 or tuple(tokens.shape[1:]) != (g, g):
            raise ValueError(f"tokens must have shape (B, {g}, {g}) or (B, {g * g}), got {tuple(tokens.shape)}")
        known = known.to(torch.bool)
        if known.dim() >= 1 and known.shape[-1] == g * g:
            known = known.reshape(*known.shape[:-1], g, g)
        bg = self.background_tokens.to(tokens.device).expand_as(tokens)
        return torch.where(known.to(tokens.device), tokens.long(), bg)

    @torch.no_grad()
    def decode_partial(self, tokens: torch.Tensor, n_generated: int | torch.Tensor) -> torch.Tensor:
        """Decode a partially generated raster-order grid (intermediate image of a step).

        Positions ``>= n_generated`` in raster (row-major) order are drawn as plain
        background (the tokens of a blank scene, ``background_tokens``).

        Args:
            tokens: integer ``(B, 16, 16)`` or ``(B, 256)``; values past ``n_generated``
                are ignored.
            n_generated: int in ``[0, 256]``, or int tensor ``(B,)`` per image.
        Returns:
            float32 ``(B, 3, 64, 64)`` in ``[-1, 1]``.
        Raises:
            ValueError: shapes or ``n_generated`` out of range.
        """
        g = self.grid_size
        b = tokens.shape[0]
        n = torch.as_tensor(n_generated, dtype=torch.long).reshape(-1)
        if n.numel() not in (1, b) or (n < 0).any() or (n > g * g).any():
            raise ValueError(f"n_generated must be an int or (B,) tensor with values in [0, {g * g}], got {n_generated}")
        pos = torch.arange(g * g).view(1, g, g)
        known = pos < n.view(-1, 1, 1)
        return self.decode(self.fill_unknown(tokens, known))

    @torch.no_grad()
    def decode_masked(self, tokens: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        """Decode a grid whose unknown positions (``known`` False; MaskGIT-style masks)
        are drawn as background. Shapes as in :meth:`fill_unknown`; returns float32
        ``(B, 3, 64, 64)`` in ``[-1, 1]``."""
        return self.decode(self.fill_unknown(tokens, known))

    @torch.no_grad()
    def refresh_background_tokens(self) -> torch.Tensor:
        """Encode a blank ``BACKGROUND_RGB`` scene and store its grid in
        ``background_tokens``; returns it (int64 ``(16, 16)``)."""
        s = self.config.image_size
        blank = torch.tensor(BACKGROUND_RGB, dtype=torch.uint8).view(1, 1, 1, 3).expand(1, s, s, 3).contiguous()
        grid = self.encode(blank, snap_background=False)[0]
        self.background_tokens.copy_(grid)
        return grid

    # -- PIL helpers -------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 256) -> torch.Tensor:
        """PIL images (RGB, 64x64; other modes are converted, other sizes raise) ->
        int64 ``(B, 16, 16)``. Raises ValueError on a wrong size."""
        out = [self.encode(pil_to_tensor(images[i : i + batch_size], self.config.image_size)) for i in range(0, len(images), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.grid_size, self.grid_size, dtype=torch.long)

    @torch.no_grad()
    def decode_images(self, tokens: torch.Tensor, batch_size: int = 256) -> list[Image.Image]:
        """int ``(B, 16, 16)`` tokens -> list of B RGB PIL images (64x64)."""
        tokens = self._check_tokens(tokens)
        return [im for i in range(0, len(tokens), batch_size) for im in tensor_to_pil(self.decode(tokens[i : i + batch_size]))]

    @torch.no_grad()
    def reconstruct(self, images: Sequence[Image.Image]) -> list[Image.Image]:
        """Encode then decode PIL images; returns PIL images."""
        return self.decode_images(self.encode_images(images))


def pil_to_tensor(images: Sequence[Image.Image], size: int = IMAGE_SIZE) -> torch.Tensor:
    """PIL images -> uint8 ``(B, size, size, 3)``. Raises ValueError on a wrong size."""
    arrs = []
    for i, im in enumerate(images):
        if im.size != (size, size):
            raise ValueError(f"image {i} is {im.size[0]}x{im.size[1]}, expected {size}x{size}")
        arrs.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    if not arrs:
        return torch.zeros(0, size, size, 3, dtype=torch.uint8)
    return torch.from_numpy(np.stack(arrs))


def tensor_to_pil(x: torch.Tensor) -> list[Image.Image]:
    """float ``(B, 3, H, W)`` in ``[-1, 1]`` (values outside are clipped) -> RGB PIL images."""
    arr = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a, "RGB") for a in arr]


# ---------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------
def render_batch(prompts: Sequence[dict], rng: np.random.Generator, n: int) -> torch.Tensor:
    """Render ``n`` scenes of prompts drawn uniformly from ``prompts`` -> uint8
    ``(n, 64, 64, 3)``."""
    from cotgen.world.render import render_scene

    picks = rng.integers(0, len(prompts), size=n)
    return torch.from_numpy(
        np.stack([np.asarray(render_scene(prompts[int(i)], rng)[0].convert("RGB"), dtype=np.uint8) for i in picks])
    )


def codebook_stats(tokens: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Usage of a codebook by a batch of token grids.

    Returns ``{"codebook_usage": fraction of codes that occur (0-1), "codes_used": count,
    "perplexity": exp(entropy of the code histogram) (1 to codebook_size)}``.
    """
    counts = torch.bincount(tokens.flatten().long(), minlength=codebook_size).double()
    p = counts / counts.sum()
    nz = p[p > 0]
    return {
        "codebook_usage": float((counts > 0).double().mean()),
        "codes_used": int((counts > 0).sum()),
        "perplexity": float(torch.exp(-(nz * nz.log()).sum())),
    }


def heldout_images(n: int = 512, seed: int = 1234, eval_set: Sequence[dict] | None = None) -> torch.Tensor:
    """``n`` renders of evaluation-set prompts (held out from tokenizer training),
    uint8 ``(n, 64, 64, 3)``, deterministic in ``seed``."""
    from cotgen.world.prompts import build_shapes_eval_set

    eval_set = list(eval_set) if eval_set is not None else build_shapes_eval_set()
    return render_batch(eval_set, np.random.default_rng(seed), n)


@torch.no_grad()
def evaluate_tokenizer(tokenizer: VQTokenizer, images: torch.Tensor, batch_size: int = 256) -> dict[str, float]:
    """Codebook statistics and pixel error of ``tokenizer`` on uint8 ``(N, 64, 64, 3)``.

    Returns :func:`codebook_stats` plus ``"mse"`` (on ``[-1, 1]`` pixels), ``"psnr"`` (dB,
    on ``[0, 255]``) and ``"mse_foreground"`` (MSE on pixels that are not background).
    """
    toks, sq, fg_sq, fg_n = [], 0.0, 0.0, 0
    bg = torch.tensor(BACKGROUND_RGB, dtype=torch.uint8)
    for i in range(0, len(images), batch_size):
        batch = images[i : i + batch_size]
        t = tokenizer.encode(batch)
        rec = tokenizer.decode(t).cpu()
        x = batch.permute(0, 3, 1, 2).float() / 127.5 - 1
        err = (rec - x).pow(2)
        sq += float(err.sum())
        fg = (batch != bg).any(-1).unsqueeze(1).expand_as(err)
        fg_sq += float(err[fg].sum())
        fg_n += int(fg.sum())
        toks.append(t.cpu())
    mse = sq / images[..., :].numel()
    stats = codebook_stats(torch.cat(toks), tokenizer.codebook_size)
    stats.update(
        mse=mse,
        psnr=float(10 * math.log10(4.0 / max(mse, 1e-12))),
        mse_foreground=fg_sq / max(fg_n, 1),
    )
    return stats


# ---------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------
def edge_map(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """float ``(B, 3, H, W)`` -> float ``(B, 1, H, W)``: 1 where the 3x3 neighbourhood
    is not uniform in some channel, else 0."""
    hi = F.max_pool2d(x, 3, stride=1, padding=1)
    lo = -F.max_pool2d(-x, 3, stride=1, padding=1)
    return ((hi - lo).amax(1, keepdim=True) > eps).float()


def train_vq_tokenizer(
    out_dir: str | Path | None,
    steps: int = 1500,
    batch_size: int = 32,
    seed: int = 0,
    codebook_size: int = 512,
    progress: bool = True,
    lr: float = 3e-3,
    warmup: int = 100,
    l1_weight: float = 0.2,
    foreground_weight: float = 4.0,
    edge_weight: float = 4.0,
    train_prompts: int = 4000,
    config: VQConfig | dict | None = None,
    eval_images: int = 512,
    num_threads: int | None = 1,
) -> tuple[VQTokenizer, dict]:
    """Train a VQ tokenizer on scenes rendered on the fly from the training prompt set.

    Each step renders ``batch_size`` scenes of prompts of ``build_shapes_train_set``
    (``train_prompts`` lines, disjoint from the evaluation set) and minimises
    ``weighted MSE + l1_weight * weighted L1 + vq_loss`` where pixels that are not plain
    background weigh ``foreground_weight`` times more (objects are small) and pixels on
    an edge (any 3x3 neighbour differs) get ``edge_weight`` more. AdamW with
    linear warm-up and cosine decay; dead-code restarts every ``config.restart_every``
    steps. Everything is deterministic in ``seed`` (torch and numpy generators).

    Args:
        out_dir: where ``save_pretrained`` writes the tokenizer and ``metrics.json``
            goes; ``None`` saves nothing.
        config: a :class:`VQConfig` or overrides of its defaults (``codebook_size``
            argument wins).
        eval_images: renders of evaluation prompts for the final codebook statistics.
        num_threads: ``torch.set_num_threads`` value (``None``: leave as is). The
            result depends (in the last float bits, then chaotically) on it. One thread
            is the default: on the shared 2-core machine two OpenMP threads were 4-5x
            *slower* whenever another process was busy.
    Returns:
        ``(tokenizer, metrics)``; metrics has ``codebook_usage``, ``perplexity``,
        ``codes_used``, ``mse``, ``psnr``, ``mse_foreground`` (held-out eval renders),
        ``train_seconds``, ``steps``, ``final_loss``, ``loss_history`` (mean loss per
        logging window), ``codes_restarted``.
    Raises:
        ValueError: ``steps`` < 1 or ``batch_size`` < 1.
    """
    from cotgen.world.prompts import build_shapes_eval_set, build_shapes_train_set

    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    if isinstance(config, VQConfig):
        cfg = VQConfig(**{**config.to_dict(), "codebook_size": codebook_size})
    else:
        cfg = VQConfig(**{**(config or {}), "codebook_size": codebook_size})

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    eval_set = build_shapes_eval_set()
    prompts = build_shapes_train_set(eval_set, train_prompts)
    model = VQTokenizer(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    bg = torch.tensor(BACKGROUND_RGB, dtype=torch.uint8)
    history: list[float] = []
    window: list[float] = []
    log_every = max(1, min(100, steps // 10))
    restarted = 0
    t0 = time.time()
    bar = tqdm(range(steps), desc="VQ tokenizer", disable=not progress, unit="step")
    for step in bar:
        batch = render_batch(prompts, rng, batch_size)
        x = batch.permute(0, 3, 1, 2).float() / 127.5 - 1
        weight = 1.0 + (foreground_weight - 1.0) * (batch != bg).any(-1).float().unsqueeze(1)
        if edge_weight:
            weight = weight + edge_weight * edge_map(x)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        out = model(x)
        diff = out["reconstruction"] - x
        rec_loss = (weight * diff.pow(2)).mean() + l1_weight * (weight * diff.abs()).mean()
        loss = rec_loss + out["vq_loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if cfg.restart_every and (step + 1) % cfg.restart_every == 0 and step + 1 < steps * 0.9:
            restarted += model.quantizer.restart_dead_codes(out["z"])
        window.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            history.append(sum(window) / len(window))
            window = []
            bar.set_postfix(loss=f"{history[-1]:.4f}", rec=f"{rec_loss.item():.4f}")
    train_seconds = time.time() - t0

    model.eval()
    model.refresh_background_tokens()
    metrics = evaluate_tokenizer(model, heldout_images(eval_images, seed=seed + 1234, eval_set=eval_set)) if eval_images else {}
    metrics.update(
        codebook_size=codebook_size,
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        train_seconds=train_seconds,
        final_loss=history[-1],
        loss_history=history,
        codes_restarted=restarted,
        num_threads=torch.get_num_threads(),
        lr=lr,
    )
    if out_dir is not None:
        out_dir = Path(out_dir)
        model.save_pretrained(out_dir)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return model, metrics


# ---------------------------------------------------------------------------------------
# GenEval reconstruction check
# ---------------------------------------------------------------------------------------
def reconstruction_check(
    tokenizer: VQTokenizer,
    detector,
    eval_set: Sequence[dict],
    images_per_prompt: int = 4,
    seed: int = 0,
    score_originals: bool = True,
    progress: bool = True,
    grid_path: str | Path | None = None,
) -> dict:
    """Score encode -> decode reconstructions of ground-truth renders with GenEval.

    Renders ``images_per_prompt`` scenes of every line of ``eval_set`` (numpy generator
    seeded with ``seed``), reconstructs them through ``tokenizer`` and judges them with
    ``detector`` under GenEval's rules.

    Args:
        detector: a :class:`cotgen.geneval.detector.Detector` (e.g. ``ShapesDetector``).
        score_originals: also score the renders themselves (``original_overall``,
            ``original_tags``): failures the detector makes on originals are not the
            tokenizer's.
        grid_path: if given, save a PNG of the first 16 originals (top) and their
            reconstructions (bottom).
    Returns:
        ``{"geneval_overall", "tags", "correct_images", "images", "codebook_usage",
        "perplexity", "codes_used", "codebook_size", "mse", "psnr", "mse_foreground",
        "original_overall"?, "original_tags"?, "lost"?: number of images correct as
        original but wrong as reconstruction, "results": GenEval result lines}``.
    """
    from cotgen.geneval.scoring import judge_image, result_line, summarize
    from cotgen.world.render import render_scene

    tokenizer.eval()
    rng = np.random.default_rng(seed)
    items: list[tuple[str, dict, Image.Image]] = []
    for i, meta in enumerate(eval_set):
        for j in range(images_per_prompt):
            items.append((f"{i:05d}/samples/{j:04d}.png", meta, render_scene(meta, rng)[0].convert("RGB")))
    originals = pil_to_tensor([im for _, _, im in items], tokenizer.config.image_size)
    stats = evaluate_tokenizer(tokenizer, originals)
    recs = tokenizer.decode_images(tokenizer.encode(originals))

    lines, orig_lines = [], []
    lost = 0
    for (name, meta, orig), rec in tqdm(
        list(zip(items, recs)), desc="GenEval reconstructions", disable=not progress, unit="img"
    ):
        correct, reason, det = judge_image(detector, rec, meta)
        lines.append(result_line(name, meta, correct, reason, det))
        if score_originals:
            oc, oreason, odet = judge_image(detector, orig, meta)
            orig_lines.append(result_line(name, meta, oc, oreason, odet))
            lost += int(oc and not correct)
    summary = summarize(lines)
    out = {
        "geneval_overall": summary["overall"],
        "tags": summary["tags"],
        "correct_images": summary["correct_images"],
        "images": summary["images"],
        "codebook_size": tokenizer.codebook_size,
        **stats,
    }
    if score_originals:
        osum = summarize(orig_lines)
        out.update(original_overall=osum["overall"], original_tags=osum["tags"], lost=lost)
    if grid_path is not None:
        k = min(16, len(items))
        from cotgen.generator.grid import image_grid

        image_grid([[im for _, _, im in items[:k]], recs[:k]]).save(grid_path)
    out["results"] = lines
    return out


# ---------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m cotgen.tokenizer.vq", description="Train the VQ image tokenizer.")
    p.add_argument("--out", default="data/tokenizer", help="output folder (save_pretrained)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--codebook-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (results depend on it)")
    p.add_argument("--check-detector", default=None, metavar="DIR",
                   help="after training, run reconstruction_check with the ShapesDetector in DIR "
                        "and write OUT/reconstruction.json and OUT/reconstruction.png")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    model, metrics = train_vq_tokenizer(
        a.out, steps=a.steps, batch_size=a.batch_size, seed=a.seed, codebook_size=a.codebook_size,
        lr=a.lr, progress=not a.no_progress, num_threads=a.threads,
    )
    print(json.dumps({k: v for k, v in metrics.items() if k != "loss_history"}, indent=2))
    if a.check_detector:
        from cotgen.world.detector import ShapesDetector
        from cotgen.world.prompts import build_shapes_eval_set

        out = Path(a.out)
        check = reconstruction_check(
            model, ShapesDetector.from_pretrained(a.check_detector), build_shapes_eval_set(),
            progress=not a.no_progress, grid_path=out / "reconstruction.png",
        )
        check.pop("results")
        (out / "reconstruction.json").write_text(json.dumps(check, indent=2) + "\n", encoding="utf-8")
        print(json.dumps(check, indent=2))
        metrics["reconstruction"] = check
    return metrics


if __name__ == "__main__":
    main()

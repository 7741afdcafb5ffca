"""Generator U-Net in the improved-diffusion style (Nichol & Dhariwal 2021), predicting eps.

Input: the noisy image x_t [B, C, H, W] concatenated with the condition mask [B, 1, H, W] (zeros for the
unconditional target model, so every target generator shares G_T^0's architecture and weights layout).
Residual blocks with GroupNorm + SiLU and timestep scale-shift, self-attention at chosen levels, a
zero-initialised output convolution. H and W must be divisible by 2 ** (len(channel_mult) - 1).
Every norm runs through :func:`vesselfast.ops.group_norm_act` (norm, modulation and SiLU in one op; a
fused kernel for channels_last CPU tensors), so the modules stay those of the saved checkpoints.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from vesselfast.ops.group_norm import group_norm_act
from vesselfast.schema import option


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [B, dim]: [cos, sin](t * exp(-ln(max_period) * k / half)), k = 0..half-1."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def divisor_at_most(ch: int, cap: int) -> int:
    """The largest divisor of ``ch`` that is at most ``cap`` (at least 1): how many groups or attention heads
    a ``ch``-channel layer gets, so that any width builds."""
    return next(g for g in range(max(1, min(cap, ch)), 0, -1) if ch % g == 0)


def _norm(ch: int) -> nn.GroupNorm:
    """ch / 4 groups, at most 32 (32 channels: 8 groups, 64: 16); where that does not divide ch, the largest
    divisor below it (the 144-channel concatenation of a base-48 network: 24 groups of 6)."""
    return nn.GroupNorm(divisor_at_most(ch, min(32, ch // 4)), ch)


def _norm_act(norm: nn.GroupNorm, x: torch.Tensor, scale=None, shift=None, silu: bool = True) -> torch.Tensor:
    """``silu(norm(x) * (1 + scale) + shift)`` (scale, shift [B, C] or None) as one op."""
    return group_norm_act(x, norm.num_groups, norm.weight, norm.bias, norm.eps, scale, shift, silu)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, dropout: float):
        super().__init__()
        self.in_layers = nn.Sequential(_norm(in_ch), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, 2 * out_ch))
        self.out_norm = _norm(out_ch)
        self.out_layers = nn.Sequential(nn.SiLU(), nn.Dropout(dropout), _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1)))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x, emb):
        norm, _, conv = self.in_layers
        h = conv(_norm_act(norm, x))
        scale, shift = self.emb(emb).chunk(2, dim=1)
        _, dropout, out_conv = self.out_layers
        return self.skip(x) + out_conv(dropout(_norm_act(self.out_norm, h, scale, shift)))


class AttentionBlock(nn.Module):
    def __init__(self, ch: int, head_channels: int = 32):
        super().__init__()
        self.heads = divisor_at_most(ch, ch // head_channels)  # ch / head_channels, or the largest divisor below it
        self.norm = _norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = _zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x):
        b, c, h, w = x.shape
        qkv = self.qkv(_norm_act(self.norm, x, silu=False))
        q, k, v = qkv.reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        a = F.scaled_dot_product_attention(q, k, v)  # [b, heads, hw, c/heads]
        return x + self.proj(a.transpose(-1, -2).reshape(b, c, h, w))


@dataclass
class GeneratorArch:
    """The generator's architecture, the one place its fields and defaults live: the run config's
    ``generator`` section extends it (pipeline/config.py), every generator checkpoint stores it
    (:func:`arch_dict`), and :func:`generator_from_dict` rebuilds the network from it. The defaults are
    the CPU presets' network: base 32, multipliers (1, 2, 2), one residual block, no attention (1.05M
    parameters). ``attention_levels`` index ``channel_mult``. Each field's range is declared with it
    (vesselfast/schema.py)."""
    base_channels: int = option(32, ge=1)
    channel_mult: Sequence[int] = option(factory=lambda: [1, 2, 2], nonempty=True, ge=1, what="multipliers")
    num_res_blocks: int = option(1, ge=0)
    attention_levels: Sequence[int] = option(factory=list, ge=0, what="levels (indices into channel_mult)")
    dropout: float = option(0.0, ge=0.0, lt=1.0)


ARCH_FIELDS = tuple(f.name for f in fields(GeneratorArch))


def arch_dict(cfg) -> dict:
    """The architecture fields of ``cfg`` (a GeneratorArch, the run config's generator section, or a
    view of it), as saved with every generator stage."""
    return {name: list(v) if isinstance(v := getattr(cfg, name), (list, tuple)) else v for name in ARCH_FIELDS}


class GeneratorUNet(nn.Module):
    """eps_theta(x_t, t, mask). ``forward(x [B,C,H,W], t LongTensor [B], cond [B,1,H,W] or None) -> [B,C,H,W]``."""

    def __init__(self, cfg: Optional[GeneratorArch] = None, image_channels: int = 1):
        super().__init__()
        self.cfg = cfg = cfg if cfg is not None else GeneratorArch()
        ch = cfg.base_channels
        emb_ch = 4 * ch
        self.time_embed = nn.Sequential(nn.Linear(ch, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.input_conv = nn.Conv2d(image_channels + 1, ch, 3, padding=1)
        self.down = nn.ModuleList()
        skips = [ch]
        cur = ch
        levels = len(cfg.channel_mult)
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                blocks = [ResBlock(cur, ch * mult, emb_ch, cfg.dropout)]
                cur = ch * mult
                if level in cfg.attention_levels:
                    blocks.append(AttentionBlock(cur))
                self.down.append(nn.ModuleList(blocks))
                skips.append(cur)
            if level != levels - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(cur, cur, 3, stride=2, padding=1)]))
                skips.append(cur)
        self.middle = nn.ModuleList([ResBlock(cur, cur, emb_ch, cfg.dropout), AttentionBlock(cur),
                                     ResBlock(cur, cur, emb_ch, cfg.dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                blocks = [ResBlock(cur + skips.pop(), ch * mult, emb_ch, cfg.dropout)]
                cur = ch * mult
                if level in cfg.attention_levels:
                    blocks.append(AttentionBlock(cur))
                if level != 0 and i == cfg.num_res_blocks:
                    blocks.append(nn.Upsample(scale_factor=2, mode="nearest"))
                    blocks.append(nn.Conv2d(cur, cur, 3, padding=1))
                self.up.append(nn.ModuleList(blocks))
        self.out = nn.Sequential(_norm(cur), nn.SiLU(), _zero(nn.Conv2d(cur, image_channels, 3, padding=1)))
        self.divisor = 2 ** (levels - 1)

    @staticmethod
    def _run_blocks(blocks, h, emb):
        for layer in blocks:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.shape[-1] % self.divisor or x.shape[-2] % self.divisor:
            raise ValueError(f"generator input {tuple(x.shape[-2:])} must be divisible by {self.divisor}")
        if cond is None:
            cond = torch.zeros_like(x[:, :1])
        emb = self.time_embed(timestep_embedding(t, self.cfg.base_channels).to(x.dtype))
        h = self.input_conv(torch.cat([x, cond.to(x.dtype)], dim=1))
        hs = [h]
        for blocks in self.down:
            h = self._run_blocks(blocks, h, emb)
            hs.append(h)
        h = self._run_blocks(self.middle, h, emb)
        for blocks in self.up:
            h = self._run_blocks(blocks, torch.cat([h, hs.pop()], dim=1), emb)
        norm, _, conv = self.out
        return conv(_norm_act(norm, h))


def generator_from_dict(d: dict) -> GeneratorUNet:
    """The network of a saved architecture (:func:`arch_dict`)."""
    d = dict(d)
    for key in ("channel_mult", "attention_levels"):
        if key in d:
            d[key] = tuple(d[key])
    return GeneratorUNet(GeneratorArch(**d))

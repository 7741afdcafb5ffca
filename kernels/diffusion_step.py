"""Triton kernel of the generic diffusion update (DDIM step, DDIM inversion step, DDPM step).

Same math as ``csrc/include/vesselfast/step_math.h``; per sample b with coefficients
``coef[b] = (cx, ce, a, b, d, s)`` and every element of that sample:

    x0   = clip(cx * x - ce * eps)          (clip to [-1, 1] when CLIP)
    out  = a * x0 + b * (cx * x - x0) / ce + d * x + s * z

Loads widen to float32, math is float32, stores narrow to the tensor's dtype (float32, bfloat16,
float16). Grid: (blocks over one sample, samples), so the six coefficients are loaded once per program.
On CPU tensors the kernel runs only under ``TRITON_INTERPRET=1`` (the tests); there the block is made
large because the interpreter costs ~0.5 ms per program instance.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from vesselfast.ops.diffusion_step import NUM_COEF
from vesselfast.ops.registry import KERNEL_DTYPES

GPU_BLOCK = 2048          # elements per program on a GPU (num_warps=4 -> 16 per thread)
INTERPRET_BLOCK = 1 << 16  # elements per program under the CPU interpreter


@triton.jit
def diffusion_step_kernel(x_ptr, eps_ptr, z_ptr, coef_ptr, out_ptr, x0_ptr, per_sample,
                          CLIP: tl.constexpr, USE_EPS: tl.constexpr, HAS_NOISE: tl.constexpr,
                          NEED_X0: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    cbase = coef_ptr + b * 6
    cx = tl.load(cbase + 0)
    ce = tl.load(cbase + 1)
    ca = tl.load(cbase + 2)
    cb = tl.load(cbase + 3)
    cd = tl.load(cbase + 4)
    cs = tl.load(cbase + 5)
    inner = pid * BLOCK + tl.arange(0, BLOCK)
    mask = inner < per_sample
    offs = b.to(tl.int64) * per_sample + inner
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    eps = tl.load(eps_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    scaled = cx * x
    x0 = scaled - ce * eps
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -1.0), 1.0)
    out = ca * x0 + cd * x
    if HAS_NOISE:
        z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        out += cs * z
    if USE_EPS:
        out += cb * ((scaled - x0) / ce)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    if NEED_X0:
        tl.store(x0_ptr + offs, x0.to(x0_ptr.dtype.element_ty), mask=mask)


def pick_block(per_sample: int, device: torch.device, block: Optional[int] = None) -> int:
    if block is not None:
        return block
    if device.type == "cpu":  # interpreter: few, large programs
        return min(INTERPRET_BLOCK, max(16, triton.next_power_of_2(per_sample)))
    return GPU_BLOCK


def _check(t: torch.Tensor, ref: torch.Tensor, name: str):
    if t.dtype not in KERNEL_DTYPES:
        raise TypeError(f"vesselfast triton: {name} must be float32, bfloat16 or float16, got {t.dtype}")
    if t.shape != ref.shape or t.dtype != ref.dtype or t.device != ref.device:
        raise ValueError(f"vesselfast triton: {name} must match x ({tuple(ref.shape)}, {ref.dtype}, {ref.device}),"
                         f" got ({tuple(t.shape)}, {t.dtype}, {t.device})")
    if not t.is_contiguous():
        raise ValueError(f"vesselfast triton: {name} must be contiguous (the public ops call .contiguous())")


def diffusion_step(x: torch.Tensor, eps: torch.Tensor, coef: torch.Tensor, noise: Optional[torch.Tensor],
                   clip: bool, need_x0: bool, block: Optional[int] = None,
                   out: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generic update; ``coef`` float32 [B, 6]. Returns (out, x0) with x0 empty unless ``need_x0``.
    ``out``: a contiguous buffer like x to write into (it must not overlap the inputs)."""
    _check(x, x, "x")
    _check(eps, x, "eps")
    if noise is not None:
        _check(noise, x, "noise")
    batch = x.shape[0]
    if coef.dtype != torch.float32 or tuple(coef.shape) != (batch, NUM_COEF) or coef.device != x.device:
        raise ValueError(f"vesselfast triton: coef must be float32 [{batch}, {NUM_COEF}] on {x.device}")
    coef = coef.contiguous()
    per_sample = x.numel() // batch if batch else 0
    if out is None:
        out = torch.empty_like(x)
    else:
        _check(out, x, "out")
    x0 = torch.empty_like(x) if need_x0 else x.new_empty(0)
    if x.numel() == 0:
        return out, x0
    # b == 0 for every sample (DDPM) means eps' is never needed: skip the division. On a GPU the division
    # is free (memory-bound) and asking would cost a device->host sync (and break CUDA graph capture),
    # so there the kernel always computes it: b * eps' adds exactly 0 when b == 0 (abar_t < 1, so ce > 0).
    use_eps = True if x.is_cuda else bool((coef[:, 3] != 0).any())
    blk = pick_block(per_sample, x.device, block)
    grid = (triton.cdiv(per_sample, blk), batch)
    diffusion_step_kernel[grid](
        x, eps, noise if noise is not None else x, coef, out, x0 if need_x0 else out, per_sample,
        CLIP=bool(clip), USE_EPS=use_eps, HAS_NOISE=noise is not None, NEED_X0=bool(need_x0), BLOCK=blk,
        num_warps=4)
    return out, x0

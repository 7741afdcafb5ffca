"""Triton kernels of the vessel-weighted noise loss (docs/METHOD.md, section 7), forward and backward.

Per sample b over its N elements, d = eps - eps_hat:
    loss_b = 0.5 * sum(d^2) / N + sum(w d^2) / (sum(w) + 1)
    d loss_b / d eps_hat = -2 * (0.5 / N + w / (sum(w) + 1)) * d

Forward, two passes, deterministic (no atomics): ``_partial_kernel`` writes per-block float32 sums
(d^2, w d^2, w) to a [B, nblocks, 3] workspace; ``_finalize_kernel`` (one program per sample) adds them
in a fixed order and writes loss[B] and sum_w[B] (float32). Backward is one elementwise pass.
Inputs: float32/bfloat16/float16, contiguous, same shape and dtype; ``w`` may be None (w = 0).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from vesselfast.kernels.diffusion_step import _check, pick_block

FINAL_BLOCK = 1024


@triton.jit
def _partial_kernel(eps_ptr, hat_ptr, w_ptr, part_ptr, n, nblocks, HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    inner = pid * BLOCK + tl.arange(0, BLOCK)
    mask = inner < n
    offs = b.to(tl.int64) * n + inner
    e = tl.load(eps_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    h = tl.load(hat_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    d = e - h
    d2 = d * d
    base = part_ptr + (b.to(tl.int64) * nblocks + pid) * 3
    tl.store(base + 0, tl.sum(d2, axis=0))
    if HAS_W:
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(base + 1, tl.sum(w * d2, axis=0))
        tl.store(base + 2, tl.sum(w, axis=0))
    else:
        tl.store(base + 1, 0.0)
        tl.store(base + 2, 0.0)


@triton.jit
def _finalize_kernel(part_ptr, loss_ptr, sumw_ptr, nblocks, inv_n_half, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    acc_d2 = tl.zeros([BLOCK], dtype=tl.float32)
    acc_wd2 = tl.zeros([BLOCK], dtype=tl.float32)
    acc_w = tl.zeros([BLOCK], dtype=tl.float32)
    base = part_ptr + b.to(tl.int64) * nblocks * 3
    for start in range(0, nblocks, BLOCK):
        j = start + tl.arange(0, BLOCK)
        m = j < nblocks
        acc_d2 += tl.load(base + j * 3 + 0, mask=m, other=0.0)
        acc_wd2 += tl.load(base + j * 3 + 1, mask=m, other=0.0)
        acc_w += tl.load(base + j * 3 + 2, mask=m, other=0.0)
    d2 = tl.sum(acc_d2, axis=0)
    wd2 = tl.sum(acc_wd2, axis=0)
    sw = tl.sum(acc_w, axis=0)
    tl.store(loss_ptr + b, d2 * inv_n_half + wd2 / (sw + 1.0))
    tl.store(sumw_ptr + b, sw)


@triton.jit
def _backward_kernel(g_ptr, sumw_ptr, eps_ptr, hat_ptr, w_ptr, out_ptr, n, inv_n_half,
                     HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    m2g = -2.0 * tl.load(g_ptr + b)
    inner = pid * BLOCK + tl.arange(0, BLOCK)
    mask = inner < n
    offs = b.to(tl.int64) * n + inner
    e = tl.load(eps_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    h = tl.load(hat_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    k = inv_n_half
    if HAS_W:
        inv_wsum1 = 1.0 / (tl.load(sumw_ptr + b) + 1.0)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        k = inv_n_half + w * inv_wsum1
    tl.store(out_ptr + offs, (m2g * k * (e - h)).to(out_ptr.dtype.element_ty), mask=mask)


def _inputs(eps, eps_hat, w):
    _check(eps, eps, "eps")
    _check(eps_hat, eps, "eps_hat")
    if w is not None:
        _check(w, eps, "w")
    batch = eps.shape[0]
    return batch, (eps.numel() // batch if batch else 0)


def vessel_noise_loss_fwd(eps: torch.Tensor, eps_hat: torch.Tensor, w: Optional[torch.Tensor],
                          block: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss [B] float32, sum_w [B] float32)."""
    batch, n = _inputs(eps, eps_hat, w)
    loss = torch.empty(batch, dtype=torch.float32, device=eps.device)
    sum_w = torch.empty(batch, dtype=torch.float32, device=eps.device)
    if batch == 0:
        return loss, sum_w
    blk = pick_block(n, eps.device, block)
    nblocks = triton.cdiv(n, blk)
    part = torch.empty((batch, nblocks, 3), dtype=torch.float32, device=eps.device)
    _partial_kernel[(nblocks, batch)](eps, eps_hat, w if w is not None else eps, part, n, nblocks,
                                      HAS_W=w is not None, BLOCK=blk, num_warps=4)
    fblk = min(FINAL_BLOCK, max(16, triton.next_power_of_2(nblocks)))
    _finalize_kernel[(batch,)](part, loss, sum_w, nblocks, 0.5 / n, BLOCK=fblk, num_warps=4)
    return loss, sum_w


def vessel_noise_loss_bwd(grad: torch.Tensor, eps: torch.Tensor, eps_hat: torch.Tensor, w: Optional[torch.Tensor],
                          sum_w: torch.Tensor, block: Optional[int] = None) -> torch.Tensor:
    """Gradient w.r.t. eps_hat (eps_hat's dtype) from grad_loss [B] and the forward's sum_w [B]."""
    batch, n = _inputs(eps, eps_hat, w)
    if grad.numel() != batch or sum_w.numel() != batch:
        raise ValueError(f"vesselfast triton: grad_loss and sum_w must have {batch} elements")
    grad = grad.to(device=eps.device, dtype=torch.float32).contiguous()
    sum_w = sum_w.to(device=eps.device, dtype=torch.float32).contiguous()
    out = torch.empty_like(eps_hat)
    if eps.numel() == 0:
        return out
    blk = pick_block(n, eps.device, block)
    _backward_kernel[(triton.cdiv(n, blk), batch)](grad, sum_w, eps, eps_hat, w if w is not None else eps, out, n,
                                                  0.5 / n, HAS_W=w is not None, BLOCK=blk, num_warps=4)
    return out

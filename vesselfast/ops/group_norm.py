"""Group norm with a per-sample affine and an optional SiLU, fused for channels_last CPU tensors.

For x [B, C, H, W] in G groups, per sample b and group g (mean and biased variance over the group's
C/G channels and all pixels):
    z = (x - mean_bg) / sqrt(var_bg + eps) * scale[b, c] + shift[b, c],    y = silu(z) (or z)
The generator's blocks all have this form: ``GroupNorm -> SiLU`` (weight and bias as scale and shift of
every sample) and ``GroupNorm -> * (1 + s) + t -> SiLU`` (the timestep modulation folded in:
scale = weight (1 + s), shift = bias (1 + s) + t). :func:`group_norm_act` takes the module's weight and
bias and the optional modulation and does the folding.

Why a kernel: the generator trains fastest with its activations in channels_last (oneDNN's convolutions
then run without layout reorders), but ATen's group norm is slow in that layout (its backward ~4x in
bfloat16); the compiled op (csrc/cpu/group_norm_cpu.cpp) reads channels_last directly, computes in
float32 and folds the SiLU into the same passes. ``auto`` picks it for channels_last CPU tensors; every
other tensor (NCHW, CUDA, float64) gets the reference, plain torch.

This module holds the op's Python side: the reference, the fake kernels and the autograd of the compiled
ops ``torch.ops.vesselfast.group_norm_act_fwd`` / ``_bwd``, the backend and the public function.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from vesselfast import _ext
from vesselfast.ops.registry import new_op, resolve


def group_norm_act_reference(x: torch.Tensor, groups: int, scale: torch.Tensor, shift: torch.Tensor,
                             eps: float = 1e-5, silu: bool = True) -> torch.Tensor:
    """The spec, with plain autograd, in float32 (float64 for float64 x).

    :param x: an [N x C x H x W] Tensor.
    :param scale: an [N x C] Tensor, the per-sample affine's factor; ``shift`` like it.
    :return: an [N x C x H x W] Tensor of x's dtype.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    z = F.group_norm(x.to(acc), groups, None, None, eps)
    z = torch.addcmul(shift.to(acc)[:, :, None, None], z, scale.to(acc)[:, :, None, None])
    return (F.silu(z) if silu else z).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# The compiled ops (csrc/): fake kernels, so torch.compile and torch.export trace calls without running
# them, and the forward's autograd, whose backward is the _bwd op (it recomputes z from x).
# ----------------------------------------------------------------------------------------------
def _fake_fwd(x, scale, shift, groups, eps, silu):
    """(y like x, mean and rstd float32 [B, groups])."""
    stats = x.new_empty((x.shape[0], groups), dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.channels_last), stats, torch.empty_like(stats)


def _fake_bwd(grad, x, scale, shift, mean, rstd, groups, silu):
    """(dx like x, dscale, dshift like scale)."""
    return torch.empty_like(x, memory_format=torch.channels_last), torch.empty_like(scale), torch.empty_like(shift)


def _setup_context(ctx, inputs, output) -> None:
    x, scale, shift, groups, _eps, silu = inputs
    ctx.save_for_backward(x, scale, shift, output[1], output[2])
    ctx.groups, ctx.silu = groups, silu


def _backward(ctx, grad, _grad_mean, _grad_rstd):
    x, scale, shift, mean, rstd = ctx.saved_tensors
    grad = grad.to(x.dtype).contiguous(memory_format=torch.channels_last)
    dx, dscale, dshift = torch.ops.vesselfast.group_norm_act_bwd(grad, x, scale, shift, mean, rstd, ctx.groups,
                                                                 ctx.silu)
    return dx, dscale, dshift, None, None, None


if _ext.cpu_built():  # the ops exist only in a build with the extension
    torch.library.register_fake("vesselfast::group_norm_act_fwd", _fake_fwd)
    torch.library.register_fake("vesselfast::group_norm_act_bwd", _fake_bwd)
    torch.library.register_autograd("vesselfast::group_norm_act_fwd", _backward, setup_context=_setup_context)


def _compiled(x, groups, scale, shift, eps, silu):
    x = x.contiguous(memory_format=torch.channels_last)
    return torch.ops.vesselfast.group_norm_act_fwd(x, scale.contiguous(), shift.contiguous(), groups, eps, silu)[0]


group_norm_act_op = new_op("group_norm_act", group_norm_act_reference)
group_norm_act_op.impls.update(cpu=_compiled)


def is_channels_last(x: torch.Tensor) -> bool:
    """True when x [N, C, H, W] is laid out channels_last (and not also plainly contiguous, as when C == 1)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def group_norm_act(x: torch.Tensor, groups: int, weight: Optional[torch.Tensor] = None,
                   bias: Optional[torch.Tensor] = None, eps: float = 1e-5, scale: Optional[torch.Tensor] = None,
                   shift: Optional[torch.Tensor] = None, silu: bool = True, backend: str = "auto") -> torch.Tensor:
    """``silu((GroupNorm(x) * weight + bias) * (1 + scale) + shift)``; see the module docstring.

    :param x: an [N x C x H x W] Tensor.
    :param groups: the number of groups; C must be divisible by it.
    :param weight: a [C] Tensor, the norm's affine factor (None: 1); ``bias`` likewise (None: 0).
    :param scale: an [N x C] Tensor, the per-sample modulation (None: 0); ``shift`` likewise.
    :param silu: apply SiLU to the result.
    :param backend: 'auto' (the cpu kernel for channels_last CPU tensors, else 'torch') or a backend name.
    :return: an [N x C x H x W] Tensor of x's dtype (channels_last from the kernel).
    """
    n, c = x.shape[:2]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32  # the folded affine's dtype
    a = torch.ones(c, device=x.device, dtype=acc) if weight is None else weight.to(acc)
    b = torch.zeros(c, device=x.device, dtype=acc) if bias is None else bias.to(acc)
    a, b = a.expand(n, c), b.expand(n, c)
    if scale is not None:
        s = 1 + scale.to(acc).reshape(n, c)
        a, b = a * s, b * s
    if shift is not None:
        b = b + shift.to(acc).reshape(n, c)
    if backend == "auto" and not (x.device.type == "cpu" and is_channels_last(x)):
        backend = "torch"
    name = resolve(group_norm_act_op.name, x.device, backend, x.dtype)
    return group_norm_act_op.impls[name](x, groups, a, b, eps, silu)

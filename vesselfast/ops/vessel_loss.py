"""Vessel-weighted noise loss (docs/METHOD.md, section 7), fused forward and backward.

Per sample b, with d = eps - eps_hat over the sample's N elements:
    L_b = 0.5 * mean(d^2) + sum(w * d^2) / (sum(w) + 1)
w is 1 within 2 px of a vessel (the mask dilated by 2, see vesselfast.data) and 0 elsewhere; pass
``w=None`` for the unconditional target generator (w = 0). Shapes: eps, eps_hat, w [B, ...]; returns
float32 [B] (``reduction="none"``) or its mean. Gradients flow to eps_hat only.

This module holds the whole op on the Python side: the reference, the fake kernels and the autograd of
the compiled ops ``torch.ops.vesselfast.vessel_noise_loss_fwd`` / ``_bwd`` (registered at import when
the extension is built; schemas and device kernels in csrc/), the autograd of the Triton kernels
(kernels/vessel_loss.py), the backends and the public :func:`vessel_noise_loss`.
"""
from __future__ import annotations

from typing import Optional

import torch

from vesselfast import _ext
from vesselfast.ops.registry import new_op, resolve


def vessel_noise_loss_reference(eps: torch.Tensor, eps_hat: torch.Tensor, w: Optional[torch.Tensor] = None):
    """The spec, with plain autograd.

    :param eps: an [N x ...] Tensor; ``eps_hat`` like it; ``w`` like it, or None.
    :return: the per-sample loss, an [N] float32 Tensor (float64 for float64 eps_hat).
    """
    acc = torch.float64 if eps_hat.dtype == torch.float64 else torch.float32
    d2 = (eps.detach().to(acc) - eps_hat.to(acc)).pow(2).flatten(1)
    loss = 0.5 * d2.mean(dim=1)
    if w is not None:
        w = w.detach().to(acc).flatten(1)
        loss = loss + (w * d2).sum(dim=1) / (w.sum(dim=1) + 1.0)
    return loss


# ----------------------------------------------------------------------------------------------
# The compiled ops torch.ops.vesselfast.vessel_noise_loss_fwd / _bwd (csrc/): fake kernels, so
# torch.compile and torch.export trace calls without running them, and the forward's autograd, whose
# backward is the _bwd op (it recomputes d from the saved inputs instead of storing it).
# ----------------------------------------------------------------------------------------------
def _fake_fwd(eps, eps_hat, w):
    """(loss, sum_w), each float32 [B]."""
    b = eps.shape[0]
    return eps.new_empty((b,), dtype=torch.float32), eps.new_empty((b,), dtype=torch.float32)


def _fake_bwd(grad_loss, eps, eps_hat, w, sum_w):
    """The gradient w.r.t. eps_hat, like eps_hat."""
    return torch.empty_like(eps_hat)


def _setup_context(ctx, inputs, output) -> None:
    eps, eps_hat, w = inputs
    ctx.save_for_backward(eps, eps_hat, w, output[1])


def _backward(ctx, grad_loss, _grad_sum_w):
    eps, eps_hat, w, sum_w = ctx.saved_tensors
    grad_hat = torch.ops.vesselfast.vessel_noise_loss_bwd(grad_loss.float().contiguous(), eps, eps_hat, w, sum_w)
    return None, grad_hat, None


if _ext.cpu_built():  # the ops exist only in a build with the extension
    torch.library.register_fake("vesselfast::vessel_noise_loss_fwd", _fake_fwd)
    torch.library.register_fake("vesselfast::vessel_noise_loss_bwd", _fake_bwd)
    torch.library.register_autograd("vesselfast::vessel_noise_loss_fwd", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Backends: fn(eps, eps_hat, w, backend) -> loss [B] float32, differentiable w.r.t. eps_hat.
# ----------------------------------------------------------------------------------------------
def _compiled(eps, eps_hat, w, backend):
    return torch.ops.vesselfast.vessel_noise_loss_fwd(eps, eps_hat, w)[0]


class TritonVesselNoiseLoss(torch.autograd.Function):
    """Autograd of the Triton (forward, backward) kernel pair; backward recomputes d from the saved inputs
    instead of storing it (one extra read, no extra activation memory), as the compiled kernels do."""

    @staticmethod
    def forward(ctx, eps, eps_hat, w, backend):
        from vesselfast.kernels.vessel_loss import vessel_noise_loss_fwd
        loss, sum_w = vessel_noise_loss_fwd(eps, eps_hat, w)
        ctx.save_for_backward(eps, eps_hat, w, sum_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        from vesselfast.kernels.vessel_loss import vessel_noise_loss_bwd
        eps, eps_hat, w, sum_w = ctx.saved_tensors
        return None, vessel_noise_loss_bwd(grad_loss.float().contiguous(), eps, eps_hat, w, sum_w), None, None


vessel_noise_loss_op = new_op("vessel_noise_loss", vessel_noise_loss_reference)
vessel_noise_loss_op.impls.update(cpu=_compiled, cuda=_compiled, triton=TritonVesselNoiseLoss.apply)


def vessel_noise_loss(eps: torch.Tensor, eps_hat: torch.Tensor, w: Optional[torch.Tensor] = None,
                      reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """The generator's training loss; see the module docstring.

    :param eps: an [N x ...] Tensor, the noise that was added (no gradient flows to it).
    :param eps_hat: an [N x ...] Tensor like eps, the network's prediction.
    :param w: an [N x ...] 0/1 Tensor like eps, the dilated vessel mask (no gradient), or None.
    :param reduction: 'mean' (a float32 scalar) or 'none' (float32 [N]).
    :param backend: 'auto' or one of ``BACKENDS``; resolved once per traced graph under torch.compile.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    name = resolve(vessel_noise_loss_op.name, eps_hat.device, backend, eps_hat.dtype)
    if name == "torch":
        loss = vessel_noise_loss_reference(eps, eps_hat, w)
    else:
        # Kernels want one dtype: eps and w follow eps_hat (w is 0/1, exact in every float type).
        eps = eps.detach().to(eps_hat.dtype).contiguous()
        w = None if w is None else w.detach().to(eps_hat.dtype).contiguous()
        loss = vessel_noise_loss_op.impls[name](eps, eps_hat.contiguous(), w, name)
    return loss.mean() if reduction == "mean" else loss

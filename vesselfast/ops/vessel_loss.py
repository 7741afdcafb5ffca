"""Vessel-weighted noise loss (docs/METHOD.md, section 7), fused forward and backward.

Per sample b, with d = eps - eps_hat over the sample's N elements:
    L_b = 0.5 * mean(d^2) + sum(w * d^2) / (sum(w) + 1)
w is 1 within 2 px of a vessel (the mask dilated by 2, see vesselfast.data) and 0 elsewhere; pass
``w=None`` for the unconditional target generator (w = 0). Shapes: eps, eps_hat, w [B, ...]; returns
float32 [B] (``reduction="none"``) or its mean. Gradients flow to eps_hat only.
"""
from __future__ import annotations

from typing import Optional

import torch

from vesselfast.ops.registry import new_op


def vessel_noise_loss_reference(eps: torch.Tensor, eps_hat: torch.Tensor, w: Optional[torch.Tensor] = None):
    """Per-sample loss [B] in float32 (float64 for float64 inputs); plain autograd."""
    acc = torch.float64 if eps_hat.dtype == torch.float64 else torch.float32
    d2 = (eps.detach().to(acc) - eps_hat.to(acc)).pow(2).flatten(1)
    loss = 0.5 * d2.mean(dim=1)
    if w is not None:
        w = w.detach().to(acc).flatten(1)
        loss = loss + (w * d2).sum(dim=1) / (w.sum(dim=1) + 1.0)
    return loss


def _compiled(eps, eps_hat, w, backend):
    """torch.ops.vesselfast.vessel_noise_loss_fwd: autograd and fake kernel registered (ops/library.py)."""
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
    """The generator's training loss; see the module docstring. ``reduction``: 'mean' or 'none'."""
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    name = vessel_noise_loss_op.pick(eps_hat.device, backend, eps_hat.dtype)
    if name == "torch":
        loss = vessel_noise_loss_reference(eps, eps_hat, w)
    else:
        # Kernels want one dtype: eps and w follow eps_hat (w is 0/1, exact in every float type).
        eps = eps.detach().to(eps_hat.dtype).contiguous()
        w = None if w is None else w.detach().to(eps_hat.dtype).contiguous()
        loss = vessel_noise_loss_op.impls[name](eps, eps_hat.contiguous(), w, name)
    return loss.mean() if reduction == "mean" else loss

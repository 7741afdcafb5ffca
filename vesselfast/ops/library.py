"""Python-side registrations of the compiled ops ``torch.ops.vesselfast.*`` (schemas and device kernels
live in csrc/): fake kernels, so ``torch.compile`` and ``torch.export`` can trace calls without running
them, and autograd formulas, so gradients flow through the ops themselves.

Called once by :func:`vesselfast._ext.load` right after the extension is imported.
"""
from __future__ import annotations

import torch

_DONE = False


def _per_sample(coef: torch.Tensor, col: int, like: torch.Tensor) -> torch.Tensor:
    """Column ``col`` of the [B, 6] table, shaped [B, 1, ...] to broadcast over ``like``."""
    return coef[:, col].reshape(-1, *([1] * (like.dim() - 1)))


def _diffusion_step_grads(x, eps, coef, clip, grad_out, grad_x0):
    """Gradients of out = a x0 + b (cx x - x0)/ce + d x + s z and of x0 = clip(cx x - ce eps) w.r.t. x,
    eps and z, in float32 (the kernels' arithmetic), from the saved inputs."""
    xf, ef = x.float(), eps.float()
    cx, ce, a, b, d, s = (_per_sample(coef, i, xf) for i in range(6))
    raw = cx * xf - ce * ef
    inside = ((raw >= -1) & (raw <= 1)).float() if clip else torch.ones_like(raw)  # clamp's gradient
    g_x0 = torch.zeros_like(xf)  # d loss / d x0 through both outputs
    grad_x = torch.zeros_like(xf)
    grad_z = None
    if grad_out is not None:
        go = grad_out.float()
        g_x0 = g_x0 + go * (a - b / ce)
        grad_x = grad_x + go * (b * cx / ce + d)
        grad_z = go * s
    if grad_x0 is not None and grad_x0.numel():
        g_x0 = g_x0 + grad_x0.float()
    g_raw = g_x0 * inside
    grad_x = grad_x + g_raw * cx
    grad_eps = -g_raw * ce
    return grad_x.to(x.dtype), grad_eps.to(eps.dtype), None if grad_z is None else grad_z.to(x.dtype)


def register() -> None:
    global _DONE
    if _DONE:
        return
    _DONE = True
    lib = torch.library

    @lib.register_fake("vesselfast::diffusion_step")
    def _(x, eps, coef, noise, clip, need_x0):
        return torch.empty_like(x), (torch.empty_like(x) if need_x0 else x.new_empty(0))

    @lib.register_fake("vesselfast::diffusion_step_out")
    def _(x, eps, coef, noise, clip, out):
        return None

    @lib.register_fake("vesselfast::vessel_noise_loss_fwd")
    def _(eps, eps_hat, w):
        b = eps.shape[0]
        return eps.new_empty((b,), dtype=torch.float32), eps.new_empty((b,), dtype=torch.float32)

    @lib.register_fake("vesselfast::vessel_noise_loss_bwd")
    def _(grad_loss, eps, eps_hat, w, sum_w):
        return torch.empty_like(eps_hat)

    def step_setup(ctx, inputs, output):
        x, eps, coef, noise, clip, _need_x0 = inputs
        ctx.save_for_backward(x, eps, coef)
        ctx.clip, ctx.has_noise = clip, noise is not None

    def step_backward(ctx, grad_out, grad_x0):
        x, eps, coef = ctx.saved_tensors
        gx, ge, gz = _diffusion_step_grads(x, eps, coef, ctx.clip, grad_out, grad_x0)
        return gx, ge, None, gz if ctx.has_noise else None, None, None

    lib.register_autograd("vesselfast::diffusion_step", step_backward, setup_context=step_setup)

    def loss_setup(ctx, inputs, output):
        eps, eps_hat, w = inputs
        ctx.save_for_backward(eps, eps_hat, w, output[1])

    def loss_backward(ctx, grad_loss, _grad_sum_w):
        eps, eps_hat, w, sum_w = ctx.saved_tensors
        grad_hat = torch.ops.vesselfast.vessel_noise_loss_bwd(grad_loss.float().contiguous(), eps, eps_hat, w, sum_w)
        return None, grad_hat, None

    lib.register_autograd("vesselfast::vessel_noise_loss_fwd", loss_backward, setup_context=loss_setup)

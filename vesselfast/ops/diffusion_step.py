"""Fused diffusion updates: ``ddim_step``, ``ddim_inverse_step``, ``ddpm_step``.

Each public function (1) computes its per-sample coefficients in float64 from the alpha_bar values,
(2) hands x_t, eps, the coefficient table and optional noise to one generic kernel
``out = a * x0 + b * eps' + d * x_t + s * z`` (csrc/include/vesselfast/step_math.h), with
``x0 = clip(sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps)`` and ``eps' = (sqrt(1/abar_t) x_t - x0) / sqrt(1/abar_t - 1)``.
The ``*_reference`` functions beside them are the spec, written straight from docs/METHOD.md (sections 4-5);
they are the ``torch`` backend and what tests and benchmarks compare against.

This module holds the whole op on the Python side: the reference, the coefficient tables, the fake
kernels and the autograd formula of the compiled ops ``torch.ops.vesselfast.diffusion_step`` and
``diffusion_step_out`` (registered at import when the extension is built; schemas and device kernels in
csrc/, the Triton kernel in kernels/diffusion_step.py), the backends and the three public functions.

Shapes: x_t, eps, noise are [B, ...] (any trailing shape, NCHW in practice); alpha_bar_* are [B] tensors
or Python floats (broadcast to the batch). Non-contiguous inputs are copied to contiguous ones.
Kernels accumulate in float32 for float32/bfloat16/float16 inputs; the reference computes in the
input dtype (float64 inputs give the float64 ground truth).
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple, Union

import numpy as np
import torch

from vesselfast import _ext
from vesselfast.ops.registry import new_op, resolve

Abar = Union[float, torch.Tensor]
NUM_COEF = 6  # cx, ce, a, b, d, s (order fixed by StepCoef in step_math.h; the Triton kernel reads it here)


# ----------------------------------------------------------------------------------------------
# Reference (the spec). Coefficients from float64 alpha_bar, cast to the working dtype per sample.
# ----------------------------------------------------------------------------------------------
def _per_sample(v: Abar, x: torch.Tensor) -> torch.Tensor:
    """alpha_bar as float64 [B] on x's device."""
    v = torch.as_tensor(v, dtype=torch.float64, device=x.device)
    return v.expand(x.shape[0]) if v.dim() == 0 else v.to(torch.float64).reshape(x.shape[0])


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B] float64 -> x's dtype, shaped [B, 1, 1, ...] to broadcast over x."""
    return v.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def pred_x0_reference(x_t, eps, alpha_bar_t: Abar, clip: bool = True):
    """Returns (x0, eps'): x0 = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps, clipped to [-1, 1] when
    ``clip``; eps' re-derived from the (clipped) x0."""
    abar_t = _per_sample(alpha_bar_t, x_t)
    recip = _bcast(torch.sqrt(1.0 / abar_t), x_t)
    recipm1 = _bcast(torch.sqrt(1.0 / abar_t - 1.0), x_t)
    x0 = recip * x_t - recipm1 * eps
    if clip:
        x0 = x0.clamp(-1.0, 1.0)
    eps_prime = (recip * x_t - x0) / recipm1
    return x0, eps_prime


def ddim_sigma(alpha_bar_t: torch.Tensor, alpha_bar_prev: torch.Tensor, eta: float) -> torch.Tensor:
    """sigma = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev) (float64 in, out)."""
    return eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) * torch.sqrt(1 - alpha_bar_t / alpha_bar_prev)


def ddim_step_reference(x_t, eps, alpha_bar_t: Abar, alpha_bar_prev: Abar, eta: float = 0.0,
                        noise: Optional[torch.Tensor] = None, clip: bool = True):
    """Returns (x_prev, x0). x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps' + sigma z."""
    abar_t, abar_prev = _per_sample(alpha_bar_t, x_t), _per_sample(alpha_bar_prev, x_t)
    x0, eps_prime = pred_x0_reference(x_t, eps, abar_t, clip)
    sigma = ddim_sigma(abar_t, abar_prev, eta)
    x_prev = _bcast(torch.sqrt(abar_prev), x_t) * x0 + _bcast(torch.sqrt(1 - abar_prev - sigma ** 2), x_t) * eps_prime
    if noise is not None and eta > 0:
        x_prev = x_prev + _bcast(sigma, x_t) * noise
    return x_prev, x0


def ddim_inverse_step_reference(x_t, eps, alpha_bar_t: Abar, alpha_bar_next: Abar, clip: bool = True):
    """Returns (x_next, x0). x_next = sqrt(abar_next) x0 + sqrt(1 - abar_next) eps' (eps from the level t)."""
    abar_next = _per_sample(alpha_bar_next, x_t)
    x0, eps_prime = pred_x0_reference(x_t, eps, alpha_bar_t, clip)
    return _bcast(torch.sqrt(abar_next), x_t) * x0 + _bcast(torch.sqrt(1 - abar_next), x_t) * eps_prime, x0


def ddpm_posterior(alpha_bar_t: torch.Tensor, alpha_bar_prev: torch.Tensor, variance: str = "fixed_large"):
    """float64 [B] -> (coef_x0, coef_xt, sigma) of q(x_{t-1} | x_t, x0) and the chosen sampling sigma.
    beta_t and alpha_t follow from the two alpha_bars; sigma is 0 at the last step (abar_prev == 1)."""
    alpha_t = alpha_bar_t / alpha_bar_prev
    beta_t = 1 - alpha_t
    coef_x0 = beta_t * torch.sqrt(alpha_bar_prev) / (1 - alpha_bar_t)
    coef_xt = (1 - alpha_bar_prev) * torch.sqrt(alpha_t) / (1 - alpha_bar_t)
    if variance == "fixed_large":
        var = beta_t
    elif variance == "fixed_small":
        var = beta_t * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
    else:
        raise ValueError(f"variance must be 'fixed_large' or 'fixed_small', got {variance!r}")
    sigma = torch.where(alpha_bar_prev >= 1.0, torch.zeros_like(var), torch.sqrt(var))
    return coef_x0, coef_xt, sigma


def ddpm_step_reference(x_t, eps, alpha_bar_t: Abar, alpha_bar_prev: Abar, noise: Optional[torch.Tensor] = None,
                        variance: str = "fixed_large", clip: bool = True):
    """Returns (x_{t-1}, x0). mu = coef_x0 x0 + coef_xt x_t; x_{t-1} = mu + sigma z."""
    abar_t, abar_prev = _per_sample(alpha_bar_t, x_t), _per_sample(alpha_bar_prev, x_t)
    x0, _ = pred_x0_reference(x_t, eps, abar_t, clip)
    coef_x0, coef_xt, sigma = ddpm_posterior(abar_t, abar_prev, variance)
    out = _bcast(coef_x0, x_t) * x0 + _bcast(coef_xt, x_t) * x_t
    if noise is not None:
        out = out + _bcast(sigma, x_t) * noise
    return out, x0


# ----------------------------------------------------------------------------------------------
# Coefficient tables for the generic kernel: float64 math, float32 [B, 6] for the kernels.
# ----------------------------------------------------------------------------------------------
def _table(abar_t: torch.Tensor, a, b, d, s) -> torch.Tensor:
    cx = torch.sqrt(1.0 / abar_t)
    ce = torch.sqrt(1.0 / abar_t - 1.0)
    zeros = torch.zeros_like(abar_t)
    cols = [cx, ce] + [zeros if c is None else c for c in (a, b, d, s)]
    return torch.stack(cols, dim=1).to(torch.float32).contiguous()


def ddim_coefficients(abar_t, abar_prev, eta: float) -> torch.Tensor:
    sigma = ddim_sigma(abar_t, abar_prev, eta)
    return _table(abar_t, torch.sqrt(abar_prev), torch.sqrt(1 - abar_prev - sigma ** 2), None, sigma)


def ddim_inverse_coefficients(abar_t, abar_next) -> torch.Tensor:
    return _table(abar_t, torch.sqrt(abar_next), torch.sqrt(1 - abar_next), None, None)


def ddpm_coefficients(abar_t, abar_prev, variance: str) -> torch.Tensor:
    coef_x0, coef_xt, sigma = ddpm_posterior(abar_t, abar_prev, variance)
    return _table(abar_t, coef_x0, None, coef_xt, sigma)


# ----------------------------------------------------------------------------------------------
# The compiled ops torch.ops.vesselfast.diffusion_step / diffusion_step_out (csrc/): fake kernels,
# so torch.compile and torch.export trace calls without running them, and the autograd formula.
# ----------------------------------------------------------------------------------------------
def _fake_step(x, eps, coef, noise, clip: bool, need_x0: bool):
    """Output metadata of ``diffusion_step``: (out like x, x0 like x or an empty tensor)."""
    return torch.empty_like(x), (torch.empty_like(x) if need_x0 else x.new_empty(0))


def _fake_step_out(x, eps, coef, noise, clip: bool, out) -> None:
    """``diffusion_step_out`` writes into ``out`` and returns nothing."""
    return None


def _diffusion_step_grads(x: torch.Tensor, eps: torch.Tensor, coef: torch.Tensor, clip: bool,
                          grad_out: Optional[torch.Tensor], grad_x0: Optional[torch.Tensor]):
    """Gradients of out = a x0 + b (cx x - x0)/ce + d x + s z and of x0 = clip(cx x - ce eps) w.r.t. x,
    eps and z, in float32 (the kernels' arithmetic), from the saved inputs.

    :param x: an [N x ...] Tensor, x_t.
    :param eps: an [N x ...] Tensor like x.
    :param coef: an [N x 6] float32 Tensor, per-sample (cx, ce, a, b, d, s).
    :param clip: whether x0 was clamped to [-1, 1] (then the gradient is 0 outside).
    :param grad_out: an [N x ...] Tensor, d loss / d out, or None when out was not used.
    :param grad_x0: an [N x ...] Tensor, d loss / d x0, or None / empty when x0 was not used.
    :return: (grad_x in x's dtype, grad_eps in eps's dtype, grad_z in x's dtype or None).
    """
    xf, ef = x.float(), eps.float()
    cx, ce, a, b, d, s = (_bcast(coef[:, i], xf) for i in range(NUM_COEF))
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


def _setup_context(ctx, inputs, output) -> None:
    x, eps, coef, noise, clip, _need_x0 = inputs
    ctx.save_for_backward(x, eps, coef)
    ctx.clip, ctx.has_noise = clip, noise is not None


def _backward(ctx, grad_out, grad_x0):
    x, eps, coef = ctx.saved_tensors
    gx, ge, gz = _diffusion_step_grads(x, eps, coef, ctx.clip, grad_out, grad_x0)
    return gx, ge, None, gz if ctx.has_noise else None, None, None


if _ext.cpu_built():  # the ops exist only in a build with the extension
    torch.library.register_fake("vesselfast::diffusion_step", _fake_step)
    torch.library.register_fake("vesselfast::diffusion_step_out", _fake_step_out)
    torch.library.register_autograd("vesselfast::diffusion_step", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Backends of the generic kernel: fn(x, eps, coef, noise, clip, need_x0, out) -> (out, x0 or empty).
# ``out`` (None: allocate) is a caller's buffer that shares no memory with the inputs. The three public
# ops share these backends; each op's 'torch' backend is its formula-level reference.
# ----------------------------------------------------------------------------------------------
def _compiled(x, eps, coef, noise, clip, need_x0, out):
    if out is None or need_x0:
        res, x0 = torch.ops.vesselfast.diffusion_step(x, eps, coef, noise, clip, need_x0)
        return (res, x0) if out is None else (out.copy_(res), x0)
    torch.ops.vesselfast.diffusion_step_out(x, eps, coef, noise, clip, out)
    return out, x.new_empty(0)


def _triton(x, eps, coef, noise, clip, need_x0, out):
    from vesselfast.kernels.diffusion_step import diffusion_step
    return diffusion_step(x, eps, coef, noise, clip, need_x0, out=out)


ddim_step_op = new_op("ddim_step", ddim_step_reference)
ddim_inverse_step_op = new_op("ddim_inverse_step", ddim_inverse_step_reference)
ddpm_step_op = new_op("ddpm_step", ddpm_step_reference)
for _op in (ddim_step_op, ddim_inverse_step_op, ddpm_step_op):
    _op.impls.update(cpu=_compiled, cuda=_compiled, triton=_triton)


def _check_out(out: torch.Tensor, x: torch.Tensor, *inputs: Optional[torch.Tensor]) -> None:
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous tensor like x_t ({tuple(x.shape)}, {x.dtype}, {x.device}); "
                         f"got ({tuple(out.shape)}, {out.dtype}, {out.device}"
                         f"{'' if out.is_contiguous() else ', non-contiguous'})")
    for t in inputs:
        if t is not None and t.numel() and out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
            raise ValueError("out shares memory with an input; pass a separate buffer (e.g. torch.empty_like(x_t))")


def _run(op, x_t, eps, coef_fn, reference_fn, noise, clip, return_x0, backend, out=None):
    """Runs ``op`` on the backend :func:`resolve` picks: its reference, or the generic kernel.

    :param x_t: an [N x ...] Tensor.
    :param eps: an [N x ...] Tensor like x_t (cast to x_t's dtype for the kernels).
    :param coef_fn: () -> the [N x 6] float32 coefficient table (called for the kernels only).
    :param reference_fn: () -> (result, x0), the op's reference on the original inputs.
    :param noise: an [N x ...] Tensor like x_t, or None.
    :param out: an [N x ...] contiguous Tensor like x_t to write the result into, or None.
    :return: the [N x ...] result, or (result, x0) when ``return_x0``.
    """
    name = resolve(op.name, x_t.device, backend, x_t.dtype)
    if out is not None:
        _check_out(out, x_t, x_t, eps, noise)
    if name == "torch":
        res, x0 = reference_fn()
        if out is not None:
            res = out.copy_(res)
    else:
        x_t, eps = x_t.contiguous(), eps.contiguous()
        noise = None if noise is None else noise.contiguous().to(x_t.dtype)
        res, x0 = op.impls[name](x_t, eps.to(x_t.dtype), coef_fn(), noise, clip, return_x0, out)
    return (res, x0) if return_x0 else res


_TABLES = {"ddim": ddim_coefficients, "ddim_inverse": lambda a, b, _: ddim_inverse_coefficients(a, b),
           "ddpm": ddpm_coefficients}


@functools.lru_cache(maxsize=4096)
def _cached_table(kind: str, a, b, param, batch: int, device: str) -> torch.Tensor:
    """Loops call every step with the same few alpha_bars: build each [B, 6] table once. ``a``, ``b``:
    a float, or the float64 bytes of a CPU [1] / [B] tensor (:func:`_cache_key`).
    (The float64 table costs ~15 small torch ops, ~37 us: a third of a 1M-element kernel's time.)"""
    def values(v):
        if isinstance(v, float):
            return torch.full((batch,), v, dtype=torch.float64)
        return torch.from_numpy(np.frombuffer(v, dtype=np.float64).copy()).expand(batch).contiguous()
    return _TABLES[kind](values(a), values(b), param).to(device)


def _cache_key(v: Abar, batch: int):
    """What identifies alpha_bar ``v`` in :func:`_cached_table`: the float, or a CPU tensor's float64 bytes
    (values, not identity: a tensor changed in place gets a new table); None for a device tensor, whose
    values would cost a synchronisation to read."""
    if isinstance(v, float):
        return v
    if isinstance(v, torch.Tensor) and v.device.type == "cpu" and v.numel() in (1, batch):
        return v.detach().to(torch.float64).reshape(-1).numpy().tobytes()
    return None


def _coefficients(kind: str, x: torch.Tensor, a: Abar, b: Abar, param) -> torch.Tensor:
    """The [N x 6] float32 table of step ``kind`` on x's device, for an [N x ...] x and alpha_bars ``a``,
    ``b`` ([N] Tensors or floats), from the cache when both are floats or CPU tensors. Traced calls build
    it in the graph instead of reading the cache."""
    if not torch.compiler.is_compiling():
        ka, kb = _cache_key(a, x.shape[0]), _cache_key(b, x.shape[0])
        if ka is not None and kb is not None:
            return _cached_table(kind, ka, kb, param, x.shape[0], str(x.device))
    return _TABLES[kind](_per_sample(a, x), _per_sample(b, x), param).to(x.device)


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: Abar, alpha_bar_prev: Abar, eta: float = 0.0,
              noise: Optional[torch.Tensor] = None, clip: bool = True, return_x0: bool = False,
              backend: str = "auto", out: Optional[torch.Tensor] = None
              ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """One DDIM step x_t -> x_prev (eta >= 0; pass ``noise`` ~ N(0, I) when eta > 0).
    Use alpha_bar_prev = 1 for the final step, which then returns the x0 prediction (sigma = 0).

    :param x_t: an [N x ...] Tensor (NCHW in practice).
    :param eps: an [N x ...] Tensor like x_t, the predicted noise.
    :param alpha_bar_t: an [N] Tensor or a float, alpha_bar of the current level.
    :param alpha_bar_prev: an [N] Tensor or a float, alpha_bar of the level stepped to.
    :param noise: an [N x ...] Tensor like x_t, needed when eta > 0.
    :param backend: 'auto' or one of ``BACKENDS``; resolved once per traced graph under torch.compile.
    :param out: an [N x ...] contiguous Tensor like x_t, sharing no memory with the inputs, to write
        x_prev into instead of a new tensor; loops pass two buffers in turn and allocate nothing per step.
    :return: x_prev, an [N x ...] Tensor like x_t; (x_prev, x0) when ``return_x0``.
    """
    if eta > 0 and noise is None:
        raise ValueError("ddim_step with eta > 0 needs noise= (a standard normal tensor like x_t)")
    return _run(ddim_step_op, x_t, eps, lambda: _coefficients("ddim", x_t, alpha_bar_t, alpha_bar_prev, float(eta)),
                lambda: ddim_step_reference(x_t, eps, alpha_bar_t, alpha_bar_prev, eta, noise, clip),
                noise if eta > 0 else None, clip, return_x0, backend, out)


def ddim_inverse_step(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: Abar, alpha_bar_next: Abar,
                      clip: bool = True, return_x0: bool = False, backend: str = "auto",
                      out: Optional[torch.Tensor] = None):
    """One deterministic DDIM inversion step x_t -> x_next, eps evaluated at the current level t.

    :param x_t: an [N x ...] Tensor.
    :param eps: an [N x ...] Tensor like x_t, the noise predicted at level t.
    :param alpha_bar_t: an [N] Tensor or a float; ``alpha_bar_next`` likewise, for the level stepped to.
    :param backend, out: as in :func:`ddim_step`.
    :return: x_next, an [N x ...] Tensor like x_t; (x_next, x0) when ``return_x0``.
    """
    return _run(ddim_inverse_step_op, x_t, eps,
                lambda: _coefficients("ddim_inverse", x_t, alpha_bar_t, alpha_bar_next, None),
                lambda: ddim_inverse_step_reference(x_t, eps, alpha_bar_t, alpha_bar_next, clip),
                None, clip, return_x0, backend, out)


def ddpm_step(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: Abar, alpha_bar_prev: Abar,
              noise: Optional[torch.Tensor] = None, variance: str = "fixed_large", clip: bool = True,
              return_x0: bool = False, backend: str = "auto", out: Optional[torch.Tensor] = None):
    """One DDPM ancestral step x_t -> x_{t-1} (noise ignored at t = 0, where abar_prev = 1).

    :param x_t: an [N x ...] Tensor.
    :param eps: an [N x ...] Tensor like x_t, the predicted noise.
    :param alpha_bar_t: an [N] Tensor or a float; ``alpha_bar_prev`` likewise, for level t - 1.
    :param noise: an [N x ...] Tensor like x_t drawn from N(0, I), or None for the posterior mean.
    :param variance: 'fixed_large' (beta_t) or 'fixed_small' (the posterior variance).
    :param backend, out: as in :func:`ddim_step`.
    :return: x_{t-1}, an [N x ...] Tensor like x_t; (x_{t-1}, x0) when ``return_x0``.
    """
    return _run(ddpm_step_op, x_t, eps, lambda: _coefficients("ddpm", x_t, alpha_bar_t, alpha_bar_prev, variance),
                lambda: ddpm_step_reference(x_t, eps, alpha_bar_t, alpha_bar_prev, noise, variance, clip),
                noise, clip, return_x0, backend, out)

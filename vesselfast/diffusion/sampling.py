"""Sampling loops: DDPM ancestral, DDIM (from noise or from a latent at any respaced level) and
deterministic DDIM inversion. Model-agnostic: ``eps_fn(x_t [B,C,H,W], t LongTensor [B]) -> eps``.

The per-step updates are the fused ops of :mod:`vesselfast.ops` (their backend is picked per device).
Randomness is injectable: ``noise_fn(step, shape) -> Tensor`` replaces the generator, so two
implementations can be compared on identical noise. ``progress(done, total)`` is called after each
network evaluation. Each loop evaluates the network once per step; the sampler objects of samplers.py
say how many per image.
The updates write into two buffers used in turn (:class:`_Buffers`), so a loop allocates no image-sized
tensor per step (each fresh one over glibc's mmap threshold would be page-faulted in again).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from vesselfast.diffusion.schedule import NoiseSchedule
from vesselfast.ops import ddim_inverse_step, ddim_step, ddpm_step

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseFn = Callable[[int, torch.Size], torch.Tensor]
Progress = Optional[Callable[[int, int], None]]


def _noise_source(x: torch.Tensor, generator: Optional[torch.Generator], noise_fn: Optional[NoiseFn]) -> NoiseFn:
    if noise_fn is not None:
        return lambda i, shape: noise_fn(i, shape).to(device=x.device, dtype=x.dtype)
    return lambda i, shape: torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)


class _Buffers:
    """Two output buffers like x for the steps of one loop, used in turn: step i reads the buffer step
    i - 1 wrote and writes the other (an op's ``out`` may not overlap its input)."""

    def __init__(self, x: torch.Tensor):
        self.pair = (torch.empty_like(x, memory_format=torch.contiguous_format),
                     torch.empty_like(x, memory_format=torch.contiguous_format))
        self.i = 0

    def next(self) -> torch.Tensor:
        self.i ^= 1
        return self.pair[self.i]


def _t(x: torch.Tensor, t: int) -> torch.Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)


def ddim_sample(eps_fn: EpsFn, schedule: NoiseSchedule, x: torch.Tensor, num_steps: int, start_index: Optional[int] = None,
                eta: float = 0.0, clip: bool = True, generator: Optional[torch.Generator] = None,
                noise_fn: Optional[NoiseFn] = None, progress: Progress = None) -> torch.Tensor:
    """DDIM from x at level timesteps[start_index] (default: the noisiest, i.e. from pure noise) down to
    the clean image; evaluates the network at timesteps[start_index], ..., timesteps[0]."""
    ts = schedule.ddim_timesteps(num_steps)
    start = len(ts) - 1 if start_index is None else start_index
    levels = ts[: start + 1][::-1]
    draw = _noise_source(x, generator, noise_fn)
    buffers = _Buffers(x)
    for i, t in enumerate(levels):
        t_prev = levels[i + 1] if i + 1 < len(levels) else -1  # -1: alpha_bar = 1, the clean image
        eps = eps_fn(x, _t(x, t))
        noise = draw(i, x.shape) if eta > 0 else None
        x = ddim_step(x, eps, schedule.alpha_bar(t).item(), schedule.alpha_bar(t_prev).item(), eta=eta,
                      noise=noise, clip=clip, out=buffers.next())
        if progress:
            progress(i + 1, len(levels))
    return x


def ddim_invert(eps_fn: EpsFn, schedule: NoiseSchedule, x0: torch.Tensor, num_steps: int, t0_steps: int,
                clip: bool = True, progress: Progress = None) -> torch.Tensor:
    """Deterministic DDIM inversion of clean images x0 (taken as the level timesteps[0]) for t0_steps steps;
    step i evaluates the network at timesteps[i] and moves to timesteps[i + 1]. Returns the latent at
    level timesteps[t0_steps] (paper: 15 of 50 steps -> timestep 300)."""
    ts = schedule.ddim_timesteps(num_steps)
    if not 1 <= t0_steps < len(ts):
        raise ValueError(f"t0_steps must be in [1, {len(ts) - 1}], got {t0_steps}")
    x = x0
    buffers = _Buffers(x0)
    for i in range(t0_steps):
        eps = eps_fn(x, _t(x, ts[i]))
        x = ddim_inverse_step(x, eps, schedule.alpha_bar(ts[i]).item(), schedule.alpha_bar(ts[i + 1]).item(),
                              clip=clip, out=buffers.next())
        if progress:
            progress(i + 1, t0_steps)
    return x


def ddpm_sample(eps_fn: EpsFn, schedule: NoiseSchedule, x: torch.Tensor, t_start: Optional[int] = None,
                variance: str = "fixed_large", clip: bool = True, generator: Optional[torch.Generator] = None,
                noise_fn: Optional[NoiseFn] = None, progress: Progress = None) -> torch.Tensor:
    """DDPM ancestral sampling from x at timestep t_start (default T-1: pure noise) to t = 0, every
    timestep of the full schedule (t_start + 1 network evaluations); no noise at the last step."""
    t_start = schedule.T - 1 if t_start is None else t_start
    draw = _noise_source(x, generator, noise_fn)
    buffers = _Buffers(x)
    for i, t in enumerate(range(t_start, -1, -1)):
        eps = eps_fn(x, _t(x, t))
        noise = draw(i, x.shape) if t > 0 else None
        x = ddpm_step(x, eps, schedule.alpha_bar(t).item(), schedule.alpha_bar(t - 1).item(), noise=noise,
                      variance=variance, clip=clip, out=buffers.next())
        if progress:
            progress(i + 1, t_start + 1)
    return x

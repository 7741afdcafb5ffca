"""Noise schedules and the forward process, in float64 (cast to the working dtype only when gathered).

Notation as in Ho et al. / improved-diffusion: beta_t, alpha_t = 1 - beta_t, alpha_bar_t = prod_{s<=t} alpha_s,
timesteps t = 0..T-1. ``alpha_bar(-1)`` is defined as 1 (the clean image), which is what the last
sampling step moves to.
"""
from __future__ import annotations

import math
from typing import List

import numpy as np
import torch

SCHEDULES = ("linear", "cosine")


def linear_betas(T: int) -> np.ndarray:
    """linspace(1e-4 * 1000/T, 0.02 * 1000/T, T) in float64 (Ho et al., scaled to any T)."""
    scale = 1000.0 / T
    return np.linspace(1e-4 * scale, 0.02 * scale, T, dtype=np.float64)


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule: alpha_bar(t) = cos^2(((t/T) + s)/(1 + s) * pi/2)."""
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    return np.array([min(1 - f(i + 1) / f(i), max_beta) for i in range(T)], dtype=np.float64)


class NoiseSchedule:
    """Holds betas and alpha_bar (float64 numpy and torch) for T steps."""

    def __init__(self, betas: np.ndarray):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas < 1)).all():
            raise ValueError("betas must be a 1-D array in (0, 1)")
        self.betas = betas
        self.alphas_cumprod = np.cumprod(1.0 - betas)
        self._abar = torch.from_numpy(self.alphas_cumprod)

    @classmethod
    def make(cls, kind: str, T: int) -> "NoiseSchedule":
        if kind == "linear":
            return cls(linear_betas(T))
        if kind == "cosine":
            return cls(cosine_betas(T))
        raise ValueError(f"unknown schedule {kind!r}; use one of {SCHEDULES}")

    @property
    def T(self) -> int:
        return len(self.betas)

    def alpha_bar(self, t) -> torch.Tensor:
        """float64 [B] alpha_bar at integer timesteps t ([B] tensor, list or int); t = -1 gives 1."""
        t = torch.as_tensor(t, dtype=torch.long).reshape(-1).cpu()
        if (t < -1).any() or (t >= self.T).any():
            raise ValueError(f"timesteps must lie in [-1, {self.T - 1}]")
        out = torch.ones(t.shape, dtype=torch.float64)
        valid = t >= 0
        out[valid] = self._abar[t[valid]]
        return out

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise; x0, noise [B, ...], t [B]."""
        abar = self.alpha_bar(t).to(x0.device)
        shape = (-1,) + (1,) * (x0.dim() - 1)
        return (abar.sqrt().to(x0.dtype).reshape(shape) * x0
                + (1 - abar).sqrt().to(x0.dtype).reshape(shape) * noise)

    def ddim_timesteps(self, num_steps: int) -> List[int]:
        """Respaced timesteps {0, T/N, 2T/N, ...} (floor for non-divisible N), increasing.
        The network always receives these original indices."""
        if not 1 <= num_steps <= self.T:
            raise ValueError(f"DDIM steps must be in [1, {self.T}], got {num_steps}")
        return [int(i * self.T // num_steps) for i in range(num_steps)]


def t0_index(t0_ratio: float, num_steps: int) -> int:
    """Number of inversion steps t0 = round(t0_ratio * num_steps) (paper: 0.3 * 50 = 15), kept in
    [1, num_steps - 1] so the latent sits on a respaced timestep (ratio 1.0 -> the noisiest one)."""
    if not 0.0 < t0_ratio <= 1.0:
        raise ValueError(f"t0_ratio must lie in (0, 1], got {t0_ratio}")
    return max(1, min(num_steps - 1, int(round(t0_ratio * num_steps))))


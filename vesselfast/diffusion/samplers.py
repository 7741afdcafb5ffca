"""Synthesis samplers as objects: one class per sampler, whose fields are its whole configuration (and
so its identity, diffusers-style). Each says where it starts (the inversion latent or pure noise),
whether it draws random numbers, how many network evaluations it costs per image, and runs its loop
(the loops themselves are in sampling.py).

| name          | starts from                      | loop                                   | evaluations / image |
|---------------|----------------------------------|----------------------------------------|---------------------|
| ``ddim_latent`` | latent at ``timesteps[t0_steps]`` | DDIM down the ``ddim_steps`` grid        | t0_steps + 1        |
| ``ddpm_latent`` | latent at ``timesteps[t0_steps]`` | every DDPM step from that timestep      | timestep + 1        |
| ``ddim_noise``  | pure noise                       | DDIM with ``noise_steps`` steps          | noise_steps         |
| ``ddpm_noise``  | pure noise                       | all T DDPM steps (the reference code)   | T                   |

``t0_steps`` is a number of inversion *steps* on the ``ddim_steps`` grid; the *timestep* it ends at is
``schedule.ddim_timesteps(ddim_steps)[t0_steps]`` (paper: 15 of 50 steps -> timestep 300).
:func:`make_sampler` is the one place a sampler name becomes a sampler.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar, Dict, Optional, Tuple, Type

import torch

from vesselfast.diffusion.sampling import EpsFn, ddim_sample, ddpm_sample
from vesselfast.diffusion.schedule import NoiseSchedule


@dataclass(frozen=True)
class Sampler:
    """A synthesis sampler. ``sample(eps_fn, schedule, x, generator)`` maps the start ``x``
    [N x C x H x W] (:meth:`start`: latent or noise, see ``from_latent``) to images [N x C x H x W]."""
    name: ClassVar[str]
    from_latent: ClassVar[bool]
    clip: bool = True

    def draws_noise(self) -> bool:
        """Whether the sampler consumes random numbers (its start noise or per-step noise)."""
        return True

    def start(self, latent: Optional[torch.Tensor], shape: torch.Size, device,
              generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Where the loop starts: the float32 inversion ``latent`` [N x C x H x W] (latent samplers) or
        standard normal noise of ``shape`` drawn from ``generator`` (on the generator's device)."""
        if self.from_latent:
            return latent.to(device).float()
        return torch.randn(shape, generator=generator, device=None if generator is None else generator.device).to(device)

    def evals_per_image(self, schedule: NoiseSchedule) -> int:
        raise NotImplementedError

    def sample(self, eps_fn: EpsFn, schedule: NoiseSchedule, x: torch.Tensor,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class DDIMFromLatent(Sampler):
    """DDIM from the inversion latent at ``timesteps[t0_steps]`` of the ``ddim_steps`` grid (the paper's
    Iter-0 synthesis with a deterministic sampler when ``eta`` = 0)."""
    name: ClassVar[str] = "ddim_latent"
    from_latent: ClassVar[bool] = True
    ddim_steps: int = 50
    t0_steps: int = 15
    eta: float = 0.0

    def draws_noise(self) -> bool:
        return self.eta > 0

    def evals_per_image(self, schedule: NoiseSchedule) -> int:
        return self.t0_steps + 1

    def sample(self, eps_fn, schedule, x, generator=None):
        return ddim_sample(eps_fn, schedule, x, self.ddim_steps, start_index=self.t0_steps, eta=self.eta,
                           clip=self.clip, generator=generator)


@dataclass(frozen=True)
class DDPMFromLatent(Sampler):
    """Every DDPM ancestral step from the latent's timestep (the reference code's Iter-0)."""
    name: ClassVar[str] = "ddpm_latent"
    from_latent: ClassVar[bool] = True
    ddim_steps: int = 50
    t0_steps: int = 15

    def start_timestep(self, schedule: NoiseSchedule) -> int:
        return schedule.ddim_timesteps(self.ddim_steps)[self.t0_steps]

    def evals_per_image(self, schedule: NoiseSchedule) -> int:
        return self.start_timestep(schedule) + 1

    def sample(self, eps_fn, schedule, x, generator=None):
        return ddpm_sample(eps_fn, schedule, x, t_start=self.start_timestep(schedule), clip=self.clip,
                           generator=generator)


@dataclass(frozen=True)
class DDIMFromNoise(Sampler):
    """DDIM with ``noise_steps`` respaced steps from pure noise."""
    name: ClassVar[str] = "ddim_noise"
    from_latent: ClassVar[bool] = False
    noise_steps: int = 50
    eta: float = 0.0

    def evals_per_image(self, schedule: NoiseSchedule) -> int:
        return self.noise_steps

    def sample(self, eps_fn, schedule, x, generator=None):
        return ddim_sample(eps_fn, schedule, x, self.noise_steps, eta=self.eta, clip=self.clip, generator=generator)


@dataclass(frozen=True)
class DDPMFromNoise(Sampler):
    """All T DDPM ancestral steps from pure noise (the reference code's rounds)."""
    name: ClassVar[str] = "ddpm_noise"
    from_latent: ClassVar[bool] = False

    def evals_per_image(self, schedule: NoiseSchedule) -> int:
        return schedule.T

    def sample(self, eps_fn, schedule, x, generator=None):
        return ddpm_sample(eps_fn, schedule, x, clip=self.clip, generator=generator)


SAMPLERS: Dict[str, Type[Sampler]] = {cls.name: cls for cls in (DDIMFromLatent, DDPMFromLatent, DDIMFromNoise,
                                                                 DDPMFromNoise)}
LATENT_SAMPLERS = tuple(name for name, cls in SAMPLERS.items() if cls.from_latent)


def settings_of(name: str) -> Tuple[str, ...]:
    """The settings (field names) that make up the sampler ``name``: its whole identity."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return tuple(f.name for f in fields(SAMPLERS[name]))


def make_sampler(name: str, **settings) -> Sampler:
    """The sampler ``name`` (see the module table) from ``settings``, of which it takes its own fields:
    ``clip``; ``ddim_steps`` and ``t0_steps`` (the inversion's grid and depth, latent samplers);
    ``noise_steps`` (ddim_noise); ``eta`` (DDIM). The one place a sampler name becomes a sampler."""
    keys = settings_of(name)
    return SAMPLERS[name](**{key: settings[key] for key in keys if key in settings})

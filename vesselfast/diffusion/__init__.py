"""Diffusion core: schedules, forward process, sampling loops and inversion (docs/METHOD.md, sections 2-6)."""
from vesselfast.diffusion.sampling import ddim_invert, ddim_sample, ddpm_sample  # noqa: F401
from vesselfast.diffusion.samplers import SAMPLERS, Sampler, make_sampler  # noqa: F401
from vesselfast.diffusion.schedule import NoiseSchedule, cosine_betas, linear_betas, t0_index  # noqa: F401

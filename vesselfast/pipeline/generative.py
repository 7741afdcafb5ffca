"""Generator stages: pre-training / fine-tuning with the vessel-weighted noise loss, DDIM inversion of
source crops, and synthesis of target-style images with each sampler."""
from __future__ import annotations

from typing import Optional

import torch

from vesselfast.data import thick_mask
from vesselfast.diffusion import NoiseSchedule, ddim_invert, ddim_sample, ddpm_sample, num_evals
from vesselfast.models import EMA, GeneratorUNet, autocast, generator_from_dict, to_memory_format
from vesselfast.ops import vessel_noise_loss
from vesselfast.pipeline.config import GeneratorTrainConfig
from vesselfast.pipeline.loop import run_training
from vesselfast.pipeline.segmenter import augment


def build_generator(gcfg: GeneratorTrainConfig, seed: int) -> GeneratorUNet:
    torch.manual_seed(seed)
    return generator_from_dict({"base_channels": gcfg.base_channels, "channel_mult": gcfg.channel_mult,
                                "num_res_blocks": gcfg.num_res_blocks, "attention_levels": gcfg.attention_levels,
                                "dropout": gcfg.dropout})


def train_generator(model: GeneratorUNet, images: torch.Tensor, masks: Optional[torch.Tensor], steps: int,
                    gcfg: GeneratorTrainConfig, schedule: NoiseSchedule, seed: int, device: str = "cpu",
                    run=None, stage: Optional[str] = None, ckpt_every: int = 200, desc: str = "generator",
                    ema_init: Optional[dict] = None) -> EMA:
    """Trains eps_theta on crops ``images`` [N, 1, h, w] (conditioned on ``masks`` [N, 1, h, w] when
    given, else on zeros) with L = 0.5 mean((eps - eps_hat)^2) + sum(w (eps - eps_hat)^2) / (sum(w) + 1),
    w = the mask dilated by 2 px (0 for the unconditional model). AdamW; returns the EMA of the weights
    (initialised from ``ema_init`` when fine-tuning, so the average does not restart from scratch)."""
    g = torch.Generator().manual_seed(seed)
    model = model.to(device).train()
    ema = EMA(model, gcfg.ema_decay)
    if ema_init is not None:
        ema.load_state_dict(ema_init)
    opt = torch.optim.AdamW(model.parameters(), lr=gcfg.lr, weight_decay=0.0)
    T = schedule.T

    def step_fn(step):
        idx = torch.randint(0, images.shape[0], (gcfg.batch_size,), generator=g)
        if masks is not None:
            x0, cond = augment(g, images[idx], masks[idx])
            w = thick_mask(cond, radius=2).to(device)
            cond = cond.to(device)
        else:
            (x0,) = augment(g, images[idx])
            cond, w = None, None
        x0 = x0.to(device)
        t = torch.randint(0, T, (x0.shape[0],), generator=g)
        noise = torch.randn(x0.shape, generator=g).to(device)
        x_t = schedule.q_sample(x0, t, noise)
        with autocast(device, gcfg.precision):
            eps_hat = model(x_t, t.to(device), cond)
        loss = vessel_noise_loss(noise, eps_hat.float(), w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(model)
        return loss.detach()

    run_training(step_fn, steps, {"model": model, "ema": ema, "opt": opt}, g, desc, run, stage, ckpt_every)
    return ema


class EpsModel:
    """eps_fn for the sampling loops: a generator in eval mode, bound to a condition mask, inference in
    channels_last + autocast (DESIGN.md section 3), counting network evaluations."""

    def __init__(self, model: GeneratorUNet, precision: str = "bf16", device: str = "cpu"):
        self.model = to_memory_format(model.to(device).eval(), channels_last=(device == "cpu"))
        self.precision, self.device = precision, device
        self.cond: Optional[torch.Tensor] = None
        self.evals = 0  # network evaluations, counted per image

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.evals += x.shape[0]
        xin = x.contiguous(memory_format=torch.channels_last) if self.device == "cpu" else x
        with autocast(self.device, self.precision):
            eps = self.model(xin, t, self.cond)
        return eps.float().contiguous()


def invert(eps_model: EpsModel, images: torch.Tensor, masks: torch.Tensor, schedule: NoiseSchedule, ddim_steps: int,
           t0_steps: int, batch_size: int, clip: bool = True, progress=None) -> torch.Tensor:
    """DDIM inversion of source crops with G_S conditioned on their own masks: float32 latents
    [N, 1, h, w] at timestep ddim_timesteps[t0_steps]."""
    out = []
    for i in range(0, images.shape[0], batch_size):
        eps_model.cond = masks[i:i + batch_size].to(eps_model.device)
        x0 = images[i:i + batch_size].to(eps_model.device).float()
        out.append(ddim_invert(eps_model, schedule, x0, ddim_steps, t0_steps, clip=clip).cpu())
        if progress:
            progress(min(i + batch_size, images.shape[0]))
    return torch.cat(out)


def synthesize(eps_model: EpsModel, sampler: str, masks: torch.Tensor, latents: Optional[torch.Tensor],
               schedule: NoiseSchedule, ddim_steps: int, t0_steps: int, sample_steps: int, batch_size: int,
               seed: int, conditional: bool, clip: bool = True, eta: float = 0.0, progress=None) -> torch.Tensor:
    """Target-style images [N, 1, h, w] in [-1, 1], one per source mask. Samplers:
    'ddim_latent' / 'ddpm_latent': from the inversion latent at t0 (DDIM over the respaced steps / every
    DDPM step); 'ddim_noise': DDIM with ``sample_steps`` from pure noise; 'ddpm_noise': the reference
    code's full DDPM from pure noise. ``conditional``: feed the source masks (G_T^k, k >= 1) or zeros (G_T^0)."""
    g = torch.Generator().manual_seed(seed)
    t_latent = schedule.ddim_timesteps(ddim_steps)[t0_steps]
    out = []
    for i in range(0, masks.shape[0], batch_size):
        m = masks[i:i + batch_size]
        eps_model.cond = m.to(eps_model.device) if conditional else None
        if sampler.endswith("_latent"):
            x = latents[i:i + batch_size].to(eps_model.device).float()
        else:
            x = torch.randn(m.shape, generator=g).to(eps_model.device)
        if sampler == "ddim_latent":
            y = ddim_sample(eps_model, schedule, x, ddim_steps, start_index=t0_steps, eta=eta, clip=clip, generator=g)
        elif sampler == "ddpm_latent":
            y = ddpm_sample(eps_model, schedule, x, t_start=t_latent, clip=clip, generator=g)
        elif sampler == "ddim_noise":
            y = ddim_sample(eps_model, schedule, x, sample_steps, eta=eta, clip=clip, generator=g)
        elif sampler == "ddpm_noise":
            y = ddpm_sample(eps_model, schedule, x, clip=clip, generator=g)
        else:
            raise ValueError(f"unknown sampler {sampler!r}")
        out.append(y.clamp(-1, 1).cpu())
        if progress:
            progress(min(i + batch_size, masks.shape[0]))
    return torch.cat(out)


def evals_per_image(sampler: str, schedule: NoiseSchedule, ddim_steps: int, t0_steps: int, sample_steps: int) -> int:
    steps = sample_steps if sampler == "ddim_noise" else ddim_steps
    return num_evals(sampler, schedule, steps, t0_steps)

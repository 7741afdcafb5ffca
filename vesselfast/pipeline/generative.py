"""Generator stages: pre-training / fine-tuning with the vessel-weighted noise loss, DDIM inversion of
source crops, and synthesis of target-style images with each sampler."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from vesselfast.data import thick_mask
from vesselfast.data.augment import augment
from vesselfast.diffusion import NoiseSchedule, Sampler, ddim_invert
from vesselfast.models import (EMA, GeneratorUNet, GradScaling, arch_dict, autocast, generator_from_dict,
                               to_memory_format)
from vesselfast.ops import vessel_noise_loss
from vesselfast.pipeline import dist
from vesselfast.pipeline.config import GeneratorTrainConfig
from vesselfast.pipeline.loop import run_training


def build_generator(gcfg: GeneratorTrainConfig, seed: int) -> GeneratorUNet:
    """A fresh generator of ``gcfg``'s architecture, initialised from ``seed``."""
    torch.manual_seed(seed)
    return generator_from_dict(arch_dict(gcfg))


def train_generator(model: GeneratorUNet, images: torch.Tensor, masks: Optional[torch.Tensor], steps: int,
                    gcfg: GeneratorTrainConfig, schedule: NoiseSchedule, seed: int, device: str = "cpu",
                    run=None, stage: Optional[str] = None, ckpt_every: int = 200, desc: str = "generator",
                    ema_init: Optional[dict] = None) -> EMA:
    """Trains eps_theta on crops ``images`` [N, 1, h, w] (conditioned on ``masks`` [N, 1, h, w] when
    given, else on zeros) with L = 0.5 mean((eps - eps_hat)^2) + sum(w (eps - eps_hat)^2) / (sum(w) + 1),
    w = the mask dilated by 2 px (0 for the unconditional model). AdamW; returns the EMA of the weights
    (initialised from ``ema_init`` when fine-tuning, so the average does not restart from scratch)."""
    g = torch.Generator().manual_seed(dist.rank_seed(seed))
    local_batch = dist.per_rank_batch(gcfg.batch_size, "generator.batch_size")
    # channels_last on CPU: oneDNN's convolutions then skip their layout reorders, and the norms run in the
    # fused kernel that reads that layout (ops/group_norm.py; docs/BENCHMARKS.md, "Generator training step").
    channels_last = device == "cpu"
    model = to_memory_format(model.to(device), channels_last).train()
    net = dist.wrap(model, device)  # DistributedDataParallel under torchrun, else the model itself
    ema = EMA(model, gcfg.ema_decay)
    if ema_init is not None:
        ema.load_state_dict(ema_init)
    opt = torch.optim.AdamW(model.parameters(), lr=gcfg.lr, weight_decay=0.0)
    scaling = GradScaling(gcfg.precision, device)
    T = schedule.T

    def step_fn(step):
        idx = torch.randint(0, images.shape[0], (local_batch,), generator=g)
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
        x_t = to_memory_format(schedule.q_sample(x0, t, noise), channels_last)
        with autocast(device, gcfg.precision):
            eps_hat = net(x_t, t.to(device), cond)
        loss = vessel_noise_loss(noise, eps_hat.float(), w)
        opt.zero_grad(set_to_none=True)
        scaling.backward_step(loss, opt)
        ema.update(model)
        return loss.detach()

    run_training(step_fn, steps, {"model": model, "ema": ema, "opt": opt, **scaling.state()}, g, desc, run, stage,
                 ckpt_every)
    return ema


class EpsModel:
    """eps_fn for the sampling loops: a generator in eval mode, bound to a condition mask, inference in
    channels_last + autocast (models/precision.py), counting network evaluations."""

    def __init__(self, model: GeneratorUNet, precision: str = "auto", device: str = "cpu"):
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


def _starts(n: int, batch_size: int, batches: Optional[Sequence[int]]) -> List[int]:
    return list(range(0, n, batch_size)) if batches is None else list(batches)


def invert(eps_model: EpsModel, images: torch.Tensor, masks: torch.Tensor, schedule: NoiseSchedule, ddim_steps: int,
           t0_steps: int, batch_size: int, clip: bool = True, progress=None,
           batches: Optional[Sequence[int]] = None) -> torch.Tensor:
    """DDIM inversion of source crops with G_S conditioned on their own masks: float32 latents
    [N, 1, h, w] at timestep ddim_timesteps[t0_steps]. ``batches``: start indices of the batches to
    compute (a rank's share, see dist.gather_tensor_batches); default all. Deterministic per batch."""
    out, done = [], 0
    for i in _starts(images.shape[0], batch_size, batches):
        eps_model.cond = masks[i:i + batch_size].to(eps_model.device)
        x0 = images[i:i + batch_size].to(eps_model.device).float()
        out.append(ddim_invert(eps_model, schedule, x0, ddim_steps, t0_steps, clip=clip).cpu())
        done += x0.shape[0]
        if progress:
            progress(done)
    return torch.cat(out) if out else images.new_zeros((0, *images.shape[1:]), dtype=torch.float32)


def synthesize(eps_model: EpsModel, sampler: Sampler, masks: torch.Tensor, latents: Optional[torch.Tensor],
               schedule: NoiseSchedule, batch_size: int, seed: int, conditional: bool, progress=None,
               batches: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Target-style images [N x 1 x h x w] in [-1, 1], one per source mask [N x 1 x h x w], with
    ``sampler`` (vesselfast/diffusion/samplers.py; the latent samplers start from ``latents``
    [N x 1 x h x w]). ``conditional``: feed the source masks (G_T^k, k >= 1) or zeros (G_T^0).

    One generator (``seed``, on the model's device) feeds the batches in order. ``batches`` (start
    indices; default all) computes only those batches; for a sampler that draws noise, the batches
    before them are replayed with a zero noise prediction, which draws exactly the same random numbers
    without running the network, so a rank's share equals the same rows of a one-process run."""
    g = torch.Generator(device=eps_model.device).manual_seed(seed)
    own = set(_starts(masks.shape[0], batch_size, batches))
    stochastic = sampler.draws_noise()
    out, done = [], 0
    for i in range(0, masks.shape[0], batch_size):
        if i not in own and not (stochastic and i < max(own, default=-1)):
            continue
        m = masks[i:i + batch_size]
        x = sampler.start(None if latents is None else latents[i:i + batch_size], m.shape, eps_model.device, g)
        if i in own:
            eps_model.cond = m.to(eps_model.device) if conditional else None
            out.append(sampler.sample(eps_model, schedule, x, g).clamp(-1, 1).cpu())
            done += m.shape[0]
            if progress:
                progress(done)
        else:  # another rank's batch: only advance the generator as computing it would
            sampler.sample(lambda x_t, t: torch.zeros_like(x_t), schedule, x, g)
    return torch.cat(out) if out else masks.new_zeros((0, *masks.shape[1:]), dtype=torch.float32)

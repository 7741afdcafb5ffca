"""Benchmark group ``synthesis``: seconds per synthesised target-style image for each sampler, through
:func:`vesselfast.pipeline.generative.synthesize` as the co-optimisation rounds call it (quick preset's
generator, precision auto, a batch of crops). ``ddpm_noise`` (the reference code's full DDPM from noise) is the
reference, so ``x ref`` is each sampler's speedup over it; ``evals`` is U-Net evaluations per image,
counted by the model wrapper (must not grow)."""
from __future__ import annotations

import pytest

from conftest import QUICK, bench_device, record, timed
from models import CROP, DIFF_CFG, generator, images_and_masks, schedule, t0_steps

from vesselfast.diffusion import SAMPLERS, ddim_invert, make_sampler
from vesselfast.pipeline.generative import EpsModel, synthesize

GROUP = "synthesis"
pytestmark = pytest.mark.bench_group(GROUP)
BATCH = 2 if QUICK else 8


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_synthesis_per_image(benchmark, sync, sampler):
    dev = str(bench_device())
    images, masks = images_and_masks(BATCH, CROP)
    eps = EpsModel(generator(), "auto", dev)
    sched, k = schedule(), t0_steps()
    eps.cond = masks.to(dev)
    latents = ddim_invert(eps, sched, images.to(dev), DIFF_CFG.ddim_steps, k).cpu()

    def run():
        eps.evals = 0
        return synthesize(eps, make_sampler(sampler, ddim_steps=DIFF_CFG.ddim_steps, t0_steps=k,
                                            noise_steps=DIFF_CFG.ddim_steps),
                          masks, latents, sched, batch_size=BATCH, seed=0, conditional=True)

    long_sampler = sampler.startswith("ddpm")
    record(benchmark, GROUP, "synthesis", sampler, CROP, role="ref" if sampler == "ddpm_noise" else None,
           per_call=BATCH, batch=BATCH, T=DIFF_CFG.T, ddim_steps=DIFF_CFG.ddim_steps, t0_steps=k)
    timed(benchmark, run, sync, rounds=1 if long_sampler and not QUICK else 3, warmup=0 if long_sampler else 1)
    benchmark.extra_info["evals"] = eps.evals // BATCH

"""Benchmark group ``sampling``: one DDIM sampling step (generator evaluation + update) and the DDIM
inversion of one image, as the pipeline runs them (:class:`EpsModel`: precision auto, channels_last).

- ``sampling_step`` (batch 16 crops): ``eager`` = U-Net + the plain-torch step (reference), ``auto`` = U-Net +
  the fused op (default backend), ``unet`` = the network evaluation alone (floor: a step cannot be faster).
- ``inversion`` (one crop, t0 = 0.3 of the 50 DDIM steps): ``auto`` against ``unet``, the same number of
  network evaluations alone; ``evals`` records evaluations per image (must not grow).
"""
from __future__ import annotations

import pytest
import torch

from conftest import QUICK, bench_device, record, timed
from models import CROP, DIFF_CFG, generator, images_and_masks, schedule, t0_steps

from vesselfast import ops
from vesselfast.diffusion import ddim_invert
from vesselfast.pipeline.generative import EpsModel

GROUP = "sampling"
pytestmark = pytest.mark.bench_group(GROUP)
BATCH = 2 if QUICK else 16
ROUNDS = 3 if QUICK else 15


def _eps_model(cond):
    model = EpsModel(generator(), "auto", str(bench_device()))
    model.cond = cond
    return model


@pytest.mark.parametrize("impl", ["unet", "eager", "auto"])
def test_sampling_step(benchmark, sync, impl):
    dev = bench_device()
    x, masks = (t.to(dev) for t in images_and_masks(BATCH, CROP))
    eps_fn = _eps_model(masks)
    sched = schedule()
    ts = sched.ddim_timesteps(DIFF_CFG.ddim_steps)
    t, t_prev = ts[len(ts) // 2], ts[len(ts) // 2 - 1]
    tt = torch.full((BATCH,), t, dtype=torch.long, device=dev)
    ab_t, ab_prev = sched.alpha_bar(t).item(), sched.alpha_bar(t_prev).item()
    if impl == "unet":
        fn = lambda: eps_fn(x, tt)  # noqa: E731
    elif impl == "eager":
        fn = lambda: ops.ddim_step_reference(x, eps_fn(x, tt), ab_t, ab_prev)[0]  # noqa: E731
    else:
        fn = lambda: ops.ddim_step(x, eps_fn(x, tt), ab_t, ab_prev)  # noqa: E731
    record(benchmark, GROUP, "sampling_step", impl, CROP, role={"unet": "floor", "eager": "ref"}.get(impl),
           per_call=1, batch=BATCH)
    timed(benchmark, fn, sync, ROUNDS)


@pytest.mark.parametrize("impl", ["unet", "auto"])
def test_inversion(benchmark, sync, impl):
    dev = bench_device()
    x0, mask = (t.to(dev) for t in images_and_masks(1, CROP))
    eps_fn = _eps_model(mask)
    sched, k = schedule(), t0_steps()
    ts = sched.ddim_timesteps(DIFF_CFG.ddim_steps)
    if impl == "unet":
        tts = [torch.full((1,), t, dtype=torch.long, device=dev) for t in ts[:k]]
        fn = lambda: [eps_fn(x0, t) for t in tts]  # noqa: E731
    else:
        fn = lambda: ddim_invert(eps_fn, sched, x0, DIFF_CFG.ddim_steps, k)  # noqa: E731
    record(benchmark, GROUP, "inversion", impl, CROP, role="floor" if impl == "unet" else None, per_call=1,
           evals=k, t0_steps=k, ddim_steps=DIFF_CFG.ddim_steps)
    timed(benchmark, fn, sync, ROUNDS)

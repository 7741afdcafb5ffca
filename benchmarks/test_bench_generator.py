"""Benchmark group ``generator``: one training step of the generator (forward, vessel-weighted noise loss,
backward, AdamW, EMA) as the pipeline runs it (:func:`vesselfast.pipeline.generative.train_generator`),
fp32 (the reference) and bf16 autocast, on 64 and 128 px crops with the quick preset's network and batch.
Time per step; each call runs STEPS steps so the optimiser set-up is amortised."""
from __future__ import annotations

import dataclasses

import pytest

from conftest import QUICK, bench_device, record, timed
from models import GEN_CFG, generator, images_and_masks, schedule, skip_unless_runs

from vesselfast.pipeline.generative import train_generator

GROUP = "generator"
pytestmark = pytest.mark.bench_group(GROUP)
SIZES = [16] if QUICK else [64, 128]
STEPS = 1 if QUICK else 4
ROUNDS = 2 if QUICK else 5


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_generator_train_step(benchmark, sync, precision, size):
    skip_unless_runs(precision)
    gcfg = dataclasses.replace(GEN_CFG, precision=precision)
    model = generator(precision).train()
    images, masks = images_and_masks(4 * gcfg.batch_size, size)
    sched = schedule()
    record(benchmark, GROUP, "generator_train_step", precision, size, role="ref" if precision == "fp32" else None,
           per_call=STEPS, batch=gcfg.batch_size, base_channels=gcfg.base_channels)
    timed(benchmark, lambda: train_generator(model, images, masks, STEPS, gcfg, sched, seed=0,
                                             device=str(bench_device())), sync, ROUNDS)

"""Models and data the model-level benchmark groups share: the quick preset's generator and the default
segmenter (16..256 channels), or tiny versions in quick mode, with random inputs (timings do not depend
on the weights' values)."""
from __future__ import annotations

import dataclasses

import torch

from conftest import QUICK

from vesselfast.diffusion import NoiseSchedule
from vesselfast.models import SegmenterUNet
from vesselfast.pipeline.config import DiffusionConfig, GeneratorTrainConfig
from vesselfast.pipeline.generative import build_generator

GEN_CFG = (GeneratorTrainConfig(base_channels=8, channel_mult=[1, 2], batch_size=2) if QUICK
           else GeneratorTrainConfig())  # quick preset: 32 channels x [1, 2, 2], one res block, batch 8
DIFF_CFG = DiffusionConfig(T=100, ddim_steps=10) if QUICK else DiffusionConfig()  # T 1000, 50 DDIM steps
SEG_CHANNELS = (8, 16, 32) if QUICK else (16, 32, 64, 128, 256)
CROP = 16 if QUICK else 64


def generator(precision: str = "auto"):
    return build_generator(dataclasses.replace(GEN_CFG, precision=precision), seed=0).eval()


def schedule() -> NoiseSchedule:
    return NoiseSchedule.make(DIFF_CFG.schedule, DIFF_CFG.T)


def t0_steps() -> int:
    from vesselfast.diffusion import t0_index
    return t0_index(DIFF_CFG.t0_ratio, DIFF_CFG.ddim_steps)


def skip_unless_runs(precision: str) -> None:
    """bf16 rows run only where the CPU executes bf16 natively: elsewhere it is emulated, 10-20x slower,
    and not a path vesselfast takes by default (precision auto picks fp32 there)."""
    import pytest

    from conftest import bench_device
    from vesselfast.hardware import emulation_warning

    if emulation_warning(bench_device(), {"precision": precision}):
        pytest.skip("bf16 is emulated on this CPU (precision auto runs fp32 here)")


def images_and_masks(n: int, size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, size, size, generator=g) * 2 - 1
    masks = (torch.rand(n, 1, size, size, generator=g) < 0.12).float()
    return images, masks


def segmenter(seed: int = 0) -> SegmenterUNet:
    torch.manual_seed(seed)
    return SegmenterUNet(1, SEG_CHANNELS).eval()

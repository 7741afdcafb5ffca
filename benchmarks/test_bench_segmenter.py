"""Benchmark group ``segmenter``: the segmenter's training step and its inference on OCTA-sized images.

- ``segmenter_train_step``: :func:`vesselfast.pipeline.segmentation.train_segmenter` (BCE + soft Dice, Adam,
  channels_last) on 64 px crops, batch 8, fp32 (reference) and bf16 autocast; time per step.
- ``infer_whole`` / ``infer_tiled``: one preprocessed image of 304 px (OCTA-500 3M) or 400 px (6M) through
  :class:`vesselfast.export.Segmenter`: the whole image in one pass, or sliding windows of 256 px with
  stride 128 in batches of 8 (what ``vesselfast segment`` runs with the paper preset's tile).
  ``eager`` = torch fp32 (reference), ``bf16`` = torch with bf16 autocast, ``ort`` = ONNX Runtime fp32 on
  the exported graph. The default network (16..256 channels, 1.9M parameters), random weights.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import QUICK, bench_device, record, timed
from models import CROP, SEG_CHANNELS, images_and_masks, segmenter, skip_unless_runs

from vesselfast.export.api import Segmenter
from vesselfast.pipeline.segmentation import train_segmenter

GROUP = "segmenter"
pytestmark = pytest.mark.bench_group(GROUP)
IMAGE_SIZES = [64] if QUICK else [304, 400]
TILE, STRIDE = (32, 16) if QUICK else (256, 128)
STEPS = 1 if QUICK else 4
ROUNDS = 2 if QUICK else 8
BATCH = 2 if QUICK else 8


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_segmenter_train_step(benchmark, sync, precision):
    skip_unless_runs(precision)
    images, masks = images_and_masks(4 * BATCH, CROP)
    model = segmenter()
    record(benchmark, GROUP, "segmenter_train_step", precision, CROP, role="ref" if precision == "fp32" else None,
           per_call=STEPS, batch=BATCH, channels=list(SEG_CHANNELS))
    timed(benchmark, lambda: train_segmenter(images, masks, STEPS, BATCH, model=model, precision=precision,
                                             device=str(bench_device())), sync, ROUNDS)


def _segmenter(impl: str) -> Segmenter:
    """A Segmenter over the default network for each backend (ORT: exported in memory)."""
    from vesselfast.data import preprocessing_spec

    meta = {"preprocessing": preprocessing_spec("octa"), "tile": TILE, "stride": STRIDE, "threshold": 0.5}
    return Segmenter.from_model(segmenter(), meta, "ort" if impl == "ort" else "torch", str(bench_device()),
                                precision="bf16" if impl == "bf16" else "fp32")


@pytest.mark.parametrize("size", IMAGE_SIZES)
@pytest.mark.parametrize("impl", ["eager", "bf16", "ort"])
@pytest.mark.parametrize("mode", ["whole", "tiled"])
def test_segmenter_inference(benchmark, sync, mode, impl, size):
    if impl == "ort" and bench_device().type != "cpu":
        pytest.skip("the ORT benchmark runs the CPU provider")
    skip_unless_runs("bf16" if impl == "bf16" else "fp32")
    seg = _segmenter(impl)
    image = np.random.default_rng(0).uniform(-1, 1, (size, size)).astype(np.float32)
    tile, stride = (size, size) if mode == "whole" else (TILE, STRIDE)
    record(benchmark, GROUP, f"infer_{mode}", impl, size, role="ref" if impl == "eager" else None, per_call=1,
           tile=tile, stride=stride, batch=BATCH)
    timed(benchmark, lambda: seg.probabilities(image, tile, stride, BATCH), sync, ROUNDS * 2, warmup=2)

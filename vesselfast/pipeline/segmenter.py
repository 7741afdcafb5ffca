"""Training of the segmenter F (BCE + soft Dice, Adam, poly learning-rate schedule) and its use on
whole images. Used for F^0..F^K, the baselines, and the domain-gap measurement."""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from vesselfast.inference import sliding_window_probs, torch_batch_fn
from vesselfast.losses import bce_soft_dice_loss
from vesselfast.models import SegmenterUNet, autocast, to_memory_format


def augment(x: torch.Tensor, y: torch.Tensor, g: torch.Generator):
    """Random flips and 90-degree rotations, the same for image and mask (vessels have no orientation)."""
    k = int(torch.randint(0, 4, (1,), generator=g))
    x, y = torch.rot90(x, k, (-2, -1)), torch.rot90(y, k, (-2, -1))
    if torch.rand(1, generator=g) < 0.5:
        x, y = x.flip(-1), y.flip(-1)
    return x, y


def train_segmenter(images: torch.Tensor, masks: torch.Tensor, steps: int, batch_size: int = 8, lr: float = 1e-3,
                    seed: int = 0, device: str = "cpu", precision: str = "bf16", channels_last: bool = True,
                    model: Optional[SegmenterUNet] = None, channels=(16, 32, 64, 128, 256),
                    progress: Optional[Callable[[int, float], None]] = None) -> SegmenterUNet:
    """images [N, 1, h, w] float32 in [-1, 1], masks [N, 1, h, w] {0,1}: crops already cut.
    ``model`` continues training an existing segmenter (fine-tuning); otherwise a fresh one from ``seed``.
    ``progress(step, loss)`` is called after each step."""
    if images.shape[0] == 0:
        raise ValueError("no training images for the segmenter")
    g = torch.Generator().manual_seed(seed)
    if model is None:
        torch.manual_seed(seed)
        model = SegmenterUNet(images.shape[1], channels)
    model = to_memory_format(model.to(device), channels_last).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (1 - s / max(1, steps)) ** 0.9)
    for step in range(steps):
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=g)
        x, y = augment(images[idx], masks[idx], g)
        x = to_memory_format(x.to(device), channels_last)
        with autocast(device, precision):
            logits = model(x)
        loss = bce_soft_dice_loss(logits, y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress:
            progress(step + 1, float(loss))
    return model.eval()


def predict_probs(model: SegmenterUNet, image: np.ndarray, tile: int = 256, stride: int = 128, device: str = "cpu",
                  precision: str = "fp32") -> np.ndarray:
    """Vessel probability map [H, W] of one preprocessed image [H, W] (sliding window)."""
    return sliding_window_probs(torch_batch_fn(model, device, precision), image, tile, stride)

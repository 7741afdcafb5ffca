"""Training of the segmenter F (BCE + soft Dice, Adam, poly learning-rate schedule) and its use on
whole images. Used for F^0..F^K, the baselines, the survey's probe and the domain-gap measurement."""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from vesselfast.data.augment import augment
from vesselfast.inference import sliding_window_probs, torch_batch_fn
from vesselfast.losses import bce_soft_dice_loss
from vesselfast.models import GradScaling, SegmenterUNet, autocast, to_memory_format
from vesselfast.pipeline import dist
from vesselfast.pipeline.loop import run_training


def train_segmenter(images: torch.Tensor, masks: torch.Tensor, steps: int, batch_size: int = 8, lr: float = 1e-3,
                    seed: int = 0, device: str = "cpu", precision: str = "auto", channels_last: bool = True,
                    model: Optional[SegmenterUNet] = None, channels: Sequence[int] = (16, 32, 64, 128, 256),
                    run=None, stage: Optional[str] = None, ckpt_every: int = 200, desc: str = "segmenter") -> SegmenterUNet:
    """images [N, 1, h, w] float32 in [-1, 1], masks [N, 1, h, w] {0,1}: crops already cut.
    ``model`` continues training an existing segmenter (fine-tuning); otherwise a fresh one from ``seed``.
    With ``run``/``stage`` the loop checkpoints and resumes (see loop.run_training).
    Under torchrun: DistributedDataParallel, ``batch_size`` is the global batch (each rank draws its share
    of it from its own generator), and every rank ends with rank 0's weights and BatchNorm statistics."""
    if images.shape[0] == 0:
        raise ValueError("no training images for the segmenter")
    g = torch.Generator().manual_seed(dist.rank_seed(seed))
    local_batch = dist.per_rank_batch(batch_size, "segmenter.batch_size")
    if model is None:
        torch.manual_seed(seed)
        model = SegmenterUNet(images.shape[1], channels)
    model = to_memory_format(model.to(device), channels_last).train()
    net = dist.wrap(model, device)  # the model itself in one process
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (1 - s / max(1, steps)) ** 0.9)
    scaling = GradScaling(precision, device)

    def step_fn(step):
        idx = torch.randint(0, images.shape[0], (local_batch,), generator=g)
        x, y = augment(g, images[idx], masks[idx])
        x = to_memory_format(x.to(device), channels_last)
        with autocast(device, precision):
            logits = net(x)
        loss = bce_soft_dice_loss(logits, y.to(device))
        opt.zero_grad(set_to_none=True)
        scaling.backward_step(loss, opt)
        sched.step()
        return loss.detach()

    run_training(step_fn, steps, {"model": model, "opt": opt, "sched": sched, **scaling.state()}, g, desc, run, stage,
                 ckpt_every)
    dist.sync_buffers(model)
    return model.eval()


def predict_probs(model: SegmenterUNet, image: np.ndarray, tile: int = 256, stride: int = 128, device: str = "cpu",
                  precision: str = "auto") -> np.ndarray:
    """Vessel probability map [H x W] of one preprocessed image [H x W] (sliding window, channels_last)."""
    return sliding_window_probs(torch_batch_fn(model, device, precision, channels_last=True), image, tile, stride)


def probability_maps(model: SegmenterUNet, images: List[np.ndarray], tile: int, stride: int, device: str,
                     precision: str, desc: str) -> List[np.ndarray]:
    """Probability maps [H x W] of ``model`` on preprocessed ``images`` [H x W], each rank computing a
    contiguous share, gathered in order (every probability map a run computes goes through here)."""
    own = dist.shard(images)
    bar = tqdm(total=len(own), desc=desc, leave=False, dynamic_ncols=True, disable=None if dist.is_main() else True)
    out = []
    for image in own:
        out.append(predict_probs(model, image, tile, stride, device, precision))
        bar.update(1)
    bar.close()
    return dist.gather(out)

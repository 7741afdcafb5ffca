"""Sliding-window inference shared by evaluation, pseudo-labelling, ``vesselfast segment`` and the
ONNX/TensorRT runtimes: tiles of ``tile`` px with ``stride``, overlapping logits averaged as
probabilities. Images smaller than a tile are padded with background (-1) and cropped back.
"""
from __future__ import annotations

from typing import Callable, List

import numpy as np
import torch

# batch [N, 1, tile, tile] float32 numpy -> logits [N, 1, tile, tile] float32 numpy
BatchFn = Callable[[np.ndarray], np.ndarray]


def _starts(size: int, tile: int, stride: int) -> List[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] != size - tile:
        starts.append(size - tile)
    return starts


def sliding_window_probs(batch_fn: BatchFn, image: np.ndarray, tile: int = 256, stride: int = 128,
                         batch_size: int = 8, background: float = -1.0) -> np.ndarray:
    """image: float32 [H, W] preprocessed to [-1, 1] -> vessel probability [H, W] float32."""
    if stride <= 0 or stride > tile:
        raise ValueError(f"stride must be in (0, tile={tile}], got {stride}")
    h, w = image.shape
    ph, pw = max(h, tile), max(w, tile)
    padded = np.full((ph, pw), background, dtype=np.float32)
    padded[:h, :w] = image
    coords = [(y, x) for y in _starts(ph, tile, stride) for x in _starts(pw, tile, stride)]
    prob_sum = np.zeros((ph, pw), dtype=np.float64)
    count = np.zeros((ph, pw), dtype=np.float64)
    for i in range(0, len(coords), batch_size):
        chunk = coords[i:i + batch_size]
        batch = np.stack([padded[y:y + tile, x:x + tile] for y, x in chunk])[:, None]
        logits = np.asarray(batch_fn(np.ascontiguousarray(batch, dtype=np.float32)), dtype=np.float64)
        probs = 1.0 / (1.0 + np.exp(-logits[:, 0]))
        for (y, x), p in zip(chunk, probs):
            prob_sum[y:y + tile, x:x + tile] += p
            count[y:y + tile, x:x + tile] += 1
    return (prob_sum / count)[:h, :w].astype(np.float32)


def torch_batch_fn(model: torch.nn.Module, device="cpu", precision: str = "fp32",
                   channels_last: bool = False) -> BatchFn:
    """Wraps a segmenter for :func:`sliding_window_probs` (eval mode, no grad, ``precision`` fp32 | bf16 |
    fp16 | auto, optionally channels_last for the model and its inputs). The model is moved to ``device``."""
    from vesselfast.models.precision import autocast, resolved, to_memory_format

    precision = resolved(device, precision)
    model = to_memory_format(model.eval().to(device), channels_last)  # a model loaded on the CPU runs on ``device``

    @torch.no_grad()
    def fn(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(batch).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            return model(x).float().cpu().numpy()

    return fn

"""The two baselines every run reports beside the method (same segmenter budget as F^0):
``baseline`` (segmenter trained on preprocessed source crops: the paper's Baseline) and
``baseline_histmatch`` (each source crop histogram-matched to a random target training image)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def histogram_match(src: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Maps src's values so that their empirical CDF follows ref's (exact quantile mapping; ties in src
    keep one value)."""
    s = src.ravel()
    s_values, s_idx, s_counts = np.unique(s, return_inverse=True, return_counts=True)
    s_quantiles = np.cumsum(s_counts) / s.size
    r_sorted = np.sort(ref.ravel())
    r_quantiles = np.arange(1, r_sorted.size + 1) / r_sorted.size
    mapped = np.interp(s_quantiles, r_quantiles, r_sorted)
    return mapped[s_idx].reshape(src.shape).astype(src.dtype)


def histmatch_crops(crops: torch.Tensor, target_images: Sequence[np.ndarray], seed: int) -> torch.Tensor:
    """crops [N, 1, h, w]; each matched to a random target training image (whole image histogram)."""
    rng = np.random.default_rng(seed)
    out = crops.clone()
    for i in range(crops.shape[0]):
        ref = target_images[int(rng.integers(len(target_images)))]
        out[i, 0] = torch.from_numpy(histogram_match(crops[i, 0].numpy(), ref))
    return out

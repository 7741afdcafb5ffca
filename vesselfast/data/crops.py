"""Random training crops and the on-the-fly "thick" mask of the vessel-weighted loss."""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from vesselfast.data.preprocess import BACKGROUND

_DISKS: Dict[Tuple[float, str, torch.dtype], torch.Tensor] = {}


def disk_kernel(radius: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """[1,1,K,K] kernel of the integer offsets (dy, dx) with dy^2 + dx^2 <= radius^2."""
    key = (float(radius), str(device), dtype)
    k = _DISKS.get(key)
    if k is None:
        r = int(math.floor(radius))
        o = torch.arange(-r, r + 1, dtype=torch.float64)
        k = ((o[:, None] ** 2 + o[None, :] ** 2) <= float(radius) ** 2 + 1e-9).to(dtype=dtype, device=device)
        k = k[None, None].contiguous()
        _DISKS[key] = k
    return k


def thick_mask(mask: torch.Tensor, radius: float = 2) -> torch.Tensor:
    """w = 1 where the Euclidean distance to the nearest vessel pixel is <= radius, else 0.

    mask: [B,1,H,W] float {0,1} (any float dtype, any device). Exact: a pixel is within ``radius`` of a
    vessel pixel iff a vessel pixel sits at an integer offset (dy, dx) with dy^2 + dx^2 <= radius^2, so
    this is a convolution with that disk, thresholded (computed in float32; output keeps the input dtype).
    """
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"thick_mask expects [B,1,H,W], got {tuple(mask.shape)}")
    if radius < 0:
        raise ValueError("radius must be >= 0")
    m = (mask > 0.5).to(torch.float32)
    if radius < 1:
        return m.to(mask.dtype)
    k = disk_kernel(radius, device=mask.device)
    r = k.shape[-1] // 2
    hit = F.conv2d(m, k, padding=r)
    return (hit > 0.5).to(mask.dtype)


def random_crops(samples: Sequence, n: int, size: int, rng: np.random.Generator,
                 vessel_centred: float = 0.5) -> Tuple[np.ndarray, Optional[np.ndarray], np.ndarray]:
    """n random size x size crops from samples (each picked uniformly at random).

    ``round(n * vessel_centred)`` of them (in random order among the n) are centred on a random vessel
    pixel; the others are centred on a random field-of-view pixel. Unlabelled samples (mask None) get
    FOV-centred crops only. Crops are clamped to stay inside the image; an image smaller than
    ``size`` is padded with background (-1, mask 0, fov False) on the bottom/right, never resized.

    Returns (images float32 [n,1,size,size], masks float32 [n,1,size,size] or None when any sample has no
    mask, fov bool [n,1,size,size])."""
    if not samples:
        raise ValueError("random_crops: no samples")
    n, size = int(n), int(size)
    labelled = all(s.mask is not None for s in samples)
    imgs = np.full((n, 1, size, size), BACKGROUND, np.float32)
    masks = np.zeros((n, 1, size, size), np.float32) if labelled else None
    fovs = np.zeros((n, 1, size, size), bool)
    n_v = int(round(n * float(vessel_centred))) if labelled else 0
    kinds = np.zeros(n, bool)
    kinds[:n_v] = True
    rng.shuffle(kinds)
    which = rng.integers(0, len(samples), size=n)
    cache: Dict[Tuple[int, bool], np.ndarray] = {}
    for i in range(n):
        j = int(which[i])
        s = samples[j]
        h, w = s.image.shape
        key = (j, bool(kinds[i]))
        idx = cache.get(key)
        if idx is None:
            src = (s.mask.astype(bool) & s.fov) if kinds[i] else s.fov
            if kinds[i] and not src.any():
                src = s.mask
            idx = np.flatnonzero(src) if src is not None else np.empty(0, np.int64)
            cache[key] = idx
        if idx.size:
            c = int(idx[rng.integers(0, idx.size)])
            cy, cx = divmod(c, w)
        else:
            cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        y0 = min(max(cy - size // 2, 0), max(h - size, 0))
        x0 = min(max(cx - size // 2, 0), max(w - size, 0))
        hh, ww = min(size, h), min(size, w)
        imgs[i, 0, :hh, :ww] = s.image[y0:y0 + hh, x0:x0 + ww]
        fovs[i, 0, :hh, :ww] = s.fov[y0:y0 + hh, x0:x0 + ww]
        if masks is not None:
            masks[i, 0, :hh, :ww] = s.mask[y0:y0 + hh, x0:x0 + ww]
    return imgs, masks, fovs

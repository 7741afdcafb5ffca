"""Vessel calibre (mean labelled width in pixels) = vessel area / skeleton length.

Skeleton: Zhang-Suen thinning with a 256-entry lookup table (numpy only). Skeleton length counts
axial steps as 1 and diagonal steps as sqrt(2) (half of each pixel's links to its skeleton neighbours).
"""
from __future__ import annotations

import numpy as np

# neighbour order P2..P9 (N, NE, E, SE, S, SW, W, NW) as bits 0..7
_OFFS = [(-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1)]


def _luts():
    lut1 = np.zeros(256, bool)
    lut2 = np.zeros(256, bool)
    for code in range(256):
        p = [(code >> k) & 1 for k in range(8)]
        b = sum(p)
        a = sum((p[k] == 0 and p[(k + 1) % 8] == 1) for k in range(8))
        p2, p3, p4, p5, p6, p7, p8, p9 = p
        if 2 <= b <= 6 and a == 1:
            lut1[code] = (p2 * p4 * p6 == 0) and (p4 * p6 * p8 == 0)
            lut2[code] = (p2 * p4 * p8 == 0) and (p2 * p6 * p8 == 0)
    return lut1, lut2


_LUT1, _LUT2 = _luts()


def _codes(img: np.ndarray) -> np.ndarray:
    pad = np.pad(img, 1)
    h, w = img.shape
    code = np.zeros((h, w), np.int32)
    for k, (dy, dx) in enumerate(_OFFS):
        code |= pad[1 + dy:1 + dy + h, 1 + dx:1 + dx + w].astype(np.int32) << k
    return code


def skeletonize(mask: np.ndarray, max_iter: int = 200) -> np.ndarray:
    img = np.asarray(mask, bool).copy()
    for _ in range(max_iter):
        changed = False
        for lut in (_LUT1, _LUT2):
            rm = img & lut[_codes(img)]
            if rm.any():
                img &= ~rm
                changed = True
        if not changed:
            break
    return img


def skeleton_length(skel: np.ndarray) -> float:
    s = skel.astype(np.int32)
    pad = np.pad(s, 1)
    h, w = s.shape
    ax = sum(pad[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy, dx in _OFFS[0::2])
    dg = sum(pad[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy, dx in _OFFS[1::2])
    # each link is seen from both ends; isolated pixels count 1
    links = 0.5 * (ax * s).sum() + 0.5 * np.sqrt(2.0) * (dg * s).sum()
    isolated = ((ax + dg) * s == 0) & (s == 1)
    return float(links + isolated.sum())


def mean_width(mask: np.ndarray) -> float:
    """Mean vessel width in pixels (area / skeleton length); NaN for an empty mask."""
    m = np.asarray(mask, bool)
    if not m.any():
        return float("nan")
    length = skeleton_length(skeletonize(m))
    return float(m.sum() / max(length, 1.0))

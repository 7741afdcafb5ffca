"""Vessel calibre (mean width in pixels) of binary vessel maps: vessel area / skeleton length.

The skeleton is scikit-image's 2-D thinning (Zhang's method); its length counts axial links as 1 and
diagonal links as sqrt(2). One definition serves labelled source masks and the binarised predictions the
pipeline's survey measures on unlabelled target images (vesselfast/pipeline/survey.py), so the ratio of
the two is what the source rescale factor is made of.
"""
from __future__ import annotations

import math
from typing import Iterable, List

import numpy as np

_AXIAL = ((-1, 0), (1, 0), (0, -1), (0, 1))
_DIAGONAL = ((-1, -1), (-1, 1), (1, -1), (1, 1))


def skeletonize(mask: np.ndarray) -> np.ndarray:
    from skimage.morphology import skeletonize as thin

    return thin(np.asarray(mask, bool))


def skeleton_length(skel: np.ndarray) -> float:
    s = np.asarray(skel, bool).astype(np.int32)
    pad = np.pad(s, 1)
    h, w = s.shape

    def neighbours(offsets):
        return sum(pad[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy, dx in offsets)
    ax, dg = neighbours(_AXIAL), neighbours(_DIAGONAL)
    # each link is seen from both of its ends; an isolated pixel counts 1
    links = 0.5 * (ax * s).sum() + 0.5 * math.sqrt(2.0) * (dg * s).sum()
    isolated = ((ax + dg) * s == 0) & (s == 1)
    return float(links + isolated.sum())


def mean_width(mask: np.ndarray) -> float:
    """Mean vessel width in pixels (area / skeleton length); NaN for an empty mask."""
    m = np.asarray(mask, bool)
    if not m.any():
        return float("nan")
    return float(m.sum() / max(skeleton_length(skeletonize(m)), 1.0))


def widths(masks: Iterable[np.ndarray]) -> List[float]:
    """:func:`mean_width` of every map that marks something (empty ones skipped)."""
    return [w for w in (mean_width(m) for m in masks) if not math.isnan(w)]


def mean_calibre(masks: Iterable[np.ndarray]) -> float:
    """Mean over maps of :func:`mean_width`, skipping empty ones; NaN when all are empty."""
    found = widths(masks)
    return float(np.mean(found)) if found else float("nan")

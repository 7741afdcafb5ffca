"""The one place where images become network inputs; shared by training, evaluation, ``segment`` and the
ONNX export metadata (:func:`preprocessing_spec`).

Fundus (source), in this order:
  0. the FOV (file, else computed) is eroded by ``FOV_ERODE_PX`` = 3 px (its dark rim would become a bright
     ring) and the vessel mask is cleared outside it,
  1. optional rescale by ``scale`` (OpenCV INTER_AREA down / INTER_LINEAR up; masks and FOV are resampled
     as area fractions and thresholded at 0.5),
  2. one channel: ``green`` (default, the paper's choice) or ``luminance`` (0.299 R + 0.587 G + 0.114 B),
  3. inverted (255 - x) so vessels are bright as in OCTA,
  4. pixels outside the field of view filled with the median inside it (so CLAHE sees no FOV edge),
  5. optional CLAHE (default on; clip 2.0, 8x8 tiles, on the 8-bit channel),
  6. scaled to [-1, 1] by x / 127.5 - 1 (fixed map, no per-image stretch),
  7. outside the FOV set to background, -1.
OCTA (target): grey (RGB input -> luminance) -> optional rescale -> optional CLAHE -> x / 127.5 - 1;
the FOV is the whole image.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
from scipy import ndimage

CLAHE_DEFAULT = True
CLAHE_CLIP = 2.0
CLAHE_TILES = 8
CHANNELS = ("green", "luminance")
BACKGROUND = -1.0
# The FOV rim of real fundus photographs is dark and blurred, so after inversion it becomes a bright,
# vessel-like ring (measured 2 px on DRIVE, 3 px on CHASE_DB1): the FOV is eroded by this many pixels
# (at the original resolution) before anything else.
FOV_ERODE_PX = 3

def _cv2():
    import cv2

    cv2.setNumThreads(1)
    return cv2


def _resize(arr: np.ndarray, scale: float, binary: bool = False) -> np.ndarray:
    if scale == 1.0:
        return arr
    cv2 = _cv2()
    h, w = arr.shape[:2]
    nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    interp = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
    if binary:
        out = cv2.resize(arr.astype(np.float32), (nw, nh), interpolation=interp)
        return out >= 0.5
    return cv2.resize(arr, (nw, nh), interpolation=interp)


def _clahe(u8: np.ndarray) -> np.ndarray:
    cv2 = _cv2()
    return cv2.createCLAHE(clipLimit=CLAHE_CLIP, tileGridSize=(CLAHE_TILES, CLAHE_TILES)).apply(u8)


def to_channel(img: np.ndarray, channel: str = "green") -> np.ndarray:
    """uint8 [H,W] from a grey or RGB uint8 image."""
    if channel not in CHANNELS:
        raise ValueError(f"channel must be one of {CHANNELS}, got {channel!r}")
    if img.ndim == 2:
        return img
    if channel == "green":
        return np.ascontiguousarray(img[..., 1])
    lum = img[..., 0] * 0.299 + img[..., 1] * 0.587 + img[..., 2] * 0.114
    return np.clip(lum + 0.5, 0, 255).astype(np.uint8)


def fov_from_image(img: np.ndarray, threshold: int = 20) -> np.ndarray:
    """Field of view of a fundus photograph without a FOV file: red channel (or grey) above ``threshold``,
    largest component, holes filled, eroded by 2 px (the rim of the FOV is dim and blurred)."""
    cv2 = _cv2()
    ch = img[..., 0] if img.ndim == 3 else img
    m = (ch > threshold).astype(np.uint8)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    if n > 1:
        biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        m = (lab == biggest).astype(np.uint8)
    m = ndimage.binary_fill_holes(m.astype(bool)).astype(np.uint8)
    m = cv2.erode(m, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    if not m.any():
        return np.ones(ch.shape, bool)
    return m.astype(bool)


def erode_fov(fov: np.ndarray, px: int = FOV_ERODE_PX) -> np.ndarray:
    if px <= 0 or fov.all():
        return fov
    cv2 = _cv2()
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * px + 1, 2 * px + 1))
    out = cv2.erode(fov.astype(np.uint8), k, borderType=cv2.BORDER_CONSTANT, borderValue=1).astype(bool)
    return out if out.any() else fov


def preprocess_source(img: np.ndarray, mask: Optional[np.ndarray] = None, fov: Optional[np.ndarray] = None, *,
                      channel: str = "green", clahe: bool = CLAHE_DEFAULT, scale: float = 1.0,
                      fov_erode: int = FOV_ERODE_PX) -> Tuple[np.ndarray, Optional[np.ndarray], np.ndarray]:
    """Fundus RGB (or grey) uint8 -> (image float32 [H,W] in [-1,1], mask uint8 {0,1} or None, fov bool)."""
    if img.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {img.dtype}")
    if fov is None:
        fov = fov_from_image(img)
    fov = erode_fov(np.asarray(fov, bool), int(fov_erode))
    if mask is not None:
        mask = np.asarray(mask, bool) & fov
    img = _resize(img, scale)
    fov = _resize(fov, scale, binary=True)
    if mask is not None:
        mask = _resize(np.asarray(mask, bool), scale, binary=True)
    ch = 255 - to_channel(img, channel)
    if fov.any() and not fov.all():
        ch = ch.copy()
        ch[~fov] = np.uint8(np.median(ch[fov]))
    if clahe:
        ch = _clahe(ch)
    out = ch.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    out[~fov] = BACKGROUND
    return out, (None if mask is None else mask.astype(np.uint8)), fov


def preprocess_target(img: np.ndarray, mask: Optional[np.ndarray] = None, *, clahe: bool = CLAHE_DEFAULT,
                      scale: float = 1.0) -> Tuple[np.ndarray, Optional[np.ndarray], np.ndarray]:
    """OCTA grey (or RGB -> luminance) uint8 -> (image float32 [H,W] in [-1,1], mask uint8 or None, fov all True)."""
    if img.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {img.dtype}")
    g = to_channel(img, "luminance")
    g = _resize(g, scale)
    if mask is not None:
        mask = _resize(np.asarray(mask, bool), scale, binary=True)
    if clahe:
        g = _clahe(g)
    out = g.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return out, (None if mask is None else mask.astype(np.uint8)), np.ones(out.shape, bool)


def preprocessing_spec(modality: str, *, channel: str = "green", clahe: bool = CLAHE_DEFAULT,
                       scale: float = 1.0) -> Dict[str, object]:
    """Flat JSON-able description of the preprocessing (stored e.g. in ONNX metadata); ``apply_spec``
    reproduces it."""
    if modality not in ("fundus", "octa"):
        raise ValueError(f"modality must be 'fundus' or 'octa', got {modality!r}")
    spec = {
        "version": 1,
        "modality": modality,
        "channel": channel if modality == "fundus" else "luminance",
        "invert": modality == "fundus",
        "clahe": bool(clahe),
        "clahe_clip": CLAHE_CLIP,
        "clahe_tiles": CLAHE_TILES,
        "scale": float(scale),
        "range": [-1.0, 1.0],
        "map": "x/127.5-1 on 8-bit",
        "background": BACKGROUND,
        "fov": "file, else red channel > 20, largest component, eroded 2 px" if modality == "fundus" else "all",
        "fov_erode_px": FOV_ERODE_PX if modality == "fundus" else 0,
    }
    return spec


def apply_spec(spec: Dict[str, object], img: np.ndarray, fov: Optional[np.ndarray] = None):
    """Preprocess one raw uint8 image according to a :func:`preprocessing_spec` dict -> (image, fov)."""
    if spec["modality"] == "fundus":
        im, _, f = preprocess_source(img, None, fov, channel=str(spec["channel"]), clahe=bool(spec["clahe"]),
                                     scale=float(spec["scale"]), fov_erode=int(spec.get("fov_erode_px", FOV_ERODE_PX)))
    else:
        im, _, f = preprocess_target(img, None, clahe=bool(spec["clahe"]), scale=float(spec["scale"]))
    return im, f

"""Segmentation metrics, per image, then mean and std over images (docs/METHOD.md, section 9).

- DSC = 2|P & G| / (|P| + |G|) and ACC on the probability map thresholded at ``threshold`` (0.5).
- AUC: area under the ROC curve of the probability map (Mann-Whitney statistic, ties count 1/2).
- AHD = 0.5 * (d(P->G) + d(G->P)) in pixels, d(A->B) = mean over foreground pixels of A of the
  Euclidean distance to the nearest foreground pixel of B (exact, scipy's distance transform).
- With a field-of-view mask, pixels outside it are ignored (fundus); OCTA uses every pixel.

Empty masks, defined rather than crashing:
- DSC: both P and G empty -> 1.0 (perfect agreement); exactly one empty -> 0.0.
- AHD: both empty -> 0.0; exactly one empty -> the image diagonal (the largest distance possible:
  a penalty, not a hole in the average).
- AUC: undefined when G has a single class (no positives or no negatives) -> NaN for that image; the
  mean and std skip NaNs and ``n_auc_undefined`` says how many were skipped.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata

METRICS = ("dsc", "auc", "acc", "ahd")


def _binary(a) -> np.ndarray:
    return np.asarray(a).astype(bool)


def dsc(pred: np.ndarray, label: np.ndarray) -> float:
    p, g = _binary(pred), _binary(label)
    denom = p.sum() + g.sum()
    return 1.0 if denom == 0 else float(2.0 * np.logical_and(p, g).sum() / denom)


def acc(pred: np.ndarray, label: np.ndarray) -> float:
    p, g = _binary(pred), _binary(label)
    return float((p == g).mean()) if p.size else float("nan")


def auc(scores: np.ndarray, label: np.ndarray) -> float:
    """ROC AUC = P(score of a random positive > score of a random negative) + 0.5 P(tie)."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    g = _binary(label).ravel()
    n_pos = int(g.sum())
    n_neg = g.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)  # 1-based, ties share their average rank
    return float((ranks[g].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def mean_distance(a: np.ndarray, b: np.ndarray) -> float:
    """d(A->B): mean over foreground pixels of A of the distance to the nearest foreground pixel of B.
    Both must be non-empty."""
    dist_to_b = ndimage.distance_transform_edt(~b)
    return float(dist_to_b[a].mean())


def ahd(pred: np.ndarray, label: np.ndarray) -> float:
    p, g = _binary(pred), _binary(label)
    if not p.any() and not g.any():
        return 0.0
    if not p.any() or not g.any():
        return float(math.hypot(*p.shape))
    return 0.5 * (mean_distance(p, g) + mean_distance(g, p))


def image_metrics(prob: np.ndarray, label: np.ndarray, fov: Optional[np.ndarray] = None,
                  threshold: float = 0.5) -> Dict[str, float]:
    """All metrics of one image. prob: float [H, W] in [0, 1]; label: {0,1} [H, W]; fov: bool [H, W]."""
    prob = np.asarray(prob, dtype=np.float64)
    label = _binary(label)
    if prob.shape != label.shape:
        raise ValueError(f"prediction {prob.shape} and label {label.shape} differ in size")
    pred = prob >= threshold
    if fov is not None:
        fov = _binary(fov)
        pred, label_in = pred & fov, label & fov
        return {"dsc": dsc(pred[fov], label_in[fov]), "acc": acc(pred[fov], label_in[fov]),
                "auc": auc(prob[fov], label_in[fov]), "ahd": ahd(pred, label_in)}
    return {"dsc": dsc(pred, label), "acc": acc(pred, label), "auc": auc(prob, label), "ahd": ahd(pred, label)}


def summarize(per_image: List[Dict[str, float]]) -> Dict[str, float]:
    """Mean and std (population) of each metric over images; NaN AUCs skipped and counted."""
    out: Dict[str, float] = {"n_images": len(per_image)}
    for m in METRICS:
        vals = np.array([r[m] for r in per_image], dtype=np.float64)
        ok = vals[~np.isnan(vals)]
        out[m] = float(ok.mean()) if ok.size else float("nan")
        out[f"{m}_std"] = float(ok.std()) if ok.size else float("nan")
    out["n_auc_undefined"] = int(sum(math.isnan(r["auc"]) for r in per_image))
    return out


def evaluate_images(probs: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                    fovs: Optional[Sequence[Optional[np.ndarray]]] = None, threshold: float = 0.5) -> Dict:
    """Per-image metrics and their summary: ``{**summary, "per_image": [...]}``."""
    if len(probs) != len(labels):
        raise ValueError(f"{len(probs)} predictions for {len(labels)} labels")
    fovs = fovs if fovs is not None else [None] * len(probs)
    per_image = [image_metrics(p, g, f, threshold) for p, g, f in zip(probs, labels, fovs)]
    return {**summarize(per_image), "per_image": per_image}


def intensity_histogram(images: np.ndarray, bins: int = 256, lo: float = -1.0, hi: float = 1.0) -> np.ndarray:
    """Normalised histogram (sums to 1) of every pixel of ``images`` (any shape) over [lo, hi]."""
    h, _ = np.histogram(np.clip(np.asarray(images, dtype=np.float64), lo, hi), bins=bins, range=(lo, hi))
    return h / max(h.sum(), 1)


def histogram_distance(a: np.ndarray, b: np.ndarray, bins: int = 256) -> Dict[str, float]:
    """How far apart two sets of images are in intensity, as the paper measures the synthetic images
    against the real target ones: Euclidean distance and cosine distance (1 - cosine similarity) between
    their normalised intensity histograms (``bins`` bins over [-1, 1]; 0 = identical distributions)."""
    pa, pb = intensity_histogram(a, bins), intensity_histogram(b, bins)
    cos = float(pa @ pb / max(np.linalg.norm(pa) * np.linalg.norm(pb), 1e-300))
    return {"hist_euclidean": float(np.linalg.norm(pa - pb)), "hist_cosine": 1.0 - cos}

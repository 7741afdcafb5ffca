"""Label-free calibration of a segmenter: the one definition of the *marked share*, the vessel-fraction
prior a segmenter is calibrated to, and the logit shift that makes it mark that share. Pure functions;
the stages call them (stages.py).

Why: self-training drifts without it. On OCTA-500 3M the uncalibrated F^0 marked 28% of the pixels as
vessel (capillaries included) and every round's pseudo-labels taught the next generator the same
(docs/PIPELINE.md).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np

PRIOR_MODES = ("estimate", "source", "none")


def marked_share(probs: Sequence[np.ndarray], threshold: float) -> float:
    """Share of all pixels of the probability maps ``probs`` (each [H x W], pooled, so a larger image
    weighs more) at or above ``threshold``: what a segmenter marks as vessel."""
    marked = sum(int(np.count_nonzero(p >= threshold)) for p in probs)
    return marked / max(1, sum(int(p.size) for p in probs))


def mean_probability(probs: Sequence[np.ndarray]) -> float:
    """Mean vessel probability over all pixels of ``probs`` (each [H x W], pooled): the expected share of
    vessel pixels if the probabilities were calibrated. ``vessel_prior: estimate`` is the anchor's: on
    OCTA-500 3M its error is -4 % where the share it marks is -17 % (docs/PIPELINE.md)."""
    total = sum(float(np.sum(p, dtype=np.float64)) for p in probs)
    return total / max(1, sum(int(p.size) for p in probs))



def vessel_prior(mode: str, source_fraction: float, estimate: Optional[float],
                 cap: bool) -> Tuple[Optional[float], str]:
    """(The vessel fraction to calibrate to, or None for no calibration; a note when the cap applied).

    :param mode: ``estimate`` (baseline_histmatch's mean probability on the target training images),
        ``source`` (the source masks' vessel fraction inside the FOV), ``none``, or a fraction as text.
    :param source_fraction: the source masks' vessel fraction.
    :param estimate: baseline_histmatch's mean probability (needed for ``estimate``).
    :param cap: ``estimate`` is at most ``source_fraction``. Why: a segmenter trained on one domain errs
        on the other mostly by marking vessel-like structure the target's annotators leave out (OCTA's
        capillary mesh), so its share over-estimates far more than it under-estimates. On built-in data
        it marked 41% of the target against a true 11%; on OCTA-500 3M 5.5-6.2% against 6.8%.
    """
    if mode == "none":
        return None, ""
    if mode == "source":
        return source_fraction, ""
    if mode != "estimate":
        return float(mode), ""
    if estimate is None:
        raise ValueError("vessel_prior=estimate needs baseline_histmatch's estimate (the vessel_fraction stage)")
    if cap and estimate > source_fraction:
        return source_fraction, (f"baseline_histmatch estimates {100 * estimate:.2f}% of the target, more than the "
                                 f"source masks' {100 * source_fraction:.2f}%: capped there (segmenter.estimate_cap)")
    return float(estimate), ""


def logit_shift(probs: Sequence[np.ndarray], prior: float, threshold: float) -> Tuple[float, float]:
    """(The shift to add to a segmenter's output logits so that a ``prior`` share of the pooled pixels of
    ``probs`` [H x W] reaches ``threshold``; the marked share before the shift)."""
    p = np.clip(np.concatenate([q.ravel() for q in probs]).astype(np.float64), 1e-7, 1 - 1e-7)
    logits = np.log(p) - np.log1p(-p)
    before = marked_share(probs, threshold)
    return math.log(threshold / (1 - threshold)) - float(np.quantile(logits, 1.0 - prior)), before

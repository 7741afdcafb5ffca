"""The target sample: the fixed-size random sample of target training images that every label-free
statistic and every inference on the target training set uses (the survey's probe, the vessel-fraction
estimate, the calibration quantile, the pseudo-labels), so that these stages cost the same for 200 images
or 20,000; and the sampling errors of what is estimated from it.

A target with at most ``data.target_sample`` training images is used whole: its statistics have no
sampling error, and the stages' identities do not name the key (their result does not depend on it, so a
run made before the key existed is reused). A larger target is sampled once per run (stream
``target_sample``, without replacement, in the folder's order), and every stage that sees the sample
declares ``data.target_sample``. The generators still train on crops of every target image (the crop pool
is cut from all of them, inputs.py).

The errors are standard errors of a simple random sample of ``n`` of ``N`` images without replacement
(finite-population correction ``1 - n / N``): for a mean over images, and, for a share pooled over the
pixels of images of different sizes, the ratio estimator's (Cochran, Sampling Techniques, 6.9).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

from vesselfast.data import Sample

KEY = "data.target_sample"


@dataclass(frozen=True)
class TargetSample:
    """The target training images the label-free stages see, drawn from ``population`` images."""
    samples: List[Sample]   # images only: labels never read
    population: int         # N, the number of target training images
    keys: Tuple[str, ...]   # config keys a stage using the sample declares: (KEY,) when it is a sample

    @property
    def images(self) -> List[np.ndarray]:
        """The preprocessed images [H x W] in [-1, 1]."""
        return [s.image for s in self.samples]

    @property
    def sampled(self) -> bool:
        return len(self.samples) < self.population

    def info(self, **errors: float) -> Dict[str, float]:
        """What stages.json keeps about the sample beside a stage's figures: nothing for a whole target,
        else the sample's size and each sampling error given (rounded)."""
        if not self.sampled:
            return {}
        return {"target_images_used": len(self.samples), **{k: round(v, 5) for k, v in errors.items()}}

    def describe(self) -> str:
        n = len(self.samples)
        return f"a random sample of {n} of the {self.population} target training images" if self.sampled \
            else f"all {n} target training images"


def draw(target_train: Sequence[Sample], size: int, seed: int) -> TargetSample:
    """At most ``size`` of ``target_train``, drawn without replacement from ``seed``, kept in their order."""
    population = len(target_train)
    if population <= size:
        return TargetSample(list(target_train), population, ())
    idx = np.sort(np.random.default_rng(seed).choice(population, size=size, replace=False))
    return TargetSample([target_train[int(i)] for i in idx], population, (KEY,))


def mean_error(values: Sequence[float], population: int) -> float:
    """Standard error of the mean of ``values``, a simple random sample of ``len(values)`` of
    ``population`` units without replacement; 0 when the sample is the population."""
    v = np.asarray(values, dtype=np.float64)
    n = v.size
    if n >= population or n < 2:
        return 0.0 if n >= population else float("nan")
    return math.sqrt((1.0 - n / population) * float(np.var(v, ddof=1)) / n)


def ratio_error(totals: Sequence[float], sizes: Sequence[float], population: int) -> float:
    """Standard error of the pooled share ``sum(totals) / sum(sizes)`` (e.g. vessel pixels over pixels,
    image by image) from a simple random sample of images without replacement (the ratio estimator's
    linearised variance); 0 when the sample is the population."""
    y, x = np.asarray(totals, dtype=np.float64), np.asarray(sizes, dtype=np.float64)
    n = y.size
    if n >= population or n < 2:
        return 0.0 if n >= population else float("nan")
    r = y.sum() / x.sum()
    residual_var = float(np.sum((y - r * x) ** 2)) / (n - 1)
    return math.sqrt((1.0 - n / population) * residual_var / n) / float(x.mean())


def share_error(probs: Sequence[np.ndarray], population: int, threshold: float) -> float:
    """Sampling error of the share of pixels of ``probs`` (each [H x W]) at or above ``threshold``."""
    return ratio_error([np.count_nonzero(p >= threshold) for p in probs], [p.size for p in probs], population)


def mean_probability_error(probs: Sequence[np.ndarray], population: int) -> float:
    """Sampling error of the mean probability pooled over the pixels of ``probs`` (each [H x W])."""
    return ratio_error([float(np.sum(p, dtype=np.float64)) for p in probs], [p.size for p in probs], population)

"""The survey: how much to rescale each source so that its vessels are as wide as the target's, estimated
from the labelled source and the *unlabelled* target images, before anything else is trained.

Vessel calibre in pixels differs between datasets by field of view, resolution and what their annotators
called a vessel (DRIVE's labelled vessels are 2.7 px wide on average at its native size, CHASE_DB1's
5.6 px), and a segmenter trained at the wrong calibre marks structures of the wrong size (on OCTA: the
capillary mesh, or only the widest vessels). Nothing here is a constant for a dataset:

1. Each source folder's calibre ``c_d`` is measured on its own labels (mean width = area / skeleton
   length, vesselfast.data.calibre) and the folders are brought to a common calibre ``c_ref = min_d c_d``.
2. A *scale-agnostic* probe segmenter is trained on those source crops at several scales at once
   (``data.survey_scales``, default 0.5x to 2x of ``c_ref``), histogram-matched to target images (the cheap
   ``baseline_histmatch`` recipe). Having seen vessels of every width, it marks the target's vessels at
   their own width instead of the one it learned.
3. The target calibre ``c_T`` is the mean width of what the probe marks on the target training images
   (the target sample, sampling.py: at most ``data.target_sample`` of them, the sampling error logged);
   folder d is rescaled by ``c_T / c_d``. Everything is logged and kept in stages.json.

Measured on DRIVE + CHASE_DB1 -> OCTA-500 3M (docs/DATA.md): a probe trained at one scale only drifts
towards the calibre it learned (its target widths followed the source scale with slope ~0.9), which is
why the probe sees several; the probe's widths on the *source* are not comparable to the source labels
(fundus labels include faint thin vessels a histogram-matched segmenter misses, so its source predictions
are 1.3x wider on average), which is why the comparison is target prediction against source label.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Sequence, Tuple

import numpy as np
import torch

from vesselfast.data import random_crops
from vesselfast.data.calibre import mean_calibre, widths
from vesselfast.pipeline.baselines import histmatch_crops
from vesselfast.pipeline.calibration import marked_share
from vesselfast.pipeline.inputs import DATA_KEYS, Inputs, source_at
from vesselfast.pipeline.rundir import LOG
from vesselfast.pipeline.sampling import TargetSample, mean_error, share_error
from vesselfast.pipeline.segmentation import probability_maps, train_segmenter
from vesselfast.pipeline.stages import SEGMENTER_KEYS, Context

SURVEY_KEYS = DATA_KEYS + SEGMENTER_KEYS + ("data.survey_steps", "data.survey_scales")


@dataclass
class SurveyResult:
    source_calibres: Dict[str, float]   # folder -> mean labelled width at its native size
    reference_calibre: float            # c_ref: the common calibre the probe's scales are relative to
    target_calibre: float               # c_T: mean width of what the probe marks on the target images
    marked_share: float                 # share of target pixels the probe marks (logged)
    factors: Dict[str, float]           # folder -> c_T / c_d
    note: str = ""


def run_survey(source_calibres: Dict[str, float], scales: Sequence[float],
               probe: Callable[[Sequence[Dict[str, float]]], Tuple[float, float]]) -> SurveyResult:
    """``probe(list of per-folder factor dicts)`` trains one probe on the source at every factor set of
    the list and returns (mean width, share) of what it marks on the target images."""
    bad = [f"{d} ({c})" for d, c in source_calibres.items() if not (c > 0)]
    if bad:
        raise ValueError(f"no labelled vessels to measure the calibre of {', '.join(bad)}")
    c_ref = min(source_calibres.values())
    factor_sets = [{d: m * c_ref / c for d, c in source_calibres.items()} for m in scales]
    width, share = probe(factor_sets)
    note = ""
    if math.isnan(width) or not width > 0:
        width, note = c_ref, "the probe marked no vessel on the target images: sources kept at the common calibre"
    return SurveyResult(dict(source_calibres), c_ref, width, share,
                        {d: width / c for d, c in source_calibres.items()}, note)


def probe(ctx: Context, view, inputs: Inputs, sample: TargetSample,
          errors: Dict[str, float]) -> Callable[[Sequence[Dict[str, float]]], Tuple[float, float]]:
    """The survey's probe for :func:`run_survey`: trains one segmenter on the source at every factor set
    (an equal share of ``data.pool`` crops each), histogram-matched to target images, and returns the mean
    width and the marked share of what it marks on the target ``sample``; their sampling errors go to
    ``errors`` (``target_calibre_error``, ``marked_share_error``)."""
    def measure(factor_sets):
        seg, data_cfg = view.segmenter, view.data
        rng = np.random.default_rng(ctx.stream("survey_crops"))
        share = max(1, data_cfg.pool // len(factor_sets))
        crops = [random_crops(source_at(view, factors, ctx.seed), share, data_cfg.crop, rng) for factors in factor_sets]
        images = torch.as_tensor(np.concatenate([im for im, _, _ in crops]))
        masks = torch.as_tensor(np.concatenate([m for _, m, _ in crops]))
        matched = histmatch_crops(images, inputs.target_images, ctx.stream("survey_histmatch"))
        model = train_segmenter(matched, masks, data_cfg.survey_steps, seg.batch_size, seg.lr,
                                ctx.stream("survey_probe"), ctx.device, seg.precision, channels=seg.channels,
                                desc="survey probe")
        probs = probability_maps(model, sample.images, seg.tile, seg.stride, ctx.device, seg.precision, "survey")
        found = widths(p >= seg.threshold for p in probs)
        errors.update(target_calibre_error=mean_error(found, sample.population),
                      marked_share_error=share_error(probs, sample.population, seg.threshold))
        return (float(np.mean(found)) if found else float("nan")), marked_share(probs, seg.threshold)
    return measure


def survey_stage(ctx: Context, inputs: Inputs, sample: TargetSample) -> Dict[str, float]:
    """Source folder -> rescale factor, estimated by the survey (its probe sees the target ``sample``)."""
    def compute(view):
        calibres = {folder: mean_calibre(s.mask for s in inputs.sources[folder]) for folder in view.data.source}
        errors: Dict[str, float] = {}
        res = run_survey(calibres, view.data.survey_scales, probe(ctx, view, inputs, sample, errors))
        LOG.info(f"survey: target calibre {res.target_calibre:.2f}"
                 + (f" +- {errors['target_calibre_error']:.2f}" if sample.sampled else "")
                 + f" px on {sample.describe()} (source calibres "
                 + ", ".join(f"{k} {v:.2f}" for k, v in res.source_calibres.items()) + "); rescale factors "
                 + ", ".join(f"{k} {v:.3f}" for k, v in res.factors.items())
                 + f"; the probe marks {100 * res.marked_share:.1f}"
                 + (f" +- {100 * errors['marked_share_error']:.1f}" if sample.sampled else "") + "% of the target pixels"
                 + (f" ({res.note})" if res.note else ""))
        info = {"source_calibres": {k: round(v, 4) for k, v in res.source_calibres.items()},
                "target_calibre": round(res.target_calibre, 4), "marked_share": round(res.marked_share, 5),
                "factors": {k: round(v, 4) for k, v in res.factors.items()}, "note": res.note}
        info.update(sample.info(**errors))  # sampling errors (standard errors, sampling.py) and the sample's size
        return {"factors": dict(res.factors), "_info": info}
    return dict(ctx.cache.stage("survey", SURVEY_KEYS + sample.keys, (), compute)["factors"])

#!/usr/bin/env python
"""How well label-free estimates of the target's vessel fraction hit the truth (issue: the calibration
prior). For saved segmenters of a finished run, on the run's target *training* images (no label read):

* ``marked``: the share of pixels at or above the threshold (what ``vessel_prior: estimate`` uses, from
  baseline_histmatch);
* ``mean_prob``: the mean vessel probability (the expected share if the probabilities were calibrated).

The truth is the labelled share of the target's val + test images (train labels stay unread, as
everywhere); the same estimators on the test images are compared with their own labels too.

``--source-ratio``: also the anchor's mean probability and marked share over the labelled share on
held-out *source* images (each source folder's ``test`` split at the run's rescale factor, its field of
view histogram-matched to a random target training image), and the anchor's target figures divided by
that ratio (label-free on the target; rejected, docs/PIPELINE.md "The vessel-fraction estimate").

``--em``: also the anchor's target prior by EM prior adjustment (Saerens, Latinne and Decaestecker 2002),
with the anchor's training prior from the run's rescaled source masks, inside their fields of view and over
the anchor's training crops (label-free on the target; rejected, same section).

``--latent-class``: also the prevalence of a two-class latent class model (Hui and Walter 1980; Dawid and
Skene 1979) fitted by EM to the joint binary outputs of the ``--stages`` segmenters (at least three; each
at its threshold, with its calibration's logit shift undone, so before it saw the run's prior): the
"agreement of several probes" read through conditional independence given the true label (label-free on
the target; rejected, same section).

    python scripts/measure_vessel_fraction.py runs/real [--stages baseline_histmatch segmenter_0 ...] [--source-ratio] [--em] [--latent-class]
"""
from __future__ import annotations

import argparse
import sys

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--stages", nargs="*", default=["baseline_histmatch", "baseline", "segmenter_0"])
    ap.add_argument("--source-ratio", action="store_true", help="the held-out source correction (see the docstring)")
    ap.add_argument("--em", action="store_true", help="the EM prior adjustment of the anchor (see the docstring)")
    ap.add_argument("--latent-class", action="store_true",
                    help="the latent class prevalence of the --stages' raw outputs (see the docstring)")
    args = ap.parse_args(argv)
    if args.latent_class and len(args.stages) < 3:
        ap.error("--latent-class: give at least three --stages (two probes do not identify the prevalence)")
    from pathlib import Path

    if not all((Path(args.run) / name).is_file() for name in ("config.yaml", "stages.json")):
        ap.error(f"{args.run}: not a finished run directory (no config.yaml / stages.json); give one of `vesselfast train --out`")

    import yaml

    from vesselfast.data.io import read_mask
    from vesselfast.data.layouts import detect
    from vesselfast.pipeline.config import from_dict
    from vesselfast.pipeline.inputs import load_samples
    from vesselfast.pipeline.rundir import RunDir
    from vesselfast.pipeline.stages import Context, segmenter_probs

    run = RunDir(args.run, writer=False)
    cfg = from_dict(yaml.safe_load((run.root / "config.yaml").read_text()))
    train = load_samples(cfg, [cfg.data.target], "target", "train", False, seed=cfg.seed)
    test = load_samples(cfg, [cfg.data.target_test or cfg.data.target], "target", "test", True, seed=cfg.seed)
    layout = detect(cfg.data.target)
    labelled = [read_mask(e.mask) for sp in ("val", "test") for e in layout.entries(sp, True)]
    truth = float(np.concatenate([m.ravel() > 0 for m in labelled]).mean())
    test_truth = float(np.concatenate([s.mask.ravel() for s in test]).mean())
    ctx = Context(None, run, cfg.seed, "cpu", 1)
    print(f"run {args.run}: labelled vessel fraction {100 * truth:.2f} % (val + test, {len(labelled)} images); "
          f"test {100 * test_truth:.2f} %")
    print("| stage | estimator | on train images | error vs val+test labels | on test images | error vs test labels |")
    print("|---|---|---|---|---|---|")
    train_probs = {}  # stage -> its probabilities on the target training images, reused by --em and --latent-class
    for stage in args.stages:
        if not run.is_done(stage):
            print(f"| {stage} | (not in this run) | | | | |")
            continue
        state = run.load(stage)
        p_train = train_probs[stage] = segmenter_probs(ctx, state, [s.image for s in train], "fp32", stage)
        p_test = segmenter_probs(ctx, state, [s.image for s in test], "fp32", stage)
        for name, fn in (("marked", lambda ps: float(np.mean(np.concatenate([p.ravel() >= state["threshold"]
                                                                             for p in ps])))),
                         ("mean_prob", lambda ps: float(np.mean(np.concatenate([p.ravel() for p in ps]))))):
            a, b = fn(p_train), fn(p_test)
            print(f"| {stage} | {name} | {100 * a:.2f} % | {100 * (a / truth - 1):+.1f} % | {100 * b:.2f} % | "
                  f"{100 * (b / test_truth - 1):+.1f} % |")
    if args.source_ratio:
        source_ratio(cfg, run, ctx, [s.image for s in train], truth)
    if args.em:
        em_prior(cfg, run, ctx, [s.image for s in train], truth, train_probs.get("baseline_histmatch"))
    if args.latent_class:
        latent_class(run, [train_probs[stage] for stage in args.stages if stage in train_probs],
                     [stage for stage in args.stages if stage in train_probs], truth)
    return 0


def em_fixed_point(p: np.ndarray, prior_source: float, tol: float = 1e-7, max_iter: int = 500) -> float:
    """The target prior pi at which re-weighting the posteriors ``p`` (trained at ``prior_source``) by
    pi / prior_source and (1 - pi) / (1 - prior_source) gives back pi as their mean (Saerens et al. 2002)."""
    pi = prior_source
    for _ in range(max_iter):
        a = (pi / prior_source) * p
        b = ((1 - pi) / (1 - prior_source)) * (1 - p)
        new = float(np.mean(a / (a + b)))
        if abs(new - pi) < tol:
            return new
        pi = new
    return pi


def em_prior(cfg, run, ctx, target_images, truth, probs=None) -> None:
    """Prints the anchor's EM-adjusted target prior for two readings of its training prior (``probs``: the
    anchor's probabilities on ``target_images`` where already computed)."""
    from vesselfast.pipeline.inputs import build_data, load_inputs
    from vesselfast.pipeline.stages import segmenter_probs

    data = build_data(cfg, cfg.seed, load_inputs(cfg), run.load("survey")["factors"])  # the run's crop pools
    priors = {"source fields of view": data.source_vessel_fraction(),
              "the anchor's training crops": float(data.src_masks.float().mean())}
    if probs is None:
        probs = segmenter_probs(ctx, run.load("baseline_histmatch"), target_images, "fp32", "anchor")
    p = np.concatenate([q.ravel() for q in probs]).astype(np.float64)
    for name, prior in priors.items():
        pi = em_fixed_point(p, prior)
        print(f"EM prior adjustment, training prior from {name} {100 * prior:.2f} %: {100 * pi:.2f} % "
              f"({100 * (pi / truth - 1):+.1f} % against the val + test labels)")


def latent_class_fit(x: np.ndarray, iters: int = 2000) -> tuple[float, np.ndarray, np.ndarray]:
    """Prevalence, sensitivities and specificities of K conditionally independent binary probes.

    :param x: an [N x K] bool array, probe k's call on pixel n.
    :return: (pi, se [K], sp [K]) at EM's fixed point, fitted on the 2^K pattern counts.
    """
    k = x.shape[1]
    counts = np.bincount(x.astype(np.int64) @ (1 << np.arange(k)), minlength=1 << k).astype(np.float64)
    patterns = ((np.arange(1 << k)[:, None] >> np.arange(k)) & 1).astype(np.float64)
    pi, se, sp = 0.1, np.full(k, 0.8), np.full(k, 0.9)
    for _ in range(iters):
        l1 = pi * np.prod(se ** patterns * (1 - se) ** (1 - patterns), 1)
        l0 = (1 - pi) * np.prod((1 - sp) ** patterns * sp ** (1 - patterns), 1)
        w1 = counts * l1 / (l1 + l0)
        w0 = counts - w1
        pi = w1.sum() / counts.sum()
        se = (w1[:, None] * patterns).sum(0) / w1.sum()
        sp = (w0[:, None] * (1 - patterns)).sum(0) / w0.sum()
    return float(pi), se, sp


def latent_class(run, probs, stages, truth) -> None:
    """Prints the latent class prevalence of the stages' raw calls (``probs[i]``: stage i's probabilities on
    the target training images, its calibration's logit shift still in them)."""
    import json

    records = json.loads((run.root / "stages.json").read_text())
    if len(stages) < 3:
        print(f"latent class: only {len(stages)} of the --stages are in this run; it needs three")
        return
    calls = []
    for stage, maps in zip(stages, probs):
        p = np.clip(np.concatenate([q.ravel() for q in maps]).astype(np.float64), 1e-7, 1 - 1e-7)
        raw = 1 / (1 + np.exp(-(np.log(p / (1 - p)) - records[stage].get("logit_shift", 0.0))))
        calls.append(raw >= run.load(stage)["threshold"])
        print(f"{stage}: marks {100 * calls[-1].mean():.2f} % before its calibration")
    pi, se, sp = latent_class_fit(np.stack(calls, 1))
    print(f"latent class prevalence of {' + '.join(stages)}: {100 * pi:.2f} % "
          f"({100 * (pi / truth - 1):+.1f} % against the val + test labels); sensitivities "
          f"{np.round(se, 3).tolist()}, specificities {np.round(sp, 4).tolist()}")


def source_ratio(cfg, run, ctx, target_images, truth) -> None:
    """Prints, per source folder and pooled (weighted by images), the anchor's figure / labelled share on
    the folder's held-out test images, and the anchor's target figures divided by the pooled ratio."""
    from vesselfast.pipeline.baselines import histogram_match
    from vesselfast.pipeline.inputs import load_samples
    from vesselfast.pipeline.stages import segmenter_probs

    factors, anchor = run.load("survey")["factors"], run.load("baseline_histmatch")
    figures = run.load("vessel_fraction")
    rng = np.random.default_rng(0)
    ratios = {"mean_prob": [], "marked": []}
    weights = []
    print("| source folder (test split) | images | factor | labelled share | anchor mean prob (ratio) | anchor marks (ratio) |")
    print("|---|---|---|---|---|---|")
    for folder in cfg.data.source:
        held = load_samples(cfg, [folder], "source", "test", True, [factors[folder]], cfg.seed)
        images = []
        for s in held:
            im = s.image.copy()
            im[s.fov] = histogram_match(s.image[s.fov], target_images[int(rng.integers(len(target_images)))])
            images.append(im)
        probs = segmenter_probs(ctx, anchor, images, "fp32", "held-out source")
        label = float(np.mean(np.concatenate([s.mask[s.fov].ravel() > 0 for s in held])))
        mean_prob = float(np.mean(np.concatenate([p[s.fov] for p, s in zip(probs, held)])))
        marked = float(np.mean(np.concatenate([p[s.fov] >= anchor["threshold"] for p, s in zip(probs, held)])))
        ratios["mean_prob"].append(mean_prob / label)
        ratios["marked"].append(marked / label)
        weights.append(len(held))
        print(f"| {folder} | {len(held)} | {factors[folder]:.3f} | {100 * label:.2f} % | {100 * mean_prob:.2f} % "
              f"({mean_prob / label:.3f}) | {100 * marked:.2f} % ({marked / label:.3f}) |")
    for name, key in (("mean_prob", "mean_probability"), ("marked", "marked_share")):
        ratio = float(np.average(ratios[name], weights=weights))
        estimate = figures[key] / ratio
        print(f"corrected {name}: {100 * figures[key]:.2f} % / {ratio:.3f} = {100 * estimate:.2f} % "
              f"({100 * (estimate / truth - 1):+.1f} % against the val + test labels)")


if __name__ == "__main__":
    sys.exit(main())

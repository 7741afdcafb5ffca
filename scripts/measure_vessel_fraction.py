#!/usr/bin/env python
"""How well label-free estimates of the target's vessel fraction hit the truth (issue: the calibration
prior). For saved segmenters of a finished run, on the run's target *training* images (no label read):

* ``marked``: the share of pixels at or above the threshold (what ``vessel_prior: estimate`` uses, from
  baseline_histmatch);
* ``mean_prob``: the mean vessel probability (the expected share if the probabilities were calibrated).

The truth is the labelled share of the target's val + test images (train labels stay unread, as
everywhere); the same estimators on the test images are compared with their own labels too.

    python scripts/measure_vessel_fraction.py runs/real [--stages baseline_histmatch segmenter_0 ...]
"""
from __future__ import annotations

import argparse
import sys

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--stages", nargs="*", default=["baseline_histmatch", "baseline", "segmenter_0"])
    args = ap.parse_args(argv)

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
    for stage in args.stages:
        if not run.is_done(stage):
            print(f"| {stage} | (not in this run) | | | | |")
            continue
        state = run.load(stage)
        p_train = segmenter_probs(ctx, state, [s.image for s in train], "fp32", stage)
        p_test = segmenter_probs(ctx, state, [s.image for s in test], "fp32", stage)
        for name, fn in (("marked", lambda ps: float(np.mean(np.concatenate([p.ravel() >= state["threshold"]
                                                                             for p in ps])))),
                         ("mean_prob", lambda ps: float(np.mean(np.concatenate([p.ravel() for p in ps]))))):
            a, b = fn(p_train), fn(p_test)
            print(f"| {stage} | {name} | {100 * a:.2f} % | {100 * (a / truth - 1):+.1f} % | {100 * b:.2f} % | "
                  f"{100 * (b / test_truth - 1):+.1f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

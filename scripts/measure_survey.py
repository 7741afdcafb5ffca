#!/usr/bin/env python
"""The survey's target calibre of a finished run, re-measured with the probe's scales centred on the
previous pass's estimate instead of the sources' common calibre (a candidate fix for the survey's bias,
rejected: docs/DATA.md, "Where the survey's estimate errs"). Prints each pass beside the mean labelled
width of the target's test images (read only to score; no stage reads them).

    python scripts/measure_survey.py runs/gn_s0 [--passes 2]
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--passes", type=int, default=2, help="recentred passes after the run's own survey")
    args = ap.parse_args(argv)
    if args.passes < 0:
        ap.error(f"--passes {args.passes}: give 0 or more")
    from pathlib import Path

    if not all((Path(args.run) / name).is_file() for name in ("config.yaml", "stages.json")):
        ap.error(f"{args.run}: not a finished run directory (no config.yaml / stages.json); give one of `vesselfast train --out`")

    import yaml

    from vesselfast.data.calibre import mean_calibre
    from vesselfast.data.io import read_mask
    from vesselfast.data.layouts import detect
    from vesselfast.pipeline.config import from_dict
    from vesselfast.pipeline.inputs import load_inputs
    from vesselfast.pipeline.rundir import RunDir
    from vesselfast.pipeline.sampling import draw
    from vesselfast.pipeline.stages import Context
    from vesselfast.pipeline.survey import probe, run_survey

    run = RunDir(args.run, writer=False)
    cfg = from_dict(yaml.safe_load((run.root / "config.yaml").read_text()))
    inputs = load_inputs(cfg)
    ctx = Context(None, run, cfg.seed, "cpu", 1)
    sample = draw(inputs.target_train, cfg.data.target_sample, ctx.stream("target_sample"))  # the run's sample
    labels = mean_calibre(read_mask(e.mask) > 0 for e in detect(cfg.data.target_test or cfg.data.target).entries("test", True))
    survey = json.loads((run.root / "stages.json").read_text())["survey"]  # the run's own survey
    calibres, estimate = survey["source_calibres"], survey["target_calibre"]
    c_ref = min(calibres.values())
    print(f"{args.run}: test labels {labels:.2f} px; the run's survey {estimate:.2f} px (scales centred at {c_ref:.2f})")
    for k in range(args.passes):
        scales = [m * estimate / c_ref for m in cfg.data.survey_scales]
        centre, estimate = estimate, run_survey(calibres, scales, probe(ctx, cfg, inputs, sample, {})).target_calibre
        print(f"pass {k + 2}: scales centred at {centre:.2f} px -> {estimate:.2f} px", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

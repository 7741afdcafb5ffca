"""Whole-image inference against the tiles, on a finished run's segmenters: the same saved model and
threshold, probabilities from overlapping tiles (the run's tile / stride) or from one pass over the image
padded to the network's multiple. Prints DSC / AUC / AHD and the inference seconds of each.

    python scripts/measure_whole_image.py --run runs/real [--stages segmenter_3,baseline_histmatch]

Labels of the run's target test split are read (this is an evaluation, after training).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

from vesselfast import hardware
from vesselfast.checkpoint import segmenter_from_state
from vesselfast.pipeline import dist
from vesselfast.pipeline.cache import StageCache
from vesselfast.pipeline.rundir import RunDir
from vesselfast.pipeline.config import from_dict
from vesselfast.pipeline.evaluation import evaluate_on
from vesselfast.pipeline.inputs import load_samples
from vesselfast.pipeline.keys import final_stage, metric_key
from vesselfast.pipeline.stages import Context


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--stages", help="comma-separated segmenter stages (default: the final one)")
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args()
    if not (Path(args.run) / "config.yaml").is_file():
        print(f"measure_whole_image.py: --run {args.run}: no config.yaml there; "
              "point it at a directory made by vesselfast train", file=sys.stderr)
        return 2
    run = RunDir(args.run, writer=False)
    cfg = from_dict(yaml.safe_load((run.root / "config.yaml").read_text()))
    device = dist.device(cfg.device)
    precision = hardware.option_precision(args.precision, device)[0]
    done = [s for s in run.stages() if metric_key(s) is not None and run.is_done(s)]
    stages = args.stages.split(",") if args.stages else [final_stage(done)]
    ctx = Context(StageCache({"seed": cfg.seed}, run), run, cfg.seed, device, cfg.ckpt_every)
    test = load_samples(cfg, [cfg.data.target_test or cfg.data.target], "target", "test", True, seed=cfg.seed)
    side = max(max(s.image.shape) for s in test)
    print(f"machine: {hardware.cpu_model()}; run {args.run}; {len(test)} test images up to {side} px; "
          f"precision {precision}")
    print(f"{'stage':<22}{'inference':<22}{'DSC':>8}{'AUC':>8}{'AHD':>7}{'seconds':>9}")
    for stage in stages:
        state = run.load(stage, "re-run the training")
        multiple = segmenter_from_state(state).size_multiple
        whole = -(-side // multiple) * multiple  # one tile covering the image, padded to the network's multiple
        variants = [(f"tiles {state['tile']}/{state['stride']}", state),
                    (f"whole image ({whole} px)", dict(state, tile=whole, stride=whole))]
        for name, st in variants:
            t = time.perf_counter()
            res, _ = evaluate_on(ctx, st, test, precision, name)
            print(f"{stage:<22}{name:<22}{res['dsc']:8.4f}{res['auc']:8.4f}{res['ahd']:7.2f}"
                  f"{time.perf_counter() - t:9.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Evaluation on the target test split, the only place target labels are read, and the run's record of
metrics and diagnostics (metrics.json, report.md, pictures). ``vesselfast eval`` re-evaluates a finished
run's segmenters with the same code (:func:`evaluate_run`)."""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Tuple

import torch

from vesselfast.data import Sample
from vesselfast.errors import UserError
from vesselfast.metrics import evaluate_images, histogram_distance
from vesselfast.pipeline import dist, report
from vesselfast.pipeline.keys import metric_key
from vesselfast.pipeline.rundir import LOG, RunDir
from vesselfast.pipeline.stages import Context, segmenter_probs


def evaluate_on(ctx: Context, state: Dict, test: List[Sample], precision: str, desc: str) -> Tuple[Dict, List]:
    """(summary with per-image metrics, probability maps [H x W]) of a saved segmenter (``state``, whose
    tile, stride and threshold it uses) on labelled test samples."""
    probs = segmenter_probs(ctx, state, [s.image for s in test], precision, desc)
    res = evaluate_images(probs, [s.mask for s in test], [s.fov for s in test], state["threshold"])
    summary = {k: v for k, v in res.items() if k != "per_image"}
    summary["per_image"] = {s.name: r for s, r in zip(test, res["per_image"])}
    return summary, probs


class Evaluation:
    """The run's metrics (per model key, keys.py) and the paper's diagnostics, kept in metrics.json as
    they come: an evaluation finished before a restart is not repeated."""

    def __init__(self, ctx: Context, test: List[Sample], precision: str, target_crops: torch.Tensor):
        self.ctx, self.test, self.precision, self.target_crops = ctx, test, precision, target_crops
        saved = dist.broadcast(report.load_metrics(ctx.run))
        self.metrics: Dict[str, Dict] = dict(saved.get("target_test", {}))
        self.seconds: Dict[str, float] = dict(saved.get("evaluation_seconds", {}))  # per model key
        self.diagnostics: Dict[str, Dict] = {}

    def evaluate(self, stage: str, state: Dict) -> Dict:
        """Metrics of the segmenter stage ``stage`` (result ``state``) on the target test split."""
        key = metric_key(stage)
        if key in self.metrics or not self.test:  # no labelled test split: nothing to score against
            return self.metrics.get(key, {})
        t = time.perf_counter()
        summary, probs = evaluate_on(self.ctx, state, self.test, self.precision, f"eval {key}")
        self.metrics[key] = summary
        self.seconds[key] = round(time.perf_counter() - t, 2)
        if self.ctx.run.writer:  # the picture first: a kill between the two redoes this evaluation
            report.save_prediction_grid(self.ctx.run, key, self.test, probs)
            report.save_metrics(self.ctx.run, self.metrics, self.diagnostics, self.seconds)
        LOG.info(f"{key}: DSC {summary['dsc']:.4f} (std {summary['dsc_std']:.4f})  AUC {summary['auc']:.4f}  "
                 f"ACC {summary['acc']:.4f}  AHD {summary['ahd']:.2f} px  ({summary['n_images']} test images)")
        return summary

    def diagnose(self, key: str, images: torch.Tensor, pseudo_label_share: Optional[float] = None) -> None:
        """The paper's diagnostics for the images [N x 1 x c x c] a segmenter is trained on: their
        intensity-histogram distance to the real target training crops, and the share the round's
        pseudo-labels mark (no label read)."""
        entry = histogram_distance(images.numpy(), self.target_crops.numpy())
        if pseudo_label_share is not None:
            entry["pseudo_label_share"] = pseudo_label_share
        self.diagnostics[key] = entry


def evaluate_run(run_dir: str, target_test: Optional[str] = None, precision: str = "auto") -> Dict[str, Dict]:
    """Re-evaluates every saved segmenter of a run on a target test set (the run's, or ``target_test``),
    with inference in ``precision`` (auto: what this machine runs natively)."""
    import yaml

    from vesselfast.hardware import option_precision
    from vesselfast.pipeline.cache import StageCache
    from vesselfast.pipeline.config import from_dict
    from vesselfast.pipeline.inputs import load_samples

    run = RunDir(run_dir, writer=False)
    cfg_path = run.root / "config.yaml"
    if not cfg_path.exists():
        raise UserError(f"--run {run_dir}: no config.yaml there; point --run at a directory made by vesselfast train")
    cfg = from_dict(yaml.safe_load(cfg_path.read_text()))
    device = dist.device(cfg.device)
    precision, warning = option_precision(precision, device)
    if warning:
        LOG.warning(warning)
    stages = [stage for stage in run.stages() if metric_key(stage) is not None and run.is_done(stage)]
    if not stages:
        raise UserError(f"--run {run_dir}: no finished segmenter in {run.ckpt} yet; let vesselfast train --out "
                        f"{run_dir} finish its first segmenter (re-run the command it started with), then eval again")
    ctx = Context(StageCache({"seed": cfg.seed}, run), run, cfg.seed, device, cfg.ckpt_every)
    test = load_samples(cfg, [target_test or cfg.data.target_test or cfg.data.target], "target", "test", True,
                        seed=cfg.seed)
    fix = (f"eval only reads it: delete it, re-run vesselfast train --out {run_dir} with the run's options to "
           "recompute that stage, then eval again")
    return {metric_key(stage): evaluate_on(ctx, run.load(stage, fix), test, precision, f"eval {stage}")[0]
            for stage in stages}

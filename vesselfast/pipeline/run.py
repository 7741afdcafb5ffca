"""The method, top to bottom (docs/METHOD.md numbers the same blocks). Each stage is resumable: its result
is saved atomically in the run directory and skipped on a re-run, or taken from a ``--reuse`` run where a
stage of the same identity finished (cache.py); training stages also continue from in-stage checkpoints.
What each stage computes is in stages.py; the survey in survey.py; evaluation in evaluation.py.

Target labels are read only by the evaluation, on the target test split.

Under torchrun every rank runs this same code: training stages are DistributedDataParallel, the
inference stages are sharded and gathered, and only rank 0 writes (dist.py, docs/DISTRIBUTED.md).
"""
from __future__ import annotations

from typing import Dict

from vesselfast import testhooks
from vesselfast.pipeline import dist, report
from vesselfast.pipeline.baselines import histmatch_crops
from vesselfast.pipeline.config import RunConfig
from vesselfast.pipeline.evaluation import Evaluation
from vesselfast.pipeline.inputs import DATA_KEYS, Inputs, build_data
from vesselfast.pipeline.rundir import LOG
from vesselfast.pipeline.sampling import draw as target_sample
from vesselfast.pipeline.stages import (Calibration, Context, generator_stage, invert_stage, pseudo_label_stage,
                                        segmenter_stage, synthesize_stage, vessel_fraction_stage)
from vesselfast.pipeline.survey import survey_stage


def run_method(cfg: RunConfig, ctx: Context, inputs: Inputs) -> Dict[str, Dict]:
    """Runs (or resumes) every stage of the method; returns the target-test metrics per model key."""
    stage_cache, writer = ctx.cache, ctx.run.writer

    # 0. Survey and data: each source folder's rescale factor (its vessels as wide as the target's,
    #    estimated without target labels), then the crop pools every stage trains on.
    #    Every label-free inference on the target training set sees the same fixed-size random sample of
    #    it (all of a target of at most data.target_sample images), so its cost does not grow with the target.
    sample = target_sample(inputs.target_train, cfg.data.target_sample, ctx.stream("target_sample"))
    LOG.info(f"label-free statistics and pseudo-labels from {sample.describe()}")
    if cfg.data.source_scale is None:
        factors, data_inputs = survey_stage(ctx, inputs, sample), ("survey",)
    else:
        factors, data_inputs = {folder: float(cfg.data.source_scale) for folder in cfg.data.source}, ()
    data = build_data(stage_cache.identify("data", DATA_KEYS, data_inputs), ctx.seed, inputs, factors)
    n_syn = cfg.data.synth_crops
    syn_masks, syn_src = data.src_masks[:n_syn], data.src_images[:n_syn]
    results = Evaluation(ctx, inputs.target_test, cfg.segmenter.precision, data.tgt_images)

    # 1. Baselines (the same segmenter budget as F^0): on raw and on histogram-matched source crops. The
    #    latter, the anchor, gives the label-free estimate of the target's vessel fraction that F^k is
    #    calibrated to: its mean probability on the target training images.
    matched = histmatch_crops(data.src_images, inputs.target_images, ctx.stream("histmatch"))
    estimate = None
    if cfg.baselines or cfg.segmenter.vessel_prior == "estimate":
        anchor = segmenter_stage(ctx, "baseline_histmatch", matched, data.src_masks, "steps_iter0", ("data",))
        if cfg.segmenter.vessel_prior == "estimate":
            figures = vessel_fraction_stage(ctx, anchor, sample)
            estimate = float(figures["mean_probability"])
        if cfg.baselines:
            results.evaluate("baseline_histmatch", anchor)
        else:
            LOG.info("baseline_histmatch: trained for the vessel-fraction estimate only (baselines: false)")
    if cfg.baselines:
        results.evaluate("baseline", segmenter_stage(ctx, "baseline", data.src_images, data.src_masks,
                                                     "steps_iter0", ("data",)))
    calibration = Calibration(sample, data.source_vessel_fraction(), estimate)

    # 2. Pre-train the generators: G_S on source crops with their masks, G_T^0 on target crops.
    g_s = generator_stage(ctx, "pretrain_source", data.src_images, data.src_masks, "steps_source", ("data",))
    g_t = generator_stage(ctx, "pretrain_target", data.tgt_images, None, "steps_target", ("data",))

    # 3. Latent similarity mining: DDIM inversion of the source crops with G_S, t0_steps deep; G_T^0
    #    denoises each latent into a synthetic target image paired with its source mask.
    latents = invert_stage(ctx, g_s, data.src_images, data.src_masks)
    synth = synthesize_stage(ctx, "synthesize_0", g_t, "sampler_iter0", latents, syn_masks, False,
                             ("data", "pretrain_target", "invert"))
    results.diagnose("source", data.src_images)
    results.diagnose("iter0", synth)

    # 4. Iter-0 segmenter F^0 on the synthetic pairs (plus the source mix), calibrated.
    f = segmenter_stage(ctx, "segmenter_0", synth, syn_masks, "steps_iter0", ("data", "synthesize_0"),
                        calibration=calibration, source_mix=(matched, data.src_masks))
    if writer:
        report.save_round_grid(ctx.run, 0, syn_src, latents, synth, syn_masks)
    results.evaluate("segmenter_0", f)

    # 5. Co-optimisation rounds k = 1..K: F^{k-1} pseudo-labels the real target training images; G_T^k,
    #    fine-tuned from G_T^{k-1}, learns (target image, pseudo-label); G_T^k synthesises target images
    #    conditioned on the source masks; F^k (from F^{k-1}) trains on them, calibrated.
    g_name, f_name = "pretrain_target", "segmenter_0"
    finetune = cfg.segmenter.finetune
    for k in range(1, cfg.rounds + 1):
        pseudo = pseudo_label_stage(ctx, f"pseudo_label_{k}", f, f_name, sample)
        g_t = generator_stage(ctx, f"target_generator_{k}", pseudo["images"], pseudo["masks"], "steps_round",
                              (f"pseudo_label_{k}", g_name), init=g_t)
        synth = synthesize_stage(ctx, f"synthesize_{k}", g_t, "sampler", latents, syn_masks, True,
                                 ("data", f"target_generator_{k}", "invert"))
        results.diagnose(f"iter{k}", synth, ctx.run.stages()[f"pseudo_label_{k}"]["marked_share"])
        f = segmenter_stage(ctx, f"segmenter_{k}", synth, syn_masks, "steps_round",
                            ("data", f"synthesize_{k}") + ((f_name,) if finetune else ()),
                            init=f if finetune else None, calibration=calibration,
                            source_mix=(matched, data.src_masks), extra_keys=("segmenter.finetune",))
        g_name, f_name = f"target_generator_{k}", f"segmenter_{k}"
        if writer:
            report.save_round_grid(ctx.run, k, syn_src, latents, synth, syn_masks, pseudo["images"], pseudo["masks"])
        results.evaluate(f_name, f)

    # 6. The self-training control (with the baselines): the same rounds without a generator. Each round's
    #    segmenter trains on real target crops with the previous one's pseudo-labels instead of G_T^k's
    #    synthetic pairs (same budget, calibration, source mix, fine-tuning); round 1 is labelled by the
    #    anchor, and the last round is baseline_selftrain. What the method gains over it is the generator's.
    if cfg.baselines and cfg.rounds > 0:
        f, f_name = anchor, "baseline_histmatch"
        for k in range(1, cfg.rounds + 1):
            labels, name = f"selftrain_pseudo_label_{k}", "baseline_selftrain" if k == cfg.rounds else f"selftrain_{k}"
            pseudo = pseudo_label_stage(ctx, labels, f, f_name, sample)
            f = segmenter_stage(ctx, name, pseudo["images"], pseudo["masks"], "steps_round",
                                ("data", labels) + ((f_name,) if finetune else ()),
                                init=f if finetune else None, calibration=calibration,
                                source_mix=(matched, data.src_masks), extra_keys=("segmenter.finetune",))
            f_name = name
        results.evaluate("baseline_selftrain", f)

    if writer:
        report.write_all(ctx.run, cfg, results.metrics, results.diagnostics, results.seconds)
    dist.barrier()
    testhooks.write_state_hashes(dist.rank())
    return results.metrics

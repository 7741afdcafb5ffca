"""The stages of the method, one function each: what a stage reads from the config (its declared slice,
see cache.py), what it consumes (its arguments and the stages named in ``inputs``) and what it keeps.
run.py calls them in the method's order.

Every function takes the :class:`Context` first: the stage cache and the plumbing that changes no result
(device, run directory, checkpoint interval). Crops are [N x 1 x c x c] float32 tensors in [-1, 1],
masks [N x 1 x c x c] in {0, 1}.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from vesselfast.checkpoint import segmenter_from_state
from vesselfast.data import Sample, preprocessing_spec, random_crops
from vesselfast.diffusion import NoiseSchedule, make_sampler, t0_index
from vesselfast.diffusion.samplers import settings_of
from vesselfast.models import arch_dict, generator_from_dict
from vesselfast.models.generator import ARCH_FIELDS
from vesselfast.pipeline import dist
from vesselfast.pipeline.cache import ConfigSlice, StageCache
from vesselfast.pipeline.calibration import logit_shift, marked_share, mean_probability, vessel_prior
from vesselfast.pipeline.generative import EpsModel, build_generator, invert, synthesize, train_generator
from vesselfast.pipeline.rundir import LOG, RunDir
from vesselfast.pipeline.sampling import TargetSample, mean_probability_error, share_error
from vesselfast.pipeline.seeds import stream_seed
from vesselfast.pipeline.segmentation import probability_maps, train_segmenter

# Declared config slices (dotted keys), by kind of stage.
SCHEDULE_KEYS = ("diffusion.T", "diffusion.schedule")
GENERATOR_KEYS = tuple(f"generator.{f}" for f in ARCH_FIELDS) + (
    "generator.lr", "generator.batch_size", "generator.ema_decay", "generator.precision") + SCHEDULE_KEYS
INVERSION_KEYS = SCHEDULE_KEYS + ("diffusion.ddim_steps", "diffusion.t0_ratio", "diffusion.clip",
                                  "synthesis.batch_size", "generator.precision", "data.synth_crops")
SEGMENTER_KEYS = ("segmenter.channels", "segmenter.lr", "segmenter.batch_size", "segmenter.precision",
                  "segmenter.tile", "segmenter.stride", "segmenter.threshold", "data.clahe")
CALIBRATION_KEYS = ("segmenter.vessel_prior", "segmenter.estimate_cap")
PSEUDO_LABEL_KEYS = ("segmenter.precision", "data.pool", "data.crop")
# a sampler's fields (its identity, diffusion/samplers.py) and the config keys each comes from
SAMPLER_SETTING_KEYS = {"clip": ("diffusion.clip",), "ddim_steps": ("diffusion.ddim_steps",),
                        "t0_steps": ("diffusion.ddim_steps", "diffusion.t0_ratio"),
                        "noise_steps": ("synthesis.noise_steps",), "eta": ("synthesis.eta",)}


@dataclass(frozen=True)
class Context:
    """What every stage gets besides its config slice: nothing here changes a stage's result."""
    cache: StageCache
    run: RunDir
    seed: int          # the run seed: stream_seed(seed, name) seeds each stage's random stream
    device: str
    ckpt_every: int    # steps between in-stage checkpoints

    def stream(self, name: str) -> int:
        return stream_seed(self.seed, name)


@dataclass(frozen=True)
class Calibration:
    """What the label-free calibration of a segmenter stage needs (calibration.py)."""
    sample: TargetSample              # the target training images it is calibrated on (no labels)
    source_fraction: float            # the source masks' vessel fraction inside the FOV
    estimate: Optional[float]         # baseline_histmatch's vessel-fraction figure (vessel_prior=estimate)


def schedule_of(view: ConfigSlice) -> NoiseSchedule:
    return NoiseSchedule.make(view.diffusion.schedule, view.diffusion.T)


def t0_steps_of(view: ConfigSlice) -> int:
    """Inversion steps t0_steps = round(t0_ratio * N) on the N-step DDIM grid (not a timestep)."""
    return t0_index(view.diffusion.t0_ratio, view.diffusion.ddim_steps)


def generator_of(state: Dict):
    """The EMA generator of a generator stage's result."""
    model = generator_from_dict(state["arch"])
    model.load_state_dict(state["ema"])
    return model


def _bar(total: int, desc: str):
    bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None if dist.is_main() else True)
    return bar, (lambda done: bar.update(done - bar.n))


def segmenter_probs(ctx: Context, state: Dict, images: List[np.ndarray], precision: str, desc: str) -> List[np.ndarray]:
    """Probability maps [H x W] of a saved segmenter (``state``: a segmenter stage's result, whose tile
    and stride it uses) on preprocessed ``images`` [H x W], sharded over the ranks."""
    return probability_maps(segmenter_from_state(state), images, state["tile"], state["stride"], ctx.device,
                            precision, desc)


# -- generators ---------------------------------------------------------------------------------------
def generator_stage(ctx: Context, name: str, images: torch.Tensor, masks: Optional[torch.Tensor], steps_key: str,
                    inputs: Sequence[str], init: Optional[Dict] = None) -> Dict:
    """Trains a generator on ``images`` (conditioned on ``masks``, or unconditional with None) for
    ``generator.<steps_key>`` steps, from scratch or fine-tuned from ``init`` (the stage ``inputs[-1]``)."""
    def compute(view):
        gen, seed = view.generator, ctx.stream(name)
        steps = getattr(gen, steps_key)
        model = build_generator(gen, seed)
        if init is not None:
            model.load_state_dict(init["model"])
        ema = train_generator(model, images, masks, steps, gen, schedule_of(view), seed, ctx.device, ctx.run, name,
                              ctx.ckpt_every, desc=name, ema_init=None if init is None else init["ema"])
        return {"arch": arch_dict(gen), "model": model.state_dict(), "ema": ema.state_dict(), "_info": {"steps": steps}}
    return ctx.cache.stage(name, GENERATOR_KEYS + (f"generator.{steps_key}",), inputs, compute)


def invert_stage(ctx: Context, g_s: Dict, src_images: torch.Tensor, src_masks: torch.Tensor) -> torch.Tensor:
    """Latent similarity mining: DDIM inversion of the first ``data.synth_crops`` source crops with G_S
    conditioned on their own masks, for t0_steps steps; float32 latents [n x 1 x c x c]."""
    def compute(view):
        n, batch = view.data.synth_crops, view.synthesis.batch_size
        images, masks, t0_steps = src_images[:n], src_masks[:n], t0_steps_of(view)
        eps_model = EpsModel(generator_of(g_s), view.generator.precision, ctx.device)
        bar, progress = _bar(dist.own_rows(n, batch), "invert")
        latents = dist.gather_tensor_batches(
            lambda batches: invert(eps_model, images, masks, schedule_of(view), view.diffusion.ddim_steps, t0_steps,
                                   batch, view.diffusion.clip, progress, batches=batches), images.shape[0], batch)
        bar.close()
        return {"latents": latents, "_info": {"t0_steps": t0_steps, "unet_evals_per_image": t0_steps,
                                              "unet_evals": dist.total(eps_model.evals)}}
    return ctx.cache.stage("invert", INVERSION_KEYS, ("data", "pretrain_source"), compute)["latents"]


def sampler_keys(sampler_name: str) -> tuple:
    """The config keys the sampler ``sampler_name`` is made of (part of a synthesis stage's identity)."""
    return tuple(sorted({key for setting in settings_of(sampler_name) for key in SAMPLER_SETTING_KEYS[setting]}))


def synthesize_stage(ctx: Context, name: str, g_t: Dict, sampler_key: str, latents: torch.Tensor,
                     masks: torch.Tensor, conditional: bool, inputs: Sequence[str]) -> torch.Tensor:
    """Target-style images [n x 1 x c x c] from G_T (``g_t``), one per source mask ``masks`` [n x 1 x c x c],
    with the sampler named by ``synthesis.<sampler_key>``; ``conditional``: G_T^k sees the masks (k >= 1)."""
    sampler_name = ctx.cache.choice(f"synthesis.{sampler_key}")
    keys = SCHEDULE_KEYS + ("synthesis.batch_size", "generator.precision", f"synthesis.{sampler_key}") \
        + sampler_keys(sampler_name)

    def compute(view):
        read = {"clip": lambda: view.diffusion.clip, "ddim_steps": lambda: view.diffusion.ddim_steps,
                "t0_steps": lambda: t0_steps_of(view), "noise_steps": lambda: view.synthesis.noise_steps,
                "eta": lambda: view.synthesis.eta}  # each setting from its keys in SAMPLER_SETTING_KEYS
        settings = {setting: read[setting]() for setting in settings_of(sampler_name)}
        sampler, schedule, batch = make_sampler(sampler_name, **settings), schedule_of(view), view.synthesis.batch_size
        eps_model = EpsModel(generator_of(g_t), view.generator.precision, ctx.device)
        bar, progress = _bar(dist.own_rows(masks.shape[0], batch), name)
        images = dist.gather_tensor_batches(
            lambda batches: synthesize(eps_model, sampler, masks, latents, schedule, batch, ctx.stream(name),
                                       conditional, progress, batches=batches), masks.shape[0], batch)
        bar.close()
        per_image, evals = sampler.evals_per_image(schedule), dist.total(eps_model.evals)
        assert evals == per_image * masks.shape[0]
        return {"images": images, "_info": {"sampler": sampler_name, "unet_evals_per_image": per_image,
                                            "unet_evals": evals}}
    return ctx.cache.stage(name, keys, inputs, compute)["images"]


# -- segmenters ---------------------------------------------------------------------------------------
def segmenter_stage(ctx: Context, name: str, images: torch.Tensor, masks: torch.Tensor, steps_key: str,
                    inputs: Sequence[str], init: Optional[Dict] = None, calibration: Optional[Calibration] = None,
                    source_mix: Optional[tuple] = None, extra_keys: Sequence[str] = ()) -> Dict:
    """Trains a segmenter on ``images`` / ``masks`` for ``segmenter.<steps_key>`` steps, fine-tuned from
    ``init`` when given. ``source_mix``: (histogram-matched source crops, their masks) mixed into the
    training set as ``segmenter.source_mix`` of it (:func:`training_set`). ``calibration``: shift the
    output logits to the vessel prior afterwards (calibration.py)."""
    keys = SEGMENTER_KEYS + (f"segmenter.{steps_key}",) + tuple(extra_keys)
    if source_mix is not None:
        keys += ("segmenter.source_mix",)
    if calibration is not None:
        keys += CALIBRATION_KEYS + calibration.sample.keys
        if ctx.cache.choice("segmenter.vessel_prior") == "estimate":
            inputs = tuple(inputs) + ("vessel_fraction",)

    def compute(view):
        seg = view.segmenter
        steps = getattr(seg, steps_key)
        x, y = (images, masks) if source_mix is None else training_set(ctx, name, seg.source_mix, images, masks,
                                                                        *source_mix)
        model = segmenter_from_state(init) if init is not None else None
        model = train_segmenter(x, y, steps, seg.batch_size, seg.lr, ctx.stream(name), ctx.device, seg.precision,
                                model=model, channels=seg.channels, run=ctx.run, stage=name,
                                ckpt_every=ctx.ckpt_every, desc=name)
        info = {"steps": steps}

        def probs_on(target_images, what):  # its time is the stage's inference_seconds (keys.profile)
            t = time.perf_counter()
            probs = probability_maps(model, target_images, seg.tile, seg.stride, ctx.device, seg.precision,
                                     f"{what} {name}")
            info["inference_seconds"] = round(info.get("inference_seconds", 0.0) + time.perf_counter() - t, 2)
            return probs
        if calibration is not None:
            prior, note = vessel_prior(seg.vessel_prior, calibration.source_fraction, calibration.estimate,
                                       seg.estimate_cap)
            if prior is not None:
                sample = calibration.sample
                probs = probs_on(sample.images, "calibrate")
                shift, before = logit_shift(probs, prior, seg.threshold)
                with torch.no_grad():
                    model.head.bias += shift
                info.update(calibration_prior=round(prior, 5), marked_share_before=round(before, 5),
                            logit_shift=round(shift, 4))
                # how far the share it marks on all images may lie from the prior: the share of the
                # unshifted probabilities at the threshold moved back by the shift
                unshifted = 1.0 / (1.0 + math.exp(shift - math.log(seg.threshold / (1.0 - seg.threshold))))
                info.update(sample.info(marked_share_error=share_error(probs, sample.population, unshifted)))
                error = (f" +- {info['marked_share_error']:.4f} on all {sample.population} images"
                         if sample.sampled else "")
                LOG.info(f"{name}: calibrated to vessel fraction {prior:.4f}{error} (was {before:.4f}, "
                         f"{sample.describe()}); logit shift {shift:+.3f}" + (f" ({note})" if note else ""))
        meta = {"preprocessing": preprocessing_spec("octa", clahe=view.data.clahe), "tile": seg.tile,
                "stride": seg.stride, "threshold": seg.threshold}
        return {"channels": list(seg.channels), "model": model.state_dict(), **meta, "_info": info}
    return ctx.cache.stage(name, keys, inputs, compute)


def vessel_fraction_stage(ctx: Context, anchor: Dict, sample: TargetSample) -> Dict:
    """The label-free vessel-fraction figures of the anchor (baseline_histmatch, ``anchor``) on the target
    ``sample``: ``marked_share`` (pooled share at its threshold) and ``mean_probability`` (pooled mean,
    what ``vessel_prior=estimate`` calibrates to; the marked share is kept for comparison); on a sample of a
    larger target, also their sampling errors (``*_error``, standard errors)."""
    def compute(view):
        probs = segmenter_probs(ctx, anchor, sample.images, view.segmenter.precision, "vessel fraction")
        figures = {"marked_share": marked_share(probs, anchor["threshold"]), "mean_probability": mean_probability(probs)}
        errors = {"marked_share_error": share_error(probs, sample.population, anchor["threshold"]),
                  "mean_probability_error": mean_probability_error(probs, sample.population)}

        def pm(key):
            return f" +- {100 * errors[key + '_error']:.2f}" if sample.sampled else ""
        LOG.info(f"baseline_histmatch on {sample.describe()}: marks {100 * figures['marked_share']:.2f}"
                 f"{pm('marked_share')}%, mean probability {100 * figures['mean_probability']:.2f}"
                 f"{pm('mean_probability')}%")
        return {**figures, "_info": {**{k: round(v, 5) for k, v in figures.items()}, **sample.info(**errors)}}
    return ctx.cache.stage("vessel_fraction", ("segmenter.precision",) + sample.keys, ("data", "baseline_histmatch"),
                           compute)


def pseudo_label_stage(ctx: Context, name: str, labeller: Dict, labeller_name: str, sample: TargetSample) -> Dict:
    """A round's pseudo-labels: ``labeller`` (F^{k-1}, the stage ``labeller_name``) on the real target
    training images of ``sample``, thresholded at its own threshold, and ``data.pool`` crops of them (images
    and labels [pool x 1 x c x c]). The method's stages are ``pseudo_label_k``, the self-training control's
    ``selftrain_pseudo_label_k``."""
    def compute(view):
        probs = segmenter_probs(ctx, labeller, sample.images, view.segmenter.precision, name.replace("_", " "))
        labels = [(p >= labeller["threshold"]).astype(np.uint8) for p in probs]
        crops, masks, _ = random_crops(
            [Sample(s.name, s.image, lab, s.fov, s.source_path) for s, lab in zip(sample.samples, labels)],
            view.data.pool, view.data.crop, np.random.default_rng(ctx.stream(name)))
        info = {"marked_share": marked_share(probs, labeller["threshold"]),
                **sample.info(marked_share_error=share_error(probs, sample.population, labeller["threshold"]))}
        return {"images": torch.as_tensor(crops), "masks": torch.as_tensor(masks), "_info": info}
    return ctx.cache.stage(name, PSEUDO_LABEL_KEYS + sample.keys, ("data", labeller_name), compute)


def training_set(ctx: Context, name: str, source_mix: float, synth_images: torch.Tensor, synth_masks: torch.Tensor,
                 matched_source: torch.Tensor, source_masks: torch.Tensor):
    """What F^k trains on: the synthetic pairs plus, as ``source_mix`` (``segmenter.source_mix``) of the
    whole set, histogram-matched source crops drawn at random (stream ``<name>_mix``)."""
    n = int(round(source_mix / (1.0 - source_mix) * synth_images.shape[0]))
    if n == 0:
        return synth_images, synth_masks
    rng = np.random.default_rng(ctx.stream(f"{name}_mix"))
    idx = torch.as_tensor(rng.choice(matched_source.shape[0], size=n, replace=n > matched_source.shape[0]))
    return torch.cat([synth_images, matched_source[idx]]), torch.cat([synth_masks, source_masks[idx]])

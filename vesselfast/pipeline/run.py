"""The method end to end, top to bottom. Each stage is resumable: its result is saved atomically in
the run directory and skipped on a re-run; training stages also continue from in-stage checkpoints.

    pretrain_source     G_S: mask-conditioned DDPM on source crops (vessel-weighted noise loss)
    pretrain_target     G_T^0: same network, mask channel zeros, target crops (w = 0)
    invert              DDIM inversion of the source crops with G_S, t0 of the DDIM steps
    synthesize_0        G_T^0 denoises each latent: synthetic target images paired with source masks
    segmenter_0         F^0 on (synthetic image, source mask); evaluated as iter0
    baseline[_histmatch]  segmenters on source crops (raw / histogram-matched), same budget as F^0
    round k = 1..K:     pseudo_label_k (F^{k-1} on the real target training images),
                        target_generator_k (G_T^k from G_T^{k-1} on (target image, pseudo-label)),
                        synthesize_k (G_T^k conditioned on the source masks), segmenter_k (F^k); iter{k}

Target labels are read only by :func:`evaluate`, on the target test split.

Under torchrun every rank runs this same code: training stages are DistributedDataParallel, the
inference stages are sharded and gathered, and only rank 0 writes (see dist.py, docs/DISTRIBUTED.md).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from vesselfast.data import Sample, builtin_domain, load_domain, preprocessing_spec, random_crops
from vesselfast.data.calibre import mean_calibre
from vesselfast.diffusion import NoiseSchedule, t0_index
from vesselfast.errors import UserError
from vesselfast.metrics import evaluate_images, histogram_distance
from vesselfast import testhooks
from vesselfast.checkpoint import segmenter_from_state
from vesselfast.models import SegmenterUNet, generator_from_dict
from vesselfast.pipeline import dist, report
from vesselfast.pipeline.baselines import histmatch_crops
from vesselfast.pipeline.config import RunConfig, dump, settle_precision, to_dict
from vesselfast.pipeline.generative import (EpsModel, build_generator, evals_per_image, generator_arch, invert,
                                            synthesize, train_generator)
from vesselfast.pipeline.identity import stage_identity
from vesselfast.pipeline.rundir import LOG, RunDir
from vesselfast.pipeline.seeds import stream_seed
from vesselfast.pipeline.survey import run_survey
from vesselfast.pipeline.segmenter import predict_probs, train_segmenter

# What each kind of stage reads from the config (its identity, see identity.py). Keys that only the
# evaluation reads (data.target_test, data.builtin_test_n) or that change no result (rounds, ckpt_every,
# baselines, device) are in none of them.
DATA_READS = ("data.source", "data.target", "data.channel", "data.clahe", "data.source_scale", "data.crop",
              "data.pool", "data.builtin_n", "data.builtin_size", "data.crops_inside_fov")
GENERATOR_READS = ("generator.base_channels", "generator.channel_mult", "generator.num_res_blocks",
                   "generator.attention_levels", "generator.dropout", "generator.lr", "generator.batch_size",
                   "generator.ema_decay", "generator.precision", "diffusion.T", "diffusion.schedule")
SAMPLING_READS = ("diffusion.T", "diffusion.schedule", "diffusion.ddim_steps", "diffusion.t0_ratio", "diffusion.clip",
                  "synthesis.batch_size", "synthesis.eta", "synthesis.ddim_steps", "generator.precision",
                  "data.synth_crops")
SEGMENTER_READS = ("segmenter.channels", "segmenter.lr", "segmenter.batch_size", "segmenter.precision",
                   "segmenter.tile", "segmenter.stride", "segmenter.threshold", "data.clahe")
CALIBRATION_READS = ("segmenter.calibrate", "segmenter.estimate_cap")
TRAINING_SET_READS = ("segmenter.match_synthetic", "segmenter.source_mix", "segmenter.self_train")
SURVEY_READS = DATA_READS + SEGMENTER_READS + ("data.survey_steps", "data.survey_scales")


@dataclass
class Inputs:
    """Every image loaded, validated and preprocessed at its native size: what the survey and the stages
    start from (recomputed cheaply on every (re)start instead of stored)."""
    sources: Dict[str, List[Sample]]  # source folder (or "builtin") -> labelled samples at scale 1
    target_train: List[Sample]        # images only: labels never read
    target_test: List[Sample]         # with labels, for evaluation only


@dataclass
class Data:
    source_train: List[Sample]     # every source folder at its rescale factor
    target_train: List[Sample]
    target_test: List[Sample]
    src_images: torch.Tensor       # [pool, 1, c, c] source crops
    src_masks: torch.Tensor        # [pool, 1, c, c]
    tgt_images: torch.Tensor       # [pool, 1, c, c] target crops (no labels)
    factors: Dict[str, float]      # source folder -> rescale factor


def load_samples(paths: List[str], role: str, split: str, read_labels: bool, cfg: RunConfig,
                 scales: Optional[Sequence[float]] = None) -> List[Sample]:
    """One domain from its folders (or the built-in data), each folder at its factor in ``scales``."""
    d = cfg.data
    scales = list(scales) if scales is not None else [1.0] * len(paths)
    if paths == ["builtin"]:
        n = d.builtin_test_n if split == "test" else d.builtin_n
        return builtin_domain(role, split, n, d.builtin_size, cfg.seed, scale=scales[0])
    return load_domain(paths, role, split, read_labels, channel=d.channel, scale=scales, clahe=d.clahe)


def check_crop(samples: List[Sample], crop: int, where: str) -> None:
    """A crop larger than every image would be mostly padding: refuse it, naming the largest that fits."""
    sides = [min(s.image.shape) for s in samples]
    if sides and crop > max(sides):
        fits = max(sides) // 16 * 16
        raise UserError(f"data.crop={crop} is larger than every {where} image (the largest is "
                        f"{max(sides)} px on its short side); use --set data.crop={fits} or less")


def load_inputs(cfg: RunConfig) -> Inputs:
    d = cfg.data
    sources = {folder: load_samples([folder], "source", "train", True, cfg) for folder in d.source}
    target_train = load_samples([d.target], "target", "train", False, cfg)
    target_test = load_samples([d.target_test or d.target], "target", "test", True, cfg)
    if any(s.mask is not None for s in target_train):
        raise AssertionError("target training labels were read")  # load_domain must never do this
    check_crop([s for ss in sources.values() for s in ss], d.crop, f"source ({', '.join(d.source)})")
    check_crop(target_train, d.crop, f"target ({d.target})")
    return Inputs(sources, target_train, target_test)


def source_at(cfg: RunConfig, factors: Dict[str, float]) -> List[Sample]:
    """Every source folder rescaled by its factor (from the original files: the rescale comes first in
    the preprocessing), named as one combined domain."""
    folders = list(cfg.data.source)
    return load_samples(folders, "source", "train", True, cfg, [factors[f] for f in folders])


def build_data(cfg: RunConfig, inputs: Inputs, factors: Dict[str, float]) -> Data:
    d = cfg.data
    source_train = source_at(cfg, factors) if any(f != 1.0 for f in factors.values()) else \
        [s for folder in d.source for s in inputs.sources[folder]]
    check_crop(source_train, d.crop, f"source ({', '.join(d.source)}) after rescaling")
    src_images, src_masks, _ = random_crops(source_train, d.pool, d.crop,
                                            np.random.default_rng(stream_seed(cfg.seed, "source_crops")),
                                            inside_fov=d.crops_inside_fov)
    tgt_images, _, _ = random_crops(inputs.target_train, d.pool, d.crop,
                                    np.random.default_rng(stream_seed(cfg.seed, "target_crops")))
    return Data(source_train, inputs.target_train, inputs.target_test, torch.as_tensor(src_images),
                torch.as_tensor(src_masks), torch.as_tensor(tgt_images), dict(factors))


def describe(inputs: Inputs, cfg: RunConfig) -> str:
    n_src = sum(len(v) for v in inputs.sources.values())
    return (f"data: source {n_src} images ({', '.join(f'{k}: {len(v)}' for k, v in inputs.sources.items())}) -> "
            f"{cfg.data.pool} crops of {cfg.data.crop} px; target {len(inputs.target_train)} train images "
            f"(unlabelled), {len(inputs.target_test)} test images")


class Pipeline:
    def __init__(self, cfg: RunConfig, run: RunDir, inputs: Optional[Inputs] = None, reuse: Sequence[RunDir] = ()):
        self.cfg, self.run, self.reuse = cfg, run, list(reuse)
        self.cfg_dict = to_dict(cfg)
        self.identities: Dict[str, str] = {}
        self.inputs: Optional[Inputs] = inputs
        self.data: Optional[Data] = None
        self.device = dist.device(cfg.device)
        self.schedule = NoiseSchedule.make(cfg.diffusion.schedule, cfg.diffusion.T)
        self.t0 = t0_index(cfg.diffusion.t0_ratio, cfg.diffusion.ddim_steps)
        # metrics of earlier runs into this directory: evaluations already done are not repeated
        self.metrics: Dict[str, Dict] = dist.broadcast(dict(report.load_metrics(run).get("target_test", {})))
        self.diagnostics: Dict[str, Dict] = {}
        self._cap_logged = False

    # -- plumbing ---------------------------------------------------------------------------------
    def seed(self, name: str) -> int:
        """Seed of a stage's (or other consumer's) random stream: from the run seed and the name (seeds.py)."""
        return stream_seed(self.cfg.seed, name)

    def stage(self, name: str, compute: Callable[[], Dict], reads: Sequence[str] = (),
              inputs: Sequence[str] = ("data",)) -> Dict:
        """Result of a stage: loaded when finished before in this run directory, else taken from a
        ``--reuse`` directory that finished a stage of the same identity (the config values ``reads`` and
        the identities of the stages ``inputs``), else computed, saved and marked done.
        ``compute`` returns the tensors to keep plus an optional "_info" dict for stages.json."""
        identity = stage_identity(name, self.cfg_dict, reads, {n: self.identities[n] for n in inputs})
        self.identities[name] = identity
        if dist.broadcast(self.run.is_done(name, identity)):  # rank 0's view decides, for every rank
            result = self.run.load(name)
            testhooks.record_state(name, result)
            return result
        reused = dist.run_on_main(lambda: self._adopt(name, identity))
        dist.barrier()
        if reused:
            LOG.info(f"stage {name}: reused from {reused} (same identity {identity})")
            result = self.run.load(name)
            testhooks.record_state(name, result)
            return result
        testhooks.kill_point(f"{name}:start")
        LOG.info(f"stage {name}: start")
        t = time.perf_counter()
        result = compute()
        info = result.pop("_info", {})
        seconds = time.perf_counter() - t
        self.run.finish(name, result, {"seconds": round(seconds, 2), "identity": identity, **info})  # rank 0 only
        dist.barrier()  # the stage's files exist before any rank goes on
        LOG.info(f"stage {name}: done in {seconds:.1f} s")
        testhooks.record_state(name, result)
        return result

    def _adopt(self, name: str, identity: str) -> Optional[str]:
        for other in self.reuse:
            other_stage = other.find(identity)
            if other_stage is not None:
                self.run.adopt(name, other, other_stage)
                return str(other.root)
        return None

    def generator(self, state: Dict):
        model = generator_from_dict(state["arch"])
        model.load_state_dict(state["ema"])
        return model

    def segmenter(self, state: Dict) -> SegmenterUNet:
        return segmenter_from_state(state)

    def inference_meta(self) -> Dict:
        """What a saved segmenter needs to be used on its own (vesselfast segment, export)."""
        s = self.cfg.segmenter
        return {"preprocessing": preprocessing_spec("octa", clahe=self.cfg.data.clahe), "tile": s.tile,
                "stride": s.stride, "threshold": s.threshold}

    def _bar(self, total, desc):
        bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None if dist.is_main() else True)
        return bar, (lambda done: bar.update(done - bar.n))

    def map_images(self, fn: Callable[[np.ndarray], np.ndarray], images: List[np.ndarray], desc: str) -> List[np.ndarray]:
        """[fn(image) for image in images], each rank computing a contiguous share, gathered in order."""
        own = dist.shard(images)
        bar, progress = self._bar(len(own), desc)
        out = []
        for im in own:
            out.append(fn(im))
            progress(len(out))
        bar.close()
        return dist.gather(out)

    def model_probs(self, model: SegmenterUNet, images: List[np.ndarray], desc: str,
                    tta: bool = False) -> List[np.ndarray]:
        """Probability maps of a segmenter on ``images`` with the run's tiling and precision (sharded)."""
        s = self.cfg.segmenter
        return self.map_images(lambda im: predict_probs(model, im, s.tile, s.stride, self.device, s.precision, tta),
                               images, desc)

    # -- stages -----------------------------------------------------------------------------------
    def train_generator_stage(self, name: str, images, masks, steps_key: str, inputs: Sequence[str],
                              init: Optional[Dict] = None):
        """A generator stage: trained from scratch, or fine-tuned from ``init`` (the stage ``inputs[-1]``)."""
        g, seed = self.cfg.generator, self.seed(name)
        steps = getattr(g, steps_key)

        def compute():
            model = build_generator(g, seed)
            if init is not None:
                model.load_state_dict(init["model"])
            ema = train_generator(model, images, masks, steps, g, self.schedule, seed, self.device,
                                  self.run, name, self.cfg.ckpt_every, desc=name,
                                  ema_init=None if init is None else init["ema"])
            return {"arch": generator_arch(g), "model": model.state_dict(), "ema": ema.state_dict(),
                    "_info": {"steps": steps}}
        return self.stage(name, compute, GENERATOR_READS + (f"generator.{steps_key}",), inputs)

    def train_segmenter_stage(self, name: str, images, masks, steps_key: str, inputs: Sequence[str],
                              init: Optional[Dict] = None, calibrate: bool = False, reads: Sequence[str] = (),
                              measure_share: bool = False):
        """A segmenter stage on crops ``images`` / ``masks`` (made from the stages ``inputs``), fine-tuned
        from ``init`` when given; ``calibrate``: the label-free output calibration afterwards;
        ``measure_share``: keep the share of target training pixels it marks (``target_share``)."""
        s, seed = self.cfg.segmenter, self.seed(name)
        steps = getattr(s, steps_key)
        if calibrate and s.calibrate == "estimate":
            inputs = tuple(inputs) + ("baseline_histmatch",)

        def compute():
            model = self.segmenter(init) if init is not None else None
            model = train_segmenter(images, masks, steps, s.batch_size, s.lr, seed, self.device, s.precision,
                                    model=model, channels=s.channels, run=self.run, stage=name,
                                    ckpt_every=self.cfg.ckpt_every, desc=name)
            info = {"steps": steps}
            prior = self.vessel_prior() if calibrate else None
            if prior is not None:
                info.update(self.calibrate(model, prior, name))
            extra = {}
            if measure_share:
                extra["target_share"] = self.target_positive_share(model, name)
                info["target_share"] = round(extra["target_share"], 5)
                LOG.info(f"{name}: marks {100 * extra['target_share']:.2f}% of the target training pixels")
            return {"channels": list(s.channels), "model": model.state_dict(), **self.inference_meta(), **extra,
                    "_info": info}
        reads = SEGMENTER_READS + (f"segmenter.{steps_key}",) + tuple(reads) + (CALIBRATION_READS if calibrate else ())
        return self.stage(name, compute, reads, inputs)

    def vessel_prior(self) -> Optional[float]:
        """Expected vessel fraction for calibration (no target label): ``estimate``, the share of target
        training pixels that baseline_histmatch marks, at most the source's (``segmenter.estimate_cap``);
        ``source``, the source masks' vessel fraction inside the FOV; a number; or ``none``.

        Why the cap: a segmenter trained on one domain errs on the other mostly by marking vessel-like
        structure that the target's annotators leave out (OCTA's capillary mesh), so its share
        over-estimates far more than it under-estimates. On built-in data it marked 41% of the target
        against a true 11%, on OCTA-500 3M 5.5-6.2% against 6.8% (docs/PIPELINE.md)."""
        s = self.cfg.segmenter
        if s.calibrate == "none":
            return None
        if s.calibrate not in ("source", "estimate"):
            return float(s.calibrate)
        source = float(np.mean([x.mask[x.fov].mean() for x in self.data.source_train]))
        if s.calibrate == "source":
            return source
        estimate = float(self.target_share)
        if s.estimate_cap and estimate > source:
            if not self._cap_logged:
                LOG.info(f"calibration prior: baseline_histmatch marks {100 * estimate:.2f}% of the target, more "
                         f"than the source masks' {100 * source:.2f}%: capped there (segmenter.estimate_cap)")
                self._cap_logged = True
            return source
        return estimate

    def target_positive_share(self, model: SegmenterUNet, name: str) -> float:
        """Share of target training pixels a segmenter marks at the threshold (images only, no labels)."""
        probs = self.model_probs(model, [t.image for t in self.inputs.target_train], f"target share {name}")
        return float(np.mean([(p >= self.cfg.segmenter.threshold).mean() for p in probs]))

    # -- the survey: source rescale factors from the labelled source and the unlabelled target --------
    def survey_stage(self) -> Dict[str, float]:
        d = self.cfg.data
        if d.source_scale is not None:
            return {folder: float(d.source_scale) for folder in d.source}

        def compute():
            calibres = {folder: mean_calibre(s.mask for s in self.inputs.sources[folder]) for folder in d.source}
            res = run_survey(calibres, d.survey_scales, self._probe)
            LOG.info(f"survey: target calibre {res.target_calibre:.2f} px (source calibres "
                     + ", ".join(f"{k} {v:.2f}" for k, v in res.source_calibres.items()) + "); rescale factors "
                     + ", ".join(f"{k} {v:.3f}" for k, v in res.factors.items())
                     + f"; the probe marks {100 * res.target_share:.1f}% of the target pixels"
                     + (f" ({res.note})" if res.note else ""))
            info = {"source_calibres": {k: round(v, 4) for k, v in res.source_calibres.items()},
                    "target_calibre": round(res.target_calibre, 4), "target_share": round(res.target_share, 5),
                    "factors": {k: round(v, 4) for k, v in res.factors.items()}, "note": res.note}
            return {"factors": dict(res.factors), "_info": info}
        return dict(self.stage("survey", compute, SURVEY_READS, inputs=())["factors"])

    def _probe(self, factor_sets: Sequence[Dict[str, float]]):
        """Trains one probe on the source at every factor set (an equal share of the crop pool each),
        histogram-matched to target images, and returns the mean width and the share of what it marks on
        the target training images."""
        c, s = self.cfg, self.cfg.segmenter
        rng = np.random.default_rng(self.seed("survey_crops"))
        share = max(1, c.data.pool // len(factor_sets))
        crops = [random_crops(source_at(c, factors), share, c.data.crop, rng, inside_fov=c.data.crops_inside_fov)
                 for factors in factor_sets]
        images = torch.as_tensor(np.concatenate([im for im, _, _ in crops]))
        masks = torch.as_tensor(np.concatenate([m for _, m, _ in crops]))
        matched = histmatch_crops(images, [t.image for t in self.inputs.target_train], self.seed("survey_histmatch"))
        model = train_segmenter(matched, masks, c.data.survey_steps, s.batch_size, s.lr, self.seed("survey_probe"),
                                self.device, s.precision, channels=s.channels, desc="survey probe")
        probs = self.model_probs(model, [t.image for t in self.inputs.target_train], "survey")
        marked = [p >= s.threshold for p in probs]
        return mean_calibre(marked), float(np.mean([m.mean() for m in marked]))

    def calibrate(self, model: SegmenterUNet, prior: float, name: str) -> Dict:
        """Label-free calibration: shift the head's bias so that the share of target-training pixels whose
        probability reaches the threshold equals ``prior``. Self-training otherwise drifts: on OCTA-500 the
        uncalibrated F^0 marked 28% of pixels as vessel (capillaries included) and every round's
        pseudo-labels taught the next generator the same (docs/PIPELINE.md)."""
        s = self.cfg.segmenter
        probs = self.model_probs(model, [t.image for t in self.data.target_train], f"calibrate {name}")
        p = np.clip(np.concatenate([q.ravel() for q in probs]).astype(np.float64), 1e-7, 1 - 1e-7)
        logits = np.log(p) - np.log1p(-p)
        before = float((p >= s.threshold).mean())
        shift = math.log(s.threshold / (1 - s.threshold)) - float(np.quantile(logits, 1.0 - prior))
        with torch.no_grad():
            model.head.bias += shift
        LOG.info(f"{name}: calibrated to vessel fraction {prior:.4f} (was {before:.4f}); logit shift {shift:+.3f}")
        return {"calibration_prior": round(prior, 5), "fraction_before": round(before, 5), "logit_shift": round(shift, 4)}

    def synthesize_stage(self, name: str, gen_state: Dict, sampler_key: str, latents, conditional: bool,
                         inputs: Sequence[str]):
        c, syn, seed = self.cfg, self.cfg.synthesis, self.seed(name)
        sampler = getattr(syn, sampler_key)
        masks = self.data.src_masks[: c.data.synth_crops]

        def compute():
            eps_model = EpsModel(self.generator(gen_state), c.generator.precision, self.device)
            bar, progress = self._bar(dist.own_rows(masks.shape[0], syn.batch_size), name)

            def own_batches(batches):
                return synthesize(eps_model, sampler, masks, latents, self.schedule, c.diffusion.ddim_steps, self.t0,
                                  syn.ddim_steps, syn.batch_size, seed, conditional, c.diffusion.clip, syn.eta,
                                  progress, batches=batches)
            images = dist.gather_tensor_batches(own_batches, masks.shape[0], syn.batch_size)
            bar.close()
            per_image = evals_per_image(sampler, self.schedule, c.diffusion.ddim_steps, self.t0, syn.ddim_steps)
            evals = dist.total(eps_model.evals)
            assert evals == per_image * masks.shape[0]
            return {"images": images, "_info": {"sampler": sampler, "unet_evals_per_image": per_image,
                                                "unet_evals": evals}}
        return self.stage(name, compute, SAMPLING_READS + (f"synthesis.{sampler_key}",), inputs)

    def predict(self, seg_state: Dict, images: List[np.ndarray], desc: str, tta: bool = False) -> List[np.ndarray]:
        """Probability maps of a saved segmenter; ``tta``: averaged over the 8 flips and 90-degree rotations."""
        return self.model_probs(self.segmenter(seg_state), images, desc, tta)

    def training_set(self, name: str, synth_images: torch.Tensor, synth_masks: torch.Tensor,
                     matched_source: torch.Tensor, pseudo: Optional[Dict] = None):
        """What F^k trains on: the synthetic pairs (histogram-matched to target images when
        ``segmenter.match_synthetic``), plus, as shares of the whole set, histogram-matched source crops
        (``segmenter.source_mix``) and real target crops with the round's pseudo-labels
        (``segmenter.self_train``, rounds only)."""
        s, d = self.cfg.segmenter, self.data
        images, masks = synth_images, synth_masks
        if s.match_synthetic:
            images = histmatch_crops(images, [t.image for t in d.target_train], self.seed(f"{name}_match"))
        parts = [(images, masks)]
        rng = np.random.default_rng(self.seed(f"{name}_mix"))
        extra = [(s.source_mix, matched_source, d.src_masks)]
        if pseudo is not None:
            extra.append((s.self_train, pseudo["images"], pseudo["masks"]))
        total = 1.0 - sum(share for share, _, _ in extra)
        for share, pool_images, pool_masks in extra:
            n = int(round(share / total * images.shape[0]))
            if n > 0:
                idx = torch.as_tensor(rng.choice(pool_images.shape[0], size=n, replace=n > pool_images.shape[0]))
                parts.append((pool_images[idx], pool_masks[idx]))
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def evaluate_on(self, seg_state: Dict, test: List[Sample], desc: str):
        """(summary with per-image metrics, probability maps) of a segmenter on labelled test samples."""
        probs = self.predict(seg_state, [s.image for s in test], desc)
        res = evaluate_images(probs, [s.mask for s in test], [s.fov for s in test], self.cfg.segmenter.threshold)
        summary = {k: v for k, v in res.items() if k != "per_image"}
        summary["per_image"] = {s.name: r for s, r in zip(test, res["per_image"])}
        return summary, probs

    def diagnose(self, key: str, images: torch.Tensor, pseudo_stage: Optional[str] = None) -> None:
        """The paper's diagnostics for the images a segmenter is trained on: the intensity-histogram
        distance to the real target training crops, and the pseudo-labels' positive share (no labels)."""
        entry = histogram_distance(images.numpy(), self.data.tgt_images.numpy())
        if pseudo_stage is not None:
            entry["pseudo_label_share"] = self.run.stages()[pseudo_stage]["vessel_fraction"]
        self.diagnostics[key] = entry

    def evaluate(self, key: str, seg_state: Dict) -> Dict:
        """Metrics on the target test split: the only place target labels are used."""
        if key in self.metrics:
            return self.metrics[key]
        test = self.data.target_test
        summary, probs = self.evaluate_on(seg_state, test, f"eval {key}")
        self.metrics[key] = summary
        if self.run.writer:  # the picture first: a kill between the two redoes this evaluation
            report.save_prediction_grid(self.run, key, test, probs)
            report.save_metrics(self.run, self.metrics, self.diagnostics)
        LOG.info(f"{key}: DSC {summary['dsc']:.4f} (std {summary['dsc_std']:.4f})  AUC {summary['auc']:.4f}  "
                 f"ACC {summary['acc']:.4f}  AHD {summary['ahd']:.2f} px  ({summary['n_images']} test images)")
        return summary

    # -- the method -------------------------------------------------------------------------------
    def run_all(self) -> Dict:
        c = self.cfg
        if self.inputs is None:
            self.inputs = load_inputs(c)
        factors = self.survey_stage()
        self.data = build_data(c, self.inputs, factors)
        self.identities["data"] = stage_identity("data", self.cfg_dict, DATA_READS,
                                                 {"survey": self.identities.get("survey", "fixed scale")})
        d = self.data
        syn_masks = d.src_masks[: c.data.synth_crops]
        syn_src = d.src_images[: c.data.synth_crops]

        # 0. baselines (same segmenter budget as F^0); baseline_histmatch also measures the share of target
        # pixels a source-trained segmenter marks, the label-free vessel-fraction estimate for calibration
        matched = histmatch_crops(d.src_images, [s.image for s in d.target_train], self.seed("histmatch"))
        hm = self.train_segmenter_stage("baseline_histmatch", matched, d.src_masks, "steps_iter0", ("data",),
                                        measure_share=True)
        self.target_share = float(hm["target_share"])
        if c.baselines:
            self.evaluate("baseline_histmatch", hm)
            b = self.train_segmenter_stage("baseline", d.src_images, d.src_masks, "steps_iter0", ("data",))
            self.evaluate("baseline", b)

        # 1. generators
        g_s = self.train_generator_stage("pretrain_source", d.src_images, d.src_masks, "steps_source", ("data",))
        g_t = self.train_generator_stage("pretrain_target", d.tgt_images, None, "steps_target", ("data",))

        # 2. latent similarity mining
        def do_invert():
            eps_model = EpsModel(self.generator(g_s), c.generator.precision, self.device)
            bar, progress = self._bar(dist.own_rows(syn_src.shape[0], c.synthesis.batch_size), "invert")
            latents = dist.gather_tensor_batches(
                lambda batches: invert(eps_model, syn_src, syn_masks, self.schedule, c.diffusion.ddim_steps, self.t0,
                                       c.synthesis.batch_size, c.diffusion.clip, progress, batches=batches),
                syn_src.shape[0], c.synthesis.batch_size)
            bar.close()
            return {"latents": latents, "_info": {"t0_steps": self.t0, "unet_evals_per_image": self.t0,
                                                  "unet_evals": dist.total(eps_model.evals)}}
        latents = self.stage("invert", do_invert, SAMPLING_READS, ("data", "pretrain_source"))["latents"]

        # 3.-4. iter 0
        synth = self.synthesize_stage("synthesize_0", g_t, "sampler_iter0", latents, False,
                                      ("data", "pretrain_target", "invert"))
        self.diagnose("source", d.src_images)
        self.diagnose("iter0", synth["images"])
        images, masks = self.training_set("segmenter_0", synth["images"], syn_masks, matched)
        f = self.train_segmenter_stage("segmenter_0", images, masks, "steps_iter0", ("data", "synthesize_0"),
                                       calibrate=True, reads=TRAINING_SET_READS)
        if self.run.writer:
            report.save_round_grid(self.run, 0, syn_src, latents, synth["images"], syn_masks, None, None)
        self.evaluate("iter0", f)

        # 5. co-optimisation rounds
        g_name, f_name = "pretrain_target", "segmenter_0"
        labeller, labeller_name = f, f_name
        if c.segmenter.first_labels == "baseline_histmatch":  # the cheap anchor labels round 1
            labeller, labeller_name = hm, "baseline_histmatch"
        for k in range(1, c.rounds + 1):
            def pseudo_label(f_prev=labeller, name=f"pseudo_label_{k}"):
                probs = self.predict(f_prev, [s.image for s in d.target_train], f"pseudo-label {k}",
                                     tta=c.segmenter.pseudo_tta)
                labels = [(p >= c.segmenter.threshold).astype(np.uint8) for p in probs]
                crops, masks, _ = random_crops(
                    [Sample(s.name, s.image, lab, s.fov, s.source_path) for s, lab in zip(d.target_train, labels)],
                    c.data.pool, c.data.crop, np.random.default_rng(self.seed(name)))
                return {"images": torch.as_tensor(crops), "masks": torch.as_tensor(masks),
                        "_info": {"vessel_fraction": float(np.mean([lab.mean() for lab in labels]))}}
            pseudo = self.stage(f"pseudo_label_{k}", pseudo_label, SEGMENTER_READS + ("segmenter.pseudo_tta",),
                                ("data", labeller_name))
            g_t = self.train_generator_stage(f"target_generator_{k}", pseudo["images"], pseudo["masks"], "steps_round",
                                             (f"pseudo_label_{k}", g_name), init=g_t)
            synth = self.synthesize_stage(f"synthesize_{k}", g_t, "sampler", latents, True,
                                          ("data", f"target_generator_{k}", "invert"))
            self.diagnose(f"iter{k}", synth["images"], f"pseudo_label_{k}")
            finetune = c.segmenter.finetune
            images, masks = self.training_set(f"segmenter_{k}", synth["images"], syn_masks, matched, pseudo)
            f = self.train_segmenter_stage(f"segmenter_{k}", images, masks, "steps_round",
                                           ("data", f"synthesize_{k}", f"pseudo_label_{k}")
                                           + ((f_name,) if finetune else ()),
                                           init=f if finetune else None, calibrate=True,
                                           reads=("segmenter.finetune",) + TRAINING_SET_READS)
            g_name, f_name = f"target_generator_{k}", f"segmenter_{k}"
            labeller, labeller_name = f, f_name
            if self.run.writer:
                report.save_round_grid(self.run, k, syn_src, latents, synth["images"], syn_masks, pseudo["images"],
                                       pseudo["masks"])
            self.evaluate(f"iter{k}", f)

        if self.run.writer:
            report.write_all(self.run, self.cfg, self.metrics, self.diagnostics)
        dist.barrier()
        testhooks.write_state_hashes(dist.rank())
        return self.metrics


SEGMENTER_STAGES = ("baseline", "baseline_histmatch", "segmenter_")


def metric_key(stage: str) -> str:
    """Stage name of a segmenter -> its key in metrics.json (segmenter_k -> iterk)."""
    return "iter" + stage.split("_")[1] if stage.startswith("segmenter_") else stage


def evaluate_run(run_dir: str, target_test: Optional[str] = None, precision: str = "auto") -> Dict[str, Dict]:
    """Re-evaluates every saved segmenter of a run on a target test set (the run's, or ``target_test``),
    with inference in ``precision`` (auto: what this machine runs natively)."""
    from vesselfast.hardware import option_precision
    from vesselfast.pipeline.config import from_dict
    import yaml

    run = RunDir(run_dir)
    cfg_path = run.root / "config.yaml"
    if not cfg_path.exists():
        raise UserError(f"--run {run_dir}: no config.yaml there; point --run at a directory made by vesselfast train")
    cfg = from_dict(yaml.safe_load(cfg_path.read_text()))
    if target_test:
        cfg.data.target_test = target_test
    cfg.segmenter.precision, warning = option_precision(precision, dist.device(cfg.device))
    if warning:
        LOG.warning(warning)
    pipe = Pipeline(cfg, run)
    test = load_samples([cfg.data.target_test or cfg.data.target], "target", "test", True, cfg)
    out = {}
    for stage in run.stages():
        if stage.startswith(SEGMENTER_STAGES) and run.is_done(stage):
            out[metric_key(stage)], _ = pipe.evaluate_on(run.load(stage), test, f"eval {stage}")
    return out


def open_reuse(paths: Sequence[str], out: str) -> List[RunDir]:
    """Run directories to take finished stages from (read-only); each must hold a vesselfast run."""
    dirs = []
    for p in paths:
        other = RunDir(p, writer=False)
        if not (other.root / "stages.json").is_file():
            raise UserError(f"--reuse {p}: no stages.json there; point it at a run directory made by vesselfast train")
        if other.root.resolve() == RunDir(out).root.resolve():
            raise UserError(f"--reuse {p}: is the run directory itself (--out); a re-run resumes it anyway")
        dirs.append(other)
    return dirs


def run_pipeline(cfg: RunConfig, out: str, reuse: Sequence[str] = ()) -> Dict:
    """Runs (or resumes) the method into ``out``; returns the target-test metrics per stage. Stages
    finished with the same identity in a ``reuse`` run directory are taken from there.
    Everything that can be refused (options, data, batch split) is checked before the run directory
    is touched, so bad input leaves nothing behind."""
    dist.per_rank_batch(cfg.generator.batch_size, "generator.batch_size")
    dist.per_rank_batch(cfg.segmenter.batch_size, "segmenter.batch_size")
    reuse_dirs = open_reuse(reuse, out)
    inputs = load_inputs(cfg)
    run = RunDir(out, writer=dist.is_main())
    precision, precision_warning = settle_precision(cfg, dist.broadcast(run.saved_config()))
    resuming = dist.run_on_main(lambda: run.open(dump(cfg)))
    if not run.writer:
        run.mute_log()
    try:
        from vesselfast import allocator

        where = f", {dist.world()} processes ({'nccl' if cfg.device.startswith('cuda') else 'gloo'})" \
            if dist.is_distributed() else ""
        LOG.info(f"{'resuming' if resuming else 'starting'} run in {out} (preset {cfg.preset}, device {cfg.device}"
                 f"{where}, allocator {allocator.current()}, {precision})")
        if precision_warning:
            LOG.warning(precision_warning)
        LOG.info(describe(inputs, cfg))
        if reuse_dirs:
            LOG.info(f"reusing finished stages of the same identity from {', '.join(str(r.root) for r in reuse_dirs)}")
        return Pipeline(cfg, run, inputs, reuse_dirs).run_all()
    finally:
        run.close()

"""Run configuration: one schema (nested dataclasses), presets, YAML files and ``--set key=value``.

Each key's type and range are declared with it (``option(...)``, vesselfast/schema.py); every key is
converted and checked before any stage runs, then :func:`validate` checks what relates keys.

Every stage has an explicit step budget here. The resolved config is saved as ``DIR/config.yaml`` and
re-read on resume; a different config for an existing run directory is refused (start a new one).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import yaml

from vesselfast.data.preprocess import CHANNELS
from vesselfast.diffusion.samplers import LATENT_SAMPLERS, SAMPLERS
from vesselfast.diffusion.schedule import SCHEDULES
from vesselfast.errors import UserError
from vesselfast.hardware import PRECISIONS
from vesselfast.models.generator import GeneratorArch
from vesselfast.schema import check, coerce, field_types, option

# Keys that were renamed or removed: a config (file, --set, an older run's config.yaml) that still uses
# one is refused with this line.
RETIRED_KEYS = {
    "synthesis.ddim_steps": "was renamed synthesis.noise_steps (the ddim_noise sampler's steps; "
                            "diffusion.ddim_steps is the inversion's grid)",
    "segmenter.calibrate": "was renamed segmenter.vessel_prior (estimate | source | none | a fraction)",
    "segmenter.self_train": "was removed: real target crops in the training set lost its ablation "
                            "(docs/PIPELINE.md, e04)",
    "segmenter.pseudo_tta": "was removed: flip/rotation-averaged pseudo-labels lost its ablation "
                            "(docs/PIPELINE.md, e07)",
    "segmenter.match_synthetic": "was removed (never measured)",
    "segmenter.first_labels": "was removed (never measured): round 1 is labelled by F^0, as in the paper",
    "data.crops_inside_fov": "was removed (never measured)",
    "segmenter.estimator": "was removed: vessel_prior=estimate calibrates to baseline_histmatch's mean "
                           "probability on the target training images; its marked share lost the ablation "
                           "(docs/PIPELINE.md, e08)",
}


@dataclass
class DataConfig:
    source: List[str] = option(factory=lambda: ["builtin"], nonempty=True,  # folders, or "builtin"
                               what="folders (or builtin)")
    target: str = "builtin"               # target training images (labels never read)
    target_test: Optional[str] = None     # default: the target folder's test split
    channel: str = option("green", choices=CHANNELS)  # fundus -> one channel: green | luminance
    clahe: bool = True
    # Source rescale: None estimates each folder's factor from its labels and the unlabelled target
    # images (the survey, vesselfast/pipeline/survey.py); a number fixes it for every source folder.
    source_scale: Optional[float] = option(None, gt=0.0, hint=" (or null: estimated by the survey)")
    survey_steps: int = option(600, ge=1)  # training steps of the survey's probe
    # source scales (relative to the common calibre) the probe sees at once, so that it is scale-agnostic
    survey_scales: List[float] = option(factory=lambda: [0.5, 0.71, 1.0, 1.41, 2.0], nonempty=True, gt=0.0,
                                        what="factors", hint=", e.g. [0.5, 1.0, 2.0]")
    # Target training images every label-free inference sees (the survey's probe, the vessel-fraction
    # estimate, calibration, pseudo-labels): a fixed random sample of at most this many, so those stages
    # cost the same for any target size (their sampling error is logged); all of them when fewer. The
    # generators train on crops of every image. (pipeline/sampling.py)
    target_sample: int = option(200, ge=2)
    crop: int = option(64, ge=16)         # crop size for every stage
    pool: int = option(512, ge=1)         # crops cut once per domain for training (half vessel-centred)
    synth_crops: int = option(200, ge=1)  # source crops inverted and re-synthesised as target images
    builtin_n: int = option(24, ge=1)     # built-in data: images per split
    builtin_size: int = option(256, ge=32)
    builtin_test_n: int = option(12, ge=1)


@dataclass
class DiffusionConfig:
    T: int = option(1000, ge=10, hint=" (paper: 1000)")
    schedule: str = option("linear", choices=SCHEDULES)
    ddim_steps: int = option(50, ge=2)    # N, the DDIM grid of the inversion and of the latent samplers
    # t0_steps = round(t0_ratio * N) inversion steps (paper: 15 of 50 -> timestep 300)
    t0_ratio: float = option(0.3, gt=0.0, le=1.0, hint=" (paper: 0.3)")
    clip: bool = True


@dataclass
class GeneratorTrainConfig(GeneratorArch):
    # the architecture fields (base_channels, channel_mult, num_res_blocks, attention_levels, dropout),
    # their defaults and ranges come from models.generator.GeneratorArch
    lr: float = option(2e-4, gt=0.0)
    batch_size: int = option(8, ge=1)
    steps_source: int = option(1000, ge=1)  # G_S
    steps_target: int = option(1000, ge=1)  # G_T^0
    steps_round: int = option(300, ge=1)    # G_T^k, k >= 1, fine-tuned from G_T^{k-1}
    ema_decay: float = option(0.995, ge=0.0, lt=1.0)
    # auto | fp32 | bf16 | fp16 (GPU). auto: bf16 where the hardware runs it natively, else fp32 on CPU
    # (fp16 with gradient scaling on GPUs without bf16); written resolved into the run's config.yaml.
    precision: str = option("auto", choices=PRECISIONS)


@dataclass
class SynthesisConfig:
    # Rounds k >= 1: see vesselfast/diffusion/samplers.py. ddim_noise (DDIM from noise, conditioned on the
    # source masks) beat ddim_latent on real data (docs/PIPELINE.md, ablation); the reference code used ddpm_noise.
    sampler: str = option("ddim_noise", choices=SAMPLERS)
    # iter-0 synthesis from the inversion latents: ddim_latent | ddpm_latent
    sampler_iter0: str = option("ddim_latent", choices=LATENT_SAMPLERS,
                                hint=" (Iter-0 starts from the inversion latents)")
    noise_steps: int = option(50, ge=1)  # DDIM steps of the ddim_noise sampler
    batch_size: int = option(16, ge=1)
    eta: float = option(0.0, ge=0.0, le=1.0)  # DDIM's eta (ddim_latent, ddim_noise): 0 deterministic, 1 DDPM-like


@dataclass
class SegmenterConfig:
    channels: List[int] = option(factory=lambda: [16, 32, 64, 128, 256], nonempty=True, ge=1,
                                 what="channel counts", hint=", e.g. [16, 32, 64]")
    lr: float = option(1e-3, gt=0.0)
    batch_size: int = option(8, ge=1)
    steps_iter0: int = option(500, ge=1)
    steps_round: int = option(100, ge=1)
    finetune: bool = True          # F^k starts from F^{k-1} (False: fresh)
    # as generator.precision; also the segmenter's inference in the run
    precision: str = option("auto", choices=PRECISIONS)
    tile: int = option(128, ge=16)
    stride: int = option(64, ge=1)
    threshold: float = option(0.5, gt=0.0, lt=1.0)  # on the vessel probability
    # Label-free calibration of F^k: shift the output bias so that the marked share of the target
    # training pixels (at or above `threshold`) equals a vessel-fraction prior. "estimate": the share
    # baseline_histmatch marks (measured per run, no label read); "source": the source masks' vessel
    # fraction inside the FOV; "none": no calibration; or a number in (0, 1) (pipeline/calibration.py).
    vessel_prior: str = "estimate"
    estimate_cap: bool = True      # "estimate" is at most the source masks' vessel fraction
    # Share of F^k's training set made of histogram-matched source crops besides the synthetic pairs:
    # 0.25 beat 0.0 on real data (docs/PIPELINE.md, ablation).
    source_mix: float = option(0.25, ge=0.0, lt=1.0, hint=" (the rest are the synthetic pairs)")


@dataclass
class RunConfig:
    preset: str = option("quick", choices=lambda: PRESETS)
    seed: int = option(0, ge=0)
    device: str = "cpu"            # cpu | cuda | cuda:N (validate)
    rounds: int = option(3, ge=0)
    ckpt_every: int = option(200, ge=1)  # steps between in-stage checkpoints
    # Train and evaluate the baselines: baseline, baseline_histmatch (the anchor) and baseline_selftrain (the
    # rounds on pseudo-labelled real target crops, no generator). With false, baseline_histmatch is
    # still trained when segmenter.vessel_prior=estimate needs its marked share, but it is not evaluated.
    baselines: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    generator: GeneratorTrainConfig = field(default_factory=GeneratorTrainConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)


PRESETS: Dict[str, Dict[str, Any]] = {
    # CI: the whole pipeline in seconds; numbers mean nothing.
    "tiny": {
        "rounds": 1, "ckpt_every": 10,
        "data": {"crop": 32, "pool": 32, "synth_crops": 16, "builtin_n": 4, "builtin_size": 96, "builtin_test_n": 2,
                 "survey_steps": 12},
        "diffusion": {"T": 100, "ddim_steps": 10},
        "generator": {"base_channels": 8, "channel_mult": [1, 2], "steps_source": 12, "steps_target": 12,
                      "steps_round": 6, "batch_size": 4},
        "synthesis": {"batch_size": 16, "noise_steps": 5},
        "segmenter": {"channels": [8, 16, 32], "steps_iter0": 12, "steps_round": 6, "batch_size": 4, "tile": 64,
                      "stride": 32},
    },
    # Built-in synthetic data on a 2-core CPU in under 10 minutes with native bf16, under 20 in fp32 on an
    # AVX2-only CPU (docs/PIPELINE.md): a shorter survey, 25-step ddim_noise synthesis in the rounds and a
    # generator of base 16 (a step 2.3x cheaper than base 32) trained 1,250 / 375 steps: the final DSC of
    # seeds 0-1 0.751 against base 32's 0.753 at 850 / 250 steps, 9 min 29 s instead of 13 min 46 s on a Zen 4.
    "quick": {"data": {"survey_steps": 300}, "synthesis": {"noise_steps": 25},
              "generator": {"base_channels": 16, "steps_source": 1250, "steps_target": 1250, "steps_round": 375}},
    # Fundus (DRIVE + CHASE_DB1) -> OCTA-500 3M on a 2-core CPU in under 40 minutes. Inversion to timestep
    # 100 (5 of 50 DDIM steps) instead of the paper's 300: with this small generator F^0 lies above the
    # histogram-matching anchor on three seeds of three on OCTA-500 3M and on a thinner-vessel target, where
    # timestep 200 left it 0.11 below (ablations e11, e23, docs/PIPELINE.md). Two rounds with
    # 800 segmenter steps each: the final DSC of three rounds of 400 (e11) was 0.867 on seeds 0-1; two of
    # 800 (e15) 0.872, three of 800 (e14) the same at +210 s, four of 400 (e13) lower. Pretrained
    # generators of 1,500 steps (e17): the final 0.875 on three seeds against 2,500 steps' 0.873, 18 % less time.
    "real-cpu": {
        "rounds": 2,
        "data": {"pool": 1024, "synth_crops": 320},
        "diffusion": {"t0_ratio": 0.1},
        "generator": {"steps_source": 1500, "steps_target": 1500, "steps_round": 600},
        "segmenter": {"steps_iter0": 1500, "steps_round": 800},
    },
    # A few minutes on one GPU (H200-class): DRIVE + CHASE_DB1 -> OCTA-500 3M with 128 px crops, a wider
    # generator and bigger batches (scripts/device_check.sh runs it; docs/GPU.md).
    "gpu-short": {
        "device": "cuda", "rounds": 2, "ckpt_every": 500,
        "data": {"crop": 128, "pool": 2048, "synth_crops": 512, "survey_steps": 400},
        "generator": {"base_channels": 64, "channel_mult": [1, 2, 2, 4], "num_res_blocks": 1, "batch_size": 32,
                      "steps_source": 1500, "steps_target": 1500, "steps_round": 400},
        "synthesis": {"batch_size": 128},
        "segmenter": {"steps_iter0": 1500, "steps_round": 400, "batch_size": 32, "tile": 256, "stride": 128},
    },
    # The paper's settings, for GPUs.
    "paper": {
        "device": "cuda", "rounds": 6, "ckpt_every": 1000,
        "data": {"crop": 256, "pool": 4096, "synth_crops": 2000},
        "diffusion": {"T": 1000, "ddim_steps": 50, "t0_ratio": 0.3},
        "generator": {"base_channels": 64, "channel_mult": [1, 1, 2, 2, 4, 4], "num_res_blocks": 2,
                      "attention_levels": [4], "lr": 1e-4, "batch_size": 8, "steps_source": 100000,
                      "steps_target": 100000, "steps_round": 20000, "ema_decay": 0.9999},
        "synthesis": {"sampler": "ddpm_noise", "sampler_iter0": "ddpm_latent"},
        "segmenter": {"steps_iter0": 20000, "steps_round": 5000, "batch_size": 8, "tile": 256, "stride": 128},
    },
}


def _merge(dc, updates: Dict[str, Any], where: str):
    """Apply a nested dict onto a dataclass instance, each value converted to its key's declared type."""
    fields = {f.name: f for f in dataclasses.fields(dc)}
    types = field_types(type(dc))
    for key, value in updates.items():
        name = f"{where}{key}"
        if name in RETIRED_KEYS:
            raise UserError(f"config key {name!r} {RETIRED_KEYS[name]}")
        if key not in fields:
            raise UserError(f"unknown config key {name!r}; known: {', '.join(sorted(fields))}")
        current = getattr(dc, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UserError(f"config key {name!r} is a section; give it a mapping")
            _merge(current, value, name + ".")
        else:
            setattr(dc, key, coerce(value, types[key], name))


PRECISION_KEYS = ("generator.precision", "segmenter.precision")


def _parse_set(item: str):
    if "=" not in item:
        raise UserError(f"--set {item!r}: write key=value, e.g. --set generator.steps_source=2000")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw else ""
    nested: Dict[str, Any] = {}
    node = nested
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return nested


def validate(cfg: RunConfig) -> None:
    """Every key against the range declared with it (vesselfast/schema.py), in the order of the schema,
    then what relates keys to each other; each message names the key and what to use."""
    check(cfg)

    def bad(msg):
        raise UserError(msg)
    d = cfg.diffusion
    if d.schedule == "linear" and d.T <= 20:
        bad(f"diffusion.T={d.T} is too small for the linear schedule (its largest beta, 0.02 * 1000 / T, must "
            "stay below 1); use diffusion.T >= 21 (paper: 1000) or diffusion.schedule=cosine")
    if d.ddim_steps > d.T:
        bad(f"diffusion.ddim_steps={d.ddim_steps} must be in [2, diffusion.T={d.T}]")
    if cfg.synthesis.noise_steps > d.T:
        bad(f"synthesis.noise_steps={cfg.synthesis.noise_steps} must be in [1, diffusion.T={d.T}]")
    g = cfg.generator
    levels = [v for v in g.attention_levels if v >= len(g.channel_mult)]
    if levels:
        bad(f"generator.attention_levels={list(g.attention_levels)}: level {levels[0]} does not exist; use indices "
            f"into generator.channel_mult (0 to {len(g.channel_mult) - 1})")
    div = 2 ** (len(g.channel_mult) - 1)
    if cfg.data.crop % max(div, 16):
        bad(f"data.crop={cfg.data.crop} must be a multiple of {max(div, 16)} and >= 16")
    s = cfg.segmenter
    seg_multiple = 2 ** (len(s.channels) - 1)  # SegmenterUNet.size_multiple: one factor 2 per pooling
    if cfg.data.crop < seg_multiple:
        bad(f"data.crop={cfg.data.crop} is smaller than the segmenter's {len(s.channels)} levels need "
            f"({seg_multiple} px); use a larger crop or fewer segmenter.channels")
    if s.tile % seg_multiple:
        bad(f"segmenter.tile={s.tile} must be a multiple of {seg_multiple} (one factor 2 per level of "
            f"segmenter.channels), e.g. {max(16, s.tile // seg_multiple * seg_multiple)}")
    if s.stride > s.tile:
        bad(f"segmenter.stride={s.stride} must be in [1, segmenter.tile={s.tile}]")
    for name in PRECISION_KEYS:
        sec, key = name.split(".")
        if getattr(getattr(cfg, sec), key) == "fp16" and not cfg.device.startswith("cuda"):
            bad(f"{name}=fp16 needs a GPU (device={cfg.device}); use auto or bf16 on CPU")
    prior = s.vessel_prior
    if prior not in ("source", "none", "estimate"):
        try:
            ok = 0.0 < float(prior) < 1.0
        except ValueError:
            ok = False
        if not ok:
            bad(f"segmenter.vessel_prior={prior!r}: use estimate, source, none, or a vessel fraction in (0, 1)")
    if cfg.device not in ("cpu", "cuda") and not cfg.device.startswith("cuda:"):
        bad(f"device={cfg.device!r}: use cpu or cuda")


def resolve(preset: Optional[str] = None, file: Optional[str] = None, sets: Optional[List[str]] = None,
            overrides: Optional[Dict[str, Any]] = None) -> RunConfig:
    """Preset, then the YAML file, then explicit overrides (CLI flags), then ``--set`` items."""
    cfg = RunConfig()
    file_dict: Dict[str, Any] = {}
    if file:
        try:
            with open(file) as fh:
                file_dict = yaml.safe_load(fh) or {}
        except OSError as exc:
            raise UserError(f"--config {file}: cannot read ({exc.strerror})")
        except yaml.YAMLError as exc:
            raise UserError(f"--config {file}: not valid YAML ({str(exc).splitlines()[0]})")
        if not isinstance(file_dict, dict):
            raise UserError(f"--config {file}: expected a mapping of config keys")
    preset = preset or file_dict.get("preset") or "quick"
    if preset not in PRESETS:
        raise UserError(f"--preset {preset!r}: choose one of {', '.join(PRESETS)}")
    _merge(cfg, PRESETS[preset], "")
    cfg.preset = preset
    _merge(cfg, {k: v for k, v in file_dict.items() if k != "preset"}, "")
    _merge(cfg, overrides or {}, "")
    for item in sets or []:
        _merge(cfg, _parse_set(item), "")
    validate(cfg)
    return cfg


def settle_precision(cfg: RunConfig, saved: Optional[Dict[str, Any]] = None) -> Tuple[str, Optional[str]]:
    """Replaces every precision ``auto`` in ``cfg`` by a concrete one, so config.yaml records what ran:
    resuming (``saved``: the run directory's config), the precision the run started with, on any
    machine; else what this machine runs natively (vesselfast.hardware). Returns (a description for the
    run's first log line, one warning line when bf16 would run emulated on this CPU, else None)."""
    from vesselfast.hardware import emulation_warning, resolve_precision

    reasons, kept = [], []
    for name in PRECISION_KEYS:
        sec, key = name.split(".")
        section = getattr(cfg, sec)
        why = "set explicitly"
        if section.precision == "auto":
            old = ((saved or {}).get(sec) or {}).get(key)
            if old in PRECISIONS and old != "auto":
                section.precision, why = old, "kept from the run's start"
                kept.append(name)
            else:
                section.precision, why = resolve_precision("auto", cfg.device)
        if why not in reasons:
            reasons.append(why)
    text = (f"precision generator {cfg.generator.precision}, segmenter {cfg.segmenter.precision} "
            f"({'; '.join(reasons)})")
    warning = emulation_warning(cfg.device, {n: getattr(cfg, n.split('.')[0]).precision for n in PRECISION_KEYS})
    if warning and kept:
        warning += f"; this run started elsewhere with {', '.join(kept)} bf16 and keeps it (a new --out would use fp32)"
    return text, warning


def to_dict(cfg: RunConfig) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(d: Dict[str, Any]) -> RunConfig:
    cfg = RunConfig()
    _merge(cfg, d, "")
    validate(cfg)
    return cfg


def dump(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)

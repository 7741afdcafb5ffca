"""What the stages start from: every image loaded, validated and preprocessed (:class:`Inputs`, before
anything is trained), then the crop pools cut at the survey's rescale factors (:class:`Data`).

Target training images are loaded without their labels: :func:`load_inputs` asserts that none was read,
and refuses a target that is a source folder, or holds a source image (its label would reach training
through the source). A target that looks like colour fundus, or a source that looks like OCTA, is only
warned about (:func:`domain_warnings`): fundus -> fundus adaptation is a use the user may intend.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from vesselfast.data import Sample, builtin_domain, load_domain, random_crops
from vesselfast.data.dataset import _check_paths_arg
from vesselfast.errors import UserError
from vesselfast.pipeline.config import DataConfig
from vesselfast.pipeline.seeds import stream_seed
from vesselfast.schema import declared

# The config keys the data depend on (the survey reads them too; every stage consumes "data").
DATA_KEYS = ("data.source", "data.target", "data.channel", "data.clahe", "data.source_scale", "data.crop",
             "data.pool", "data.builtin_n", "data.builtin_size")


@dataclass(frozen=True)
class Inputs:
    """Every image at its native size (recomputed cheaply on every (re)start instead of stored)."""
    sources: Dict[str, List[Sample]]  # source folder (or "builtin") -> labelled samples at scale 1
    target_train: List[Sample]        # images only: labels never read
    target_test: List[Sample]         # with labels, for evaluation only

    @property
    def target_images(self) -> List[np.ndarray]:
        """The preprocessed target training images [H x W] in [-1, 1]."""
        return [s.image for s in self.target_train]


@dataclass(frozen=True)
class Data:
    """The crop pools every stage trains on, cut once from the sources at their rescale factors."""
    source_train: List[Sample]     # every source folder at its rescale factor
    src_images: torch.Tensor       # [pool x 1 x c x c] source crops in [-1, 1]
    src_masks: torch.Tensor        # [pool x 1 x c x c] their vessel masks {0, 1}
    tgt_images: torch.Tensor       # [pool x 1 x c x c] target crops (no labels)
    factors: Dict[str, float]      # source folder -> rescale factor

    def source_vessel_fraction(self) -> float:
        """Mean vessel fraction of the (rescaled) source masks inside their fields of view."""
        return float(np.mean([s.mask[s.fov].mean() for s in self.source_train]))


def load_samples(view, paths: List[str], role: str, split: str, read_labels: bool,
                 scales: Optional[Sequence[float]] = None, seed: int = 0) -> List[Sample]:
    """One domain from its folders (or the built-in data, drawn from ``seed``), each folder at its
    factor in ``scales``. ``view``: the config (or a slice of it) with the ``data`` keys it reads."""
    data_cfg = view.data
    scales = list(scales) if scales is not None else [1.0] * len(paths)
    if list(paths) == ["builtin"]:
        n = data_cfg.builtin_test_n if split == "test" else data_cfg.builtin_n
        return builtin_domain(role, split, n, data_cfg.builtin_size, seed, scale=scales[0])
    return load_domain(list(paths), role, split, read_labels, channel=data_cfg.channel, scale=scales,
                       clahe=data_cfg.clahe)


MIN_CROP = declared(DataConfig, "crop")["ge"]  # the smallest data.crop


def check_crop(samples: List[Sample], crop: int, where: str) -> None:
    """A crop larger than every image would be mostly padding: refuse it, naming the largest that fits,
    or saying that the images are too small when not even the smallest crop fits."""
    sides = [min(s.image.shape) for s in samples]
    if sides and crop > max(sides):
        fits = max(sides) // 16 * 16  # data.crop must be a multiple of 16 (pipeline/config.py)
        what = (f"use --set data.crop={fits} or less" if fits >= MIN_CROP else
                f"these images are too small for any crop (data.crop >= {MIN_CROP}): use images of at least "
                f"{MIN_CROP} px, at the resolution they were taken")
        raise UserError(f"data.crop={crop} is larger than every {where} image (the largest is "
                        f"{max(sides)} px on its short side); {what}")


def _folders(paths: Sequence[str]) -> List[str]:
    return [p for p in paths if p != "builtin"]


def check_folders(data_cfg) -> None:
    """Before anything is read: each source folder once, and no target folder that is (or lies inside,
    or holds) a source folder: the target's labels would reach training through the source."""
    _check_paths_arg(data_cfg.source, "--source")
    for target in _folders([data_cfg.target]):
        t = os.path.realpath(target)
        for source in _folders(data_cfg.source):
            s = os.path.realpath(source)
            if t == s or t.startswith(s + os.sep) or s.startswith(t + os.sep):
                relation = "is" if t == s else "lies inside" if t.startswith(s + os.sep) else "holds"
                raise UserError(f"--target {target}: {relation} the --source folder {source}; its images come "
                                "with labels the source trains on, and target labels must never reach training: "
                                "pass the unlabelled OCTA folder as --target")


def _digest(path: str, cache: Dict[str, str]) -> str:
    if path not in cache:
        with open(path, "rb") as fh:
            cache[path] = hashlib.sha256(fh.read()).hexdigest()
    return cache[path]


def check_no_shared_images(sources: Dict[str, List[Sample]], target_train: List[Sample],
                           target_test: List[Sample]) -> None:
    """Refuses a target image file that is byte for byte a source training image (a copied folder):
    compared by size first, hashed only where sizes agree."""
    by_size: Dict[int, List[str]] = {}
    for s in (s for ss in sources.values() for s in ss):
        if os.path.isfile(s.source_path):
            by_size.setdefault(os.path.getsize(s.source_path), []).append(s.source_path)
    cache: Dict[str, str] = {}
    for samples, why in ((target_train, "target labels would reach training through the source: remove it from "
                                        "the --target folder"),
                         (target_test, "the test would score an image the run trains on: remove it from the target "
                                       "test images (--target-test, or --target's test split)")):
        for t in samples:
            if not os.path.isfile(t.source_path):
                continue
            for src in by_size.get(os.path.getsize(t.source_path), ()):
                if _digest(src, cache) == _digest(t.source_path, cache):
                    raise UserError(f"{t.source_path}: the same image as the source training image {src}; {why}")


def unlabelled_target(data_cfg) -> bool:
    """A target folder with no labels at all (a user's own scans) and no --target-test: the run trains as
    always and evaluates nothing (nothing to evaluate against)."""
    from vesselfast.data.layouts import detect

    return data_cfg.target_test is None and data_cfg.target != "builtin" and not detect(data_cfg.target).has_labels


def load_inputs(cfg) -> Inputs:
    """Every image of the run's folders (``cfg``: the RunConfig), checked before anything is written."""
    data_cfg = cfg.data
    check_folders(data_cfg)
    sources = {folder: load_samples(cfg, [folder], "source", "train", True, seed=cfg.seed)
               for folder in data_cfg.source}
    target_train = load_samples(cfg, [data_cfg.target], "target", "train", False, seed=cfg.seed)
    target_test = [] if unlabelled_target(data_cfg) else \
        load_samples(cfg, [data_cfg.target_test or data_cfg.target], "target", "test", True, seed=cfg.seed)
    if any(s.mask is not None for s in target_train):
        raise AssertionError("target training labels were read")  # load_domain must never do this
    check_no_shared_images(sources, target_train, target_test)
    check_crop([s for ss in sources.values() for s in ss], data_cfg.crop, f"source ({', '.join(data_cfg.source)})")
    check_crop(target_train, data_cfg.crop, f"target ({data_cfg.target})")
    return Inputs(sources, target_train, target_test)


def frame_contrast(samples: List[Sample]) -> float:
    """Median over ``samples`` of the intensity spread in the image corners (outside the inscribed
    ellipse) relative to the centre's. Colour fundus photographs sit in a dark circular field of view,
    flat in the corners: about 0 to 0.25 (DRIVE, CHASE_DB1, the built-in fundus, read either as source or
    as target). OCTA fills the frame: about 1 (OCTA-500, the built-in OCTA)."""
    masks: Dict[tuple, tuple] = {}
    ratios = []
    for s in samples:
        h, w = s.image.shape
        if (h, w) not in masks:
            yy, xx = np.ogrid[:h, :w]
            r = np.hypot((yy - (h - 1) / 2) / (h / 2), (xx - (w - 1) / 2) / (w / 2))
            masks[(h, w)] = (r > 1.05, r < 0.8)
        corner, centre = masks[(h, w)]
        if corner.any() and centre.any():
            ratios.append(float(s.image[corner].std()) / (float(s.image[centre].std()) + 1e-6))
    return float(np.median(ratios)) if ratios else 1.0


FUNDUS_FRAME = 0.5  # frame_contrast below this: a circular field of view, as in colour fundus


def domain_warnings(inputs: Inputs, cfg) -> List[str]:
    """One line per folder whose images look like the other domain (the run goes on: the user may know
    better, e.g. fundus -> fundus adaptation)."""
    out = []
    if frame_contrast(inputs.target_train) < FUNDUS_FRAME:
        out.append(f"--target {cfg.data.target}: the images look like colour fundus photographs (a dark circular "
                   "field of view around the retina), not OCTA; the method adapts fundus -> OCTA: check --target")
    for folder, samples in inputs.sources.items():
        if frame_contrast(samples) >= FUNDUS_FRAME:
            out.append(f"--source {folder}: the images look like OCTA (no dark circular field of view around "
                       "them), not colour fundus photographs: check --source (it must be labelled fundus)")
    return out


def source_at(view, factors: Dict[str, float], seed: int) -> List[Sample]:
    """Every source folder rescaled by its factor (from the original files: the rescale comes first in
    the preprocessing), named as one combined domain."""
    folders = list(view.data.source)
    return load_samples(view, folders, "source", "train", True, [factors[f] for f in folders], seed)


def build_data(view, seed: int, inputs: Inputs, factors: Dict[str, float]) -> Data:
    """The crop pools (``view``: the slice of :data:`DATA_KEYS`; ``seed``: the run seed)."""
    data_cfg = view.data
    source_train = source_at(view, factors, seed) if any(f != 1.0 for f in factors.values()) else \
        [s for folder in data_cfg.source for s in inputs.sources[folder]]
    check_crop(source_train, data_cfg.crop, f"source ({', '.join(data_cfg.source)}) after rescaling")
    src_images, src_masks, _ = random_crops(source_train, data_cfg.pool, data_cfg.crop,
                                            np.random.default_rng(stream_seed(seed, "source_crops")))
    tgt_images, _, _ = random_crops(inputs.target_train, data_cfg.pool, data_cfg.crop,
                                    np.random.default_rng(stream_seed(seed, "target_crops")))
    return Data(source_train, torch.as_tensor(src_images), torch.as_tensor(src_masks), torch.as_tensor(tgt_images),
                dict(factors))


def describe(inputs: Inputs, cfg) -> str:
    n_src = sum(len(v) for v in inputs.sources.values())
    return (f"data: source {n_src} images ({', '.join(f'{k}: {len(v)}' for k, v in inputs.sources.items())}) -> "
            f"{cfg.data.pool} crops of {cfg.data.crop} px; target {len(inputs.target_train)} train images "
            f"(unlabelled), " + (f"{len(inputs.target_test)} test images" if inputs.target_test else
                                 "no labelled test images (nothing is evaluated; give --target-test DIR with "
                                 "labels to score the run)"))

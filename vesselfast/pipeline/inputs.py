"""What the stages start from: every image loaded, validated and preprocessed (:class:`Inputs`, before
anything is trained), then the crop pools cut at the survey's rescale factors (:class:`Data`).

Target training images are loaded without their labels: :func:`load_inputs` asserts that none was read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from vesselfast.data import Sample, builtin_domain, load_domain, random_crops
from vesselfast.errors import UserError
from vesselfast.pipeline.seeds import stream_seed

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


def check_crop(samples: List[Sample], crop: int, where: str) -> None:
    """A crop larger than every image would be mostly padding: refuse it, naming the largest that fits."""
    sides = [min(s.image.shape) for s in samples]
    if sides and crop > max(sides):
        fits = max(sides) // 16 * 16
        raise UserError(f"data.crop={crop} is larger than every {where} image (the largest is "
                        f"{max(sides)} px on its short side); use --set data.crop={fits} or less")


def load_inputs(cfg) -> Inputs:
    """Every image of the run's folders (``cfg``: the RunConfig), checked before anything is written."""
    data_cfg = cfg.data
    sources = {folder: load_samples(cfg, [folder], "source", "train", True, seed=cfg.seed)
               for folder in data_cfg.source}
    target_train = load_samples(cfg, [data_cfg.target], "target", "train", False, seed=cfg.seed)
    target_test = load_samples(cfg, [data_cfg.target_test or data_cfg.target], "target", "test", True, seed=cfg.seed)
    if any(s.mask is not None for s in target_train):
        raise AssertionError("target training labels were read")  # load_domain must never do this
    check_crop([s for ss in sources.values() for s in ss], data_cfg.crop, f"source ({', '.join(data_cfg.source)})")
    check_crop(target_train, data_cfg.crop, f"target ({data_cfg.target})")
    return Inputs(sources, target_train, target_test)


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
            f"(unlabelled), {len(inputs.target_test)} test images")

"""``Sample`` and ``load_domain``: folders on disk -> preprocessed, validated samples."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import numpy as np

from vesselfast.data import layouts as L
from vesselfast.data.verify import Problems, read_entry
from vesselfast.data.preprocess import CLAHE_DEFAULT, preprocess_source, preprocess_target
from vesselfast.errors import UserError

ROLES = ("source", "target")


@dataclass
class Sample:
    name: str
    image: np.ndarray            # float32 [H, W] in [-1, 1], preprocessed, one channel
    mask: Optional[np.ndarray]   # uint8 {0, 1} [H, W]; None when unlabelled / not read
    fov: np.ndarray              # bool [H, W] (all True for OCTA)
    source_path: str
    layout: str = ""             # layout key ("DRIVE", "OCTA-500_3M", "synthetic", ...)
    modality: str = ""           # "fundus" | "octa"
    split: Optional[str] = None  # train / val / test, None for a folder without splits
    scale: float = 1.0           # rescale factor applied (to map predictions back: divide sizes by it)


def modality_for(layout: L.Layout, role: str) -> str:
    """The layout's modality when it knows it, else by role (source -> fundus, target -> OCTA)."""
    return layout.modality or ("fundus" if role == "source" else "octa")


def _check_paths_arg(paths, option: str = "") -> List[str]:
    """The paths as strings, each folder once (``option``: the command-line option that gave them, for
    the message)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise UserError("no data folder given; pass at least one path")
    seen = {}
    for p in paths:
        rp = os.path.realpath(p)
        if rp in seen:
            raise UserError(f"{option + ' ' if option else ''}{p}: passed twice (also as {seen[rp]}); "
                            "pass each folder once")
        seen[rp] = p
    return paths


def check_label_like_names(layout: L.Layout, entries: Sequence[L.Entry]) -> None:
    bad = [e.image for e in entries if L.LABEL_LIKE.search(e.name)]
    if bad:
        raise UserError(f"{bad[0]}: looks like a label file inside the target image folder "
                        f"({len(bad)} such file(s)); move labels out of the image folder: target labels "
                        "must never be used for training")


def load_domain(paths: Union[str, Sequence[str]], role: str, split: str = "train", read_labels: bool = True, *,
                channel: str = "green", scale: Union[float, Sequence[float]] = 1.0, clahe: bool = CLAHE_DEFAULT,
                modality: Optional[str] = None) -> List[Sample]:
    """Read, validate and preprocess one domain made of one or several folders.

    role: "source" (fundus, labelled) or "target" (OCTA). split: train | val | test | all; a folder without
    splits contributes all its images to any split. For role="target", split="train" labels are never
    listed nor opened and ``read_labels`` must be False. scale: the rescale factor, one for every folder or
    one per folder (the pipeline estimates them, see vesselfast/pipeline/survey.py). modality overrides the
    layout's (fundus -> preprocess_source, octa -> preprocess_target). Names are file stems, prefixed
    with the folder name when several folders are combined and with the split for split="all"
    ("DRIVE/train/21_training")."""
    if role not in ROLES:
        raise UserError(f"role must be 'source' or 'target', got {role!r}")
    if split not in L.SPLITS + ("all",):
        raise UserError(f"split must be one of train, val, test, all, got {split!r}")
    if role == "target" and split == "train" and read_labels:
        raise UserError("target training labels must never be read: call load_domain(..., read_labels=False)")
    if modality not in (None, "fundus", "octa"):
        raise UserError(f"modality must be 'fundus' or 'octa', got {modality!r}")
    paths = _check_paths_arg(paths)
    scales = list(scale) if isinstance(scale, (list, tuple)) else [scale] * len(paths)
    if len(scales) != len(paths):
        raise UserError(f"scale: give one factor, or one per folder ({len(paths)}), not {len(scales)}")
    out: List[Sample] = []
    names = set()
    problems = Problems()
    for path, f in zip(paths, scales):
        lay = L.detect(path)
        entries = lay.entries(split, read_labels)
        if role == "target" and split in ("train", "all"):
            check_label_like_names(lay, entries)
        mod = modality or modality_for(lay, role)
        if not (isinstance(f, (int, float)) and f > 0):
            raise UserError(f"scale must be a number > 0, got {f!r}")
        f = float(f)
        prefix = (os.path.basename(os.path.normpath(path)) + "/") if len(paths) > 1 else ""
        for e in entries:
            got = read_entry(e, read_labels, problems)
            if got is None:
                continue
            img, mask, fov = got.image, got.mask, got.fov
            if mod == "fundus":
                im, m, fv = preprocess_source(img, mask, fov, channel=channel, clahe=clahe, scale=f)
            else:
                im, m, fv = preprocess_target(img, mask, clahe=clahe, scale=f)
            name = prefix + (f"{e.split}/" if (split == "all" and e.split) else "") + e.name
            if name in names:
                problems.append(f"{e.image}: duplicate image name {name!r} in the combined domain; rename one")
                continue
            names.add(name)
            out.append(Sample(name, im, m, fv, e.image, layout=lay.key, modality=mod, split=e.split, scale=f))
    problems.raise_first(paths)
    if not out:
        raise UserError(f"{', '.join(paths)}: no images for split {split!r}; use split 'all' or a folder "
                        "that has this split")
    return out

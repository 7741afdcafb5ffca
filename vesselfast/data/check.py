"""``check_paths``: validate data folders and report layout, counts, sizes, vessel fraction, calibre.

Every file is decoded and checked by the same per-entry check loading uses (data/verify.py), and every
problem is collected, not just the first: the report's ``problems`` lists each one (one line naming the
file and the fix; ``vesselfast data check`` exits 2 when there are any). Role "source": vessel masks are
required and read. Role "target": labels of the train split (and of folders without splits, which may be
used for training) are never listed nor opened; val/test labels are checked when present. Survivable
oddities (a nearly binary mask that was thresholded, FOV computed from the image) are reported as notes.
Folder-level errors (no images, an unknown layout, label files in a target image folder) still raise.
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from vesselfast.data import layouts as L
from vesselfast.data.calibre import mean_width
from vesselfast.data.dataset import _check_paths_arg, check_label_like_names, modality_for
from vesselfast.data.io import read_image
from vesselfast.data.verify import Problems, read_entry
from vesselfast.data.preprocess import fov_from_image
from vesselfast.errors import UserError

CALIBRE_IMAGES = 3  # labelled images per folder used to estimate the vessel calibre


def infer_role(paths: Sequence[str]) -> str:
    mods = set()
    for p in paths:
        lay = L.detect(p)
        mod = lay.modality
        if mod is None:  # generic layout: RGB images -> fundus, grey -> OCTA (first image decides)
            ents = lay.entries("all", False)
            mod = ("fundus" if read_image(ents[0].image).ndim == 3 else "octa") if ents else None
        mods.add(mod)
    if mods == {"fundus"}:
        return "source"
    if mods == {"octa"}:
        return "target"
    raise UserError(f"cannot tell the role of {', '.join(paths)} from the layout; pass --role source or --role target")


def _split_labels_allowed(role: str, split: Optional[str]) -> bool:
    if role == "source":
        return True
    return split in ("val", "test")   # never train, never an unsplit folder


def check_paths(paths: Union[str, Sequence[str]], role: str, split: str = "all") -> Dict[str, object]:
    """Validate the folders of one domain and return a JSON-able report:
    ``{"role", "split", "total_images", "paths": [{"path", "layout", "key", "modality", "splits": {split:
    {"images", "labels", "labels_read", "sizes", "vessel_fraction"}}, "calibre_px", "default_scale",
    "notes"}]}``. Raises :class:`UserError` on bad input."""
    if role not in ("source", "target"):
        raise UserError(f"role must be 'source' or 'target', got {role!r}")
    if split not in L.SPLITS + ("all",):
        raise UserError(f"split must be one of train, val, test, all, got {split!r}")
    paths = _check_paths_arg(paths)
    report: Dict[str, object] = {"role": role, "split": split, "paths": [], "total_images": 0, "problems": []}
    problems = Problems()
    seen_names = {}
    for path in paths:
        lay = L.detect(path)
        mod = modality_for(lay, role)
        notes: List[str] = list(lay.notes)
        # list images without labels first (never touches label folders), then per split with labels if allowed
        plain = lay.entries(split, False)
        if not plain:
            if split == "all":
                raise UserError(f"{path}: no images found ({lay.name} layout); put image files in its image folder")
            notes.append(f"no images for split {split!r} (layout splits: {', '.join(lay.splits) or 'none'})")
        by_split: Dict[Optional[str], List[L.Entry]] = {}
        for e in plain:
            by_split.setdefault(e.split, []).append(e)
        if role == "target":
            train_like = [e for e in plain if e.split in ("train", None)]
            check_label_like_names(lay, train_like)
        splits_out = {}
        calib: List[float] = []
        for sp, ents in by_split.items():
            read_lab = _split_labels_allowed(role, sp) and (lay.has_labels or role == "source")
            if read_lab:
                labelled = {e.name: e for e in lay.entries(sp if sp else "all", True) if e.split == sp}
                ents = [labelled.get(e.name, e) for e in ents]
            sizes: Counter = Counter()
            fracs: List[float] = []
            n_lab = 0
            fov_computed = 0
            for e in ents:
                got = read_entry(e, read_lab, problems, notes)
                if got is None:
                    continue
                img, fov = got.image, got.fov
                h, w = img.shape[:2]
                sizes[f"{w}x{h}"] += 1
                if fov is None and mod == "fundus":
                    fov = fov_from_image(img)
                    fov_computed += 1
                if got.mask is not None:
                    m = got.mask
                    n_lab += 1
                    region = fov if fov is not None else np.ones_like(m)
                    fracs.append(float(m[region].mean()) if region.any() else 0.0)
                    if not m.any():
                        notes.append(f"{e.mask}: empty vessel mask")
                    if len(calib) < CALIBRE_IMAGES and m.any():
                        calib.append(mean_width(m))
                full = ((os.path.basename(os.path.normpath(path)) + "/") if len(paths) > 1 else "") + e.name
                full = (sp, full)
                if full in seen_names:
                    problems.append(f"{e.image}: duplicate image name {full[1]!r} (also {seen_names[full]}); rename one")
                    continue
                seen_names[full] = e.image
            if fov_computed:
                notes.append(f"{sp or 'all'}: no FOV files for {fov_computed} fundus image(s); FOV computed from the "
                             "image (red channel > 20, largest component, eroded 2 px)")
            key = sp or "all"
            splits_out[key] = {
                "images": len(ents),
                "labels_read": bool(read_lab),
                "labels": n_lab if read_lab else None,
                "sizes": dict(sizes),
                "vessel_fraction": ({"mean": float(np.mean(fracs)), "min": float(np.min(fracs)),
                                     "max": float(np.max(fracs))} if fracs else None),
            }
            if role == "target" and not read_lab:
                notes.append(f"{key}: labels not listed nor read (target {'train' if sp else 'unsplit'} data "
                             "may be used for training)")
        report["total_images"] += len(plain)
        report["paths"].append({
            "path": path, "layout": lay.name, "key": lay.key, "modality": mod,
            "splits_present": list(lay.splits) or None, "splits": splits_out,
            "calibre_px": float(np.mean(calib)) if calib else None,
            "notes": notes,
        })
    if report["total_images"] == 0:
        raise UserError(f"{', '.join(paths)}: no images for split {split!r}; use --split all or another folder")
    report["problems"] = list(problems)
    return report


def format_report(rep: Dict[str, object]) -> str:
    lines = []
    for p in rep["paths"]:
        lines.append(f"{p['path']}: {p['layout']} ({p['modality']}, role {rep['role']})")
        for sp, d in p["splits"].items():
            sizes = ", ".join(f"{k} x{v}" for k, v in d["sizes"].items())
            lab = (f"{d['labels']} labels" if d["labels_read"] else "labels not read")
            vf = d["vessel_fraction"]
            vfs = f", vessel fraction {vf['mean']:.3f} ({vf['min']:.3f}-{vf['max']:.3f})" if vf else ""
            lines.append(f"  {sp:5s} {d['images']} images, {lab}, {sizes}{vfs}")
        if p["calibre_px"] is not None:
            lines.append(f"  calibre {p['calibre_px']:.2f} px mean vessel width (area/skeleton, first "
                         f"{CALIBRE_IMAGES} labelled images); training rescales each source to the target's "
                         "calibre, estimated from its unlabelled images (docs/DATA.md)")
        for n in p["notes"]:
            lines.append(f"  note: {n}")
    n_bad = len(rep.get("problems", []))
    lines.append(f"{'OK' if not n_bad else 'NOT OK'}: {rep['total_images']} images in {len(rep['paths'])} folder(s)"
                 + (f", {n_bad} problem(s)" if n_bad else ""))
    return "\n".join(lines)

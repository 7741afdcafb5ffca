"""Auto-detected dataset layouts: which files are images, vessel masks and field-of-view masks, per split.

A layout lists :class:`Entry` records; nothing is decoded here. With ``labels=False`` a lister never
lists a label folder nor opens a label file (structural guarantee for target training data; tested with an
audit hook); detection may only check that a label folder exists. Only the flat layouts of fundus data
(STARE, the original CHASE_DB1 zip, flat image folders) keep images and labels in one folder, and those are
listed as a whole.

Supported (see docs/DATA.md): DRIVE, CHASE_DB1 (split folders or the flat original), HRF, STARE, FIVES,
OCTA-500 (split folders ``{train,val,test}/{image,label}`` and the released
``OCTA_3mm|OCTA_6mm/Projection Maps/OCTA(ILM_OPL)`` + ``GroundTruth/GT_LargeVessel``), ROSE-1
(``{train,test}/{img,gt}``), generic ``images/`` + ``masks/`` [+ ``fov/``] (optionally under
``{train,val,test}/``), ``Original/`` + ``Ground_truth/`` (reference code), and a flat folder of images
(unlabelled).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from vesselfast.data.io import is_image_file, stem
from vesselfast.errors import UserError

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation"),
    "test": ("test", "testing"),
}
# Image stems that look like label files: a target *image* folder containing these is refused.
LABEL_LIKE = re.compile(r"(_mask|_masks|_label|_labels|_gt|_manual\d?|_1stho|_2ndho|\.ah|\.vk|_fov|_seg)$", re.I)


@dataclass(frozen=True)
class Entry:
    name: str                 # image stem (unique within a layout)
    image: str
    mask: Optional[str]       # vessel label file; None when labels were not requested
    fov: Optional[str]        # field-of-view mask file; None when the layout has none (computed then)
    split: Optional[str]      # train/val/test, or None for a folder without splits


@dataclass
class Layout:
    name: str                               # "DRIVE", "OCTA-500 (split folders)", ...
    key: str                                # calibre / preprocessing key: "DRIVE", "OCTA-500_3M", ...
    modality: Optional[str]                 # "fundus" | "octa" | None (generic: decided by role)
    root: str
    splits: Tuple[str, ...]                 # splits present; () = no split structure (whole folder)
    has_labels: bool                        # a label folder/file pattern exists (not opened to know it)
    _lister: Callable[[str, bool], List[Entry]] = field(repr=False, default=None)
    notes: List[str] = field(default_factory=list)

    def entries(self, split: str, labels: bool) -> List[Entry]:
        """Entries of ``split`` ('train'|'val'|'test'|'all'). A folder without splits returns everything
        for any split. With ``labels=False`` no label file or folder is touched."""
        if split not in SPLITS + ("all",):
            raise UserError(f"split {split!r} is not one of train, val, test, all")
        return self._lister(split, labels)


# ----------------------------------------------------------------------------------------------- helpers

def _natural_key(s: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", s)]


def _subdir(d: str, names: Sequence[str]) -> Optional[str]:
    """The child folder of ``d`` whose name matches one of ``names`` (case-insensitive), else None.
    Checks candidates with ``os.path.isdir`` first so that no sibling folder is listed needlessly."""
    for n in names:
        p = os.path.join(d, n)
        if os.path.isdir(p):
            return p
    try:
        children = os.listdir(d)
    except OSError:
        return None
    low = {n.lower() for n in names}
    for c in sorted(children):
        if c.lower() in low and os.path.isdir(os.path.join(d, c)):
            return os.path.join(d, c)
    return None


def _images_in(d: str) -> List[Tuple[str, str]]:
    """(stem, path) of the image files in ``d``, natural order; duplicate stems are refused."""
    try:
        names = os.listdir(d)
    except OSError as exc:
        raise UserError(f"{d}: cannot list folder ({exc.strerror or exc}); check it exists and is readable")
    out: Dict[str, str] = {}
    for n in sorted(names):
        p = os.path.join(d, n)
        if not is_image_file(n) or not os.path.isfile(p):
            continue
        s = stem(n)
        if s in out:
            raise UserError(f"{d}: duplicate image stem {s!r} ({os.path.basename(out[s])}, {n}); "
                            "rename or remove one of them")
        out[s] = p
    return sorted(out.items(), key=lambda kv: _natural_key(kv[0]))


def _find(index: Dict[str, str], candidates: Sequence[str]) -> Optional[str]:
    for c in candidates:
        if c in index:
            return index[c]
        if c.lower() in index:
            return index[c.lower()]
    return None


def _index(d: Optional[str]) -> Dict[str, str]:
    if d is None:
        return {}
    idx = {}
    for s, p in _images_in(d):
        idx[s] = p
        idx.setdefault(s.lower(), p)
    return idx


def _pair(images: List[Tuple[str, str]], split: Optional[str], labels: bool,
          mask_dir: Optional[str], mask_names: Callable[[str], Sequence[str]],
          fov_dir: Optional[str], fov_names: Optional[Callable[[str], Sequence[str]]],
          layout_name: str) -> List[Entry]:
    masks = _index(mask_dir) if labels else {}
    if labels and mask_dir is None:
        where = os.path.dirname(images[0][1]) if images else "?"
        raise UserError(f"{where}: no vessel mask folder next to the images ({layout_name}); "
                        "add one (e.g. masks/ with the same file stems) or use this folder only as unlabelled "
                        "target data")
    fovs = _index(fov_dir)
    out = []
    for s, p in images:
        m = None
        if labels:
            m = _find(masks, mask_names(s))
            if m is None:
                raise UserError(f"{p}: no vessel mask found in {mask_dir} (looked for "
                                f"{' / '.join(c + '.*' for c in mask_names(s))}); add it or remove the image")
        f = _find(fovs, fov_names(s)) if (fov_names and fov_dir) else None
        out.append(Entry(s, p, m, f, split))
    return out


# ----------------------------------------------------------------------------------------- folder specs

@dataclass(frozen=True)
class _Spec:
    name: str
    key: str
    modality: Optional[str]
    img_dirs: Tuple[str, ...]
    mask_dirs: Tuple[str, ...]
    mask_names: Callable[[str], Sequence[str]]
    fov_dirs: Tuple[str, ...] = ()
    fov_names: Optional[Callable[[str], Sequence[str]]] = None
    stem_re: Optional[str] = None          # at least one image stem must match (tells DRIVE from generic)
    split_of: Optional[Callable[[str], Optional[str]]] = None  # split from the file name (flat DRIVE)


def _drive_split(s: str) -> Optional[str]:
    return "train" if s.endswith("_training") else "test" if s.endswith("_test") else None


_GENERIC_MASKS = lambda s: [s, s + "_mask", s + "_label", s + "_gt", s + "_manual1", s + "_vessel"]  # noqa: E731

SPECS = (
    _Spec("DRIVE", "DRIVE", "fundus", ("images",), ("1st_manual",), lambda s: [s.split("_")[0] + "_manual1"],
          ("mask",), lambda s: [s + "_mask", s], r"^\d+_(training|test)$", _drive_split),
    _Spec("CHASE_DB1", "CHASE_DB1", "fundus", ("images",), ("1st_manual",), lambda s: [s + "_1stHO"],
          ("mask",), lambda s: [s, s + "_mask"], r"^Image_\d+[LR]$"),
    _Spec("HRF", "HRF", "fundus", ("images",), ("manual1",), lambda s: [s],
          ("mask",), lambda s: [s + "_mask", s], r"^\d+_(h|g|dr)$"),
    _Spec("FIVES", "FIVES", "fundus", ("Original",), ("Ground truth", "Ground_truth", "GroundTruth"),
          lambda s: [s], (), None, r"^\d+_[ADGN]$"),
    _Spec("OCTA-500 (split folders)", "OCTA-500_3M", "octa", ("image",), ("label",), lambda s: [s]),
    _Spec("ROSE-1", "ROSE-1", "octa", ("img",), ("gt",), lambda s: [s, s + "_gt"]),
    _Spec("generic", "generic", None, ("images",), ("masks", "labels"), _GENERIC_MASKS,
          ("fov",), lambda s: [s, s + "_fov", s + "_mask"]),
    _Spec("generic Original/Ground_truth", "generic", None, ("Original",), ("Ground_truth", "Ground truth"),
          _GENERIC_MASKS, ("fov",), lambda s: [s, s + "_fov", s + "_mask"]),
)


def _spec_matches(spec: _Spec, d: str) -> Optional[str]:
    img_dir = _subdir(d, spec.img_dirs)
    if img_dir is None:
        return None
    if spec.stem_re is not None:
        rx = re.compile(spec.stem_re, re.I)
        if not any(rx.match(s) for s, _ in _images_in(img_dir)):
            return None
    return img_dir


def _split_dirs(root: str) -> Dict[str, str]:
    out = {}
    for split, aliases in SPLIT_ALIASES.items():
        d = _subdir(root, aliases)
        if d is not None:
            out[split] = d
    return out


def _want(split: str, have: Sequence[str]) -> List[str]:
    return list(have) if split == "all" else [s for s in have if s == split]


def _spec_layout(spec: _Spec, root: str) -> Optional[Layout]:
    # (a) the folder itself holds images/ (no split structure, or split from the file names)
    if _spec_matches(spec, root) is not None:
        d = root

        def lister(split, labels, d=d):
            img_dir = _spec_matches(spec, d)
            imgs = _images_in(img_dir)
            if spec.split_of is not None:
                imgs = [(s, p) for s, p in imgs if split == "all" or spec.split_of(s) == split]
            mask_dir = _subdir(d, spec.mask_dirs) if labels else None
            fov_dir = _subdir(d, spec.fov_dirs) if spec.fov_dirs else None
            ents = _pair(imgs, None, labels, mask_dir, spec.mask_names, fov_dir, spec.fov_names, spec.name)
            if spec.split_of is not None:
                ents = [Entry(e.name, e.image, e.mask, e.fov, spec.split_of(e.name)) for e in ents]
            return ents

        splits = ()
        if spec.split_of is not None:
            splits = tuple(sorted({spec.split_of(s) for s, _ in _images_in(_spec_matches(spec, d))} - {None}))
        return Layout(spec.name, _key(spec, root), spec.modality, root, splits,
                      any(os.path.isdir(os.path.join(root, m)) for m in spec.mask_dirs), lister)
    # (b) split folders, each holding the structure
    found = {sp: d for sp, d in _split_dirs(root).items() if _spec_matches(spec, d) is not None}
    if not found:
        return None

    def lister(split, labels):
        out = []
        for sp in _want(split, [s for s in SPLITS if s in found]):
            d = found[sp]
            imgs = _images_in(_spec_matches(spec, d))
            mask_dir = _subdir(d, spec.mask_dirs) if labels else None
            fov_dir = _subdir(d, spec.fov_dirs) if spec.fov_dirs else None
            out += _pair(imgs, sp, labels, mask_dir, spec.mask_names, fov_dir, spec.fov_names, spec.name)
        return out

    has_labels = any(os.path.isdir(os.path.join(d, m)) for d in found.values() for m in spec.mask_dirs)
    return Layout(spec.name, _key(spec, root), spec.modality, root,
                  tuple(s for s in SPLITS if s in found), has_labels, lister)


def _key(spec: _Spec, root: str) -> str:
    if spec.key == "OCTA-500_3M" and re.search(r"6\s*m", os.path.basename(os.path.abspath(root)), re.I):
        return "OCTA-500_6M"
    return spec.key


# ------------------------------------------------------------------------------------ special layouts

_OCTA500_SUBSETS = ("OCTA_3mm", "OCTA_3M", "OCTA_6mm", "OCTA_6M")
# Official OCTA-500 ID splits (Li et al. 2020): 6 mm 10001-10300 -> 180/20/100, 3 mm 10301-10500 -> 140/10/50.
OCTA500_SPLITS = {
    "OCTA-500_3M": {"train": (10301, 10440), "val": (10441, 10450), "test": (10451, 10500)},
    "OCTA-500_6M": {"train": (10001, 10180), "val": (10181, 10200), "test": (10201, 10300)},
}


def _octa500_released(root: str) -> Optional[Layout]:
    subsets = [os.path.join(root, s) for s in _OCTA500_SUBSETS if os.path.isdir(os.path.join(root, s))]
    if subsets:
        if len(subsets) > 1:
            names = ", ".join(os.path.basename(s) for s in subsets)
            raise UserError(f"{root}: holds several OCTA-500 subsets ({names}); "
                            "pass one of them, e.g. " + subsets[0])
        root = subsets[0]
    pm = _subdir(root, ("Projection Maps", "ProjectionMaps", "Projection_Maps"))
    if pm is None:
        return None
    img_dir = _subdir(pm, ("OCTA(ILM_OPL)", "OCTA_ILM_OPL", "OCTA(ILM-OPL)"))
    if img_dir is None:
        return None
    key = "OCTA-500_6M" if re.search(r"6m", os.path.basename(os.path.abspath(root)), re.I) else "OCTA-500_3M"
    ranges = OCTA500_SPLITS[key]

    def split_of(s: str) -> Optional[str]:
        if not s.isdigit():
            return None
        for sp, (lo, hi) in ranges.items():
            if lo <= int(s) <= hi:
                return sp
        return None

    def lister(split, labels):
        imgs = [(s, p) for s, p in _images_in(img_dir) if split == "all" or split_of(s) == split]
        mask_dir = None
        if labels:
            gt = _subdir(root, ("GroundTruth", "Ground Truth", "GT"))
            mask_dir = _subdir(gt, ("GT_LargeVessel", "GT_Large_Vessel")) if gt else None
        ents = _pair(imgs, None, labels, mask_dir, lambda s: [s], None, None, "OCTA-500 (released)")
        return [Entry(e.name, e.image, e.mask, e.fov, split_of(e.name)) for e in ents]

    has_labels = os.path.isdir(os.path.join(root, "GroundTruth"))
    return Layout("OCTA-500 (released)", key, "octa", root, SPLITS, has_labels, lister)


def _rose_root(root: str) -> None:
    subs = [s for s in ("SVC", "DVC", "SVC_DVC", "IVC") if os.path.isdir(os.path.join(root, s))]
    if subs and _spec_layout(SPECS[5], os.path.join(root, subs[0])) is not None:
        raise UserError(f"{root}: a ROSE-1 root with subsets {', '.join(subs)}; pass one of them, "
                        f"e.g. {os.path.join(root, subs[0])}")


_STARE_RX = re.compile(r"^im\d{4}$", re.I)
_STARE_LABEL_RX = re.compile(r"^(im\d{4})\.ah$", re.I)


def _stare(root: str) -> Optional[Layout]:
    dirs = [root] + [os.path.join(root, c) for c in sorted(os.listdir(root)) if os.path.isdir(os.path.join(root, c))]
    img_dirs = [d for d in dirs if any(_STARE_RX.match(s) for s, _ in _images_in(d))]
    if not img_dirs:
        return None

    def lister(split, labels):
        imgs = [(s, p) for d in img_dirs for s, p in _images_in(d) if _STARE_RX.match(s)]
        seen = {}
        for s, p in imgs:
            if s in seen:
                raise UserError(f"{root}: duplicate image stem {s!r} ({seen[s]}, {p}); remove one of them")
            seen[s] = p
        masks = {}
        if labels:
            for d in dirs:
                for s, p in _images_in(d):
                    m = _STARE_LABEL_RX.match(s)
                    if m:
                        masks[m.group(1).lower()] = p
        out = []
        for s, p in sorted(imgs, key=lambda kv: _natural_key(kv[0])):
            m = masks.get(s.lower()) if labels else None
            if labels and m is None:
                continue  # STARE ships 400 images and 20 labelled ones: the labelled subset is the dataset
            out.append(Entry(s, p, m, None, None))
        if labels and not out:
            raise UserError(f"{root}: STARE images found but no Hoover labels (imNNNN.ah.ppm); add labels-ah/")
        return out

    has = any(_STARE_LABEL_RX.match(s) for d in dirs for s, _ in _images_in(d))
    return Layout("STARE", "STARE", "fundus", root, (), has, lister)


_CHASE_RX = re.compile(r"^Image_(\d+)[LR]$", re.I)


def _chase_flat(root: str) -> Optional[Layout]:
    imgs = [(s, p) for s, p in _images_in(root) if _CHASE_RX.match(s)]
    if not imgs:
        return None

    def split_of(s):  # the split of the shared copy: children 01-07 train, 08-14 test
        return "train" if int(_CHASE_RX.match(s).group(1)) <= 7 else "test"

    def lister(split, labels):
        chosen = [(s, p) for s, p in imgs if split == "all" or split_of(s) == split]
        ents = _pair(chosen, None, labels, root if labels else None, lambda s: [s + "_1stHO"], None, None, "CHASE_DB1")
        return [Entry(e.name, e.image, e.mask, e.fov, split_of(e.name)) for e in ents]

    return Layout("CHASE_DB1 (flat original)", "CHASE_DB1", "fundus", root, ("train", "test"), True, lister)


def _flat_images(root: str) -> Optional[Layout]:
    imgs = _images_in(root)
    if not imgs:
        return None

    def lister(split, labels):
        if labels:
            raise UserError(f"{root}: a flat folder of images has no vessel masks; use images/ + masks/ "
                            "(same stems) for labelled data")
        return [Entry(s, p, None, None, None) for s, p in _images_in(root)]

    return Layout("flat image folder (unlabelled)", "generic", None, root, (), False, lister)


LAYOUT_NAMES = ("DRIVE", "CHASE_DB1", "HRF", "FIVES", "STARE", "OCTA-500 (split folders)", "OCTA-500 (released)",
                "ROSE-1", "generic images/+masks/[+fov/]", "generic Original/+Ground_truth/",
                "flat image folder (unlabelled)")


def detect(path: str) -> Layout:
    """The layout of ``path``; :class:`UserError` when it does not exist, is empty or matches none."""
    if not os.path.exists(path):
        raise UserError(f"{path}: no such folder; check the path")
    if not os.path.isdir(path):
        raise UserError(f"{path}: is a file, not a folder; pass the dataset folder")
    try:
        children = os.listdir(path)
    except OSError as exc:
        raise UserError(f"{path}: cannot list folder ({exc.strerror or exc})")
    if not [c for c in children if not c.startswith(".")]:
        raise UserError(f"{path}: folder is empty; put the data set there or pass another folder")
    lay = _octa500_released(path)
    if lay is not None:
        return lay
    _rose_root(path)
    for spec in SPECS:
        lay = _spec_layout(spec, path)
        if lay is not None:
            return lay
    for fn in (_stare, _chase_flat, _flat_images):
        lay = fn(path)
        if lay is not None:
            return lay
    raise UserError(f"{path}: unknown layout (tried: {', '.join(LAYOUT_NAMES)}); "
                    "for your own data use images/ + masks/ with matching file stems (see docs/DATA.md)")

"""Segmenting image files: input expansion (files, folders, globs; the image types training reads), the
checks that run before any work (output folder writable, unique output names, every image readable and
within the size limit), rescaling to the model's pixel size, sliding-window inference and the PNG outputs
(written atomically)."""
from __future__ import annotations

import glob
import os
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from vesselfast.checkpoint import atomic_write
from vesselfast.data.io import IMAGE_EXTS, is_image_file, stem
from vesselfast.errors import UserError

# Largest image (width x height, after any rescale to the model's pixel size) segmented without
# --max-pixels: 4096 x 4096. Sliding-window inference holds about 45 bytes per pixel (float32 image and
# padding, float64 sums and counts, the outputs; 44 measured): ~0.75 GB here, ~4.5 GB at 10000 x 10000.
MAX_PIXELS = 4096 * 4096
# Rescale factors (image pixels -> model pixels) outside this range are refused: no OCTA device is 8x
# finer or coarser than another, but a pixel size in mm instead of um is 1000x off.
MAX_RESCALE = 8.0
OVERLAY_RGB = (255, 32, 32)  # the mask drawn over the scan: red, 60 % opaque
OVERLAY_ALPHA = 0.6
SUFFIXES = ("prob", "mask", "overlay")
SUMMARY_NAME = "segment.csv"  # one row per image: size, pixel size, rescale, quality measures and flag


@dataclass
class Job:
    """One input image: where it is, its output name, size (width, height), its own pixel size (um, from
    --pixel-size or --fov-mm; None when not given) and the factor it is resized by before segmenting."""
    path: Path
    name: str
    size: Tuple[int, int]
    pixel_size_um: Optional[float] = None
    scale: float = 1.0
    quality: Optional[Dict] = None  # after segmenting: export.quality.quality_flags of its probability map
    #                                 at the model's pixel size (where the reference was measured)


def note(message: str, kind: str = "note") -> None:
    print(f"vesselfast: {kind}: {message}", file=sys.stderr, flush=True)


def expand_inputs(inputs: List[str]) -> List[Path]:
    """Files, folders (their images, sorted) and glob patterns -> image paths; errors name the input."""
    paths: List[Path] = []
    for item in inputs:
        if any(ch in item for ch in "*?["):
            matched = sorted(Path(p) for p in glob.glob(item) if is_image_file(os.path.basename(p)))
            if not matched:
                raise UserError(f"{item}: the pattern matches no image file")
            paths += matched
        elif os.path.isdir(item):
            found = sorted(p for p in Path(item).iterdir() if p.is_file() and is_image_file(p.name))
            if not found:
                raise UserError(f"{item}: folder holds no image file ({', '.join(IMAGE_EXTS)})")
            paths += found
        elif os.path.isfile(item):
            paths.append(Path(item))
        else:
            raise UserError(f"{item}: no such file, folder or pattern")
    return paths


def unique_files(paths: List[Path]) -> List[Path]:
    """``paths`` without repeats of a file given before (``scans/`` and ``scans/x.png``), in order."""
    seen, out = set(), []
    for p in paths:
        key = os.path.normcase(str(p.resolve()))
        if key not in seen:
            seen.add(key)
            out.append(p)
    if len(out) < len(paths):
        note(f"{len(paths) - len(out)} input(s) repeat a file given before; each file is segmented once")
    return out


def output_names(paths: List[Path]) -> List[str]:
    """One output name per input, unique even on file systems that ignore case: the file's stem, except
    where inputs share one: then the folders that tell them apart and, within one folder, the extension
    (``a/x.png``, ``b/x.png`` -> ``a_x``, ``b_x``; ``x.bmp``, ``x.jpg`` -> ``x_bmp``, ``x_jpg``); a name
    still taken gets ``_2``, ``_3``..."""
    stems = [stem(p.name) for p in paths]
    names = list(stems)
    groups: Dict[str, List[int]] = defaultdict(list)
    for i, s in enumerate(stems):
        groups[s.casefold()].append(i)
    for idx in (g for g in groups.values() if len(g) > 1):
        parents = [paths[i].resolve().parent for i in idx]
        common = Path(os.path.commonpath([str(p) for p in parents]))
        for i, parent in zip(idx, parents):
            names[i] = "_".join([*parent.relative_to(common).parts, stems[i]])
        count = Counter(names[i].casefold() for i in idx)
        for i in idx:
            if count[names[i].casefold()] > 1:
                names[i] += "_" + paths[i].name[len(stems[i]):].lstrip(".").replace(".", "_").lower()
    taken = Counter(n.casefold() for n in names)
    seen = set()
    # files keep their own stem first: a/x.png named a_x yields to an input that is a_x.png
    for i in sorted(range(len(names)), key=lambda i: (names[i] != stems[i], i)):
        k, name = 2, names[i]
        while names[i].casefold() in seen or (names[i] != name and names[i].casefold() in taken):
            names[i], k = f"{name}_{k}", k + 1
        seen.add(names[i].casefold())
    renamed = [f"{p} -> {n}" for p, s, n in zip(paths, stems, names) if n != s]
    if renamed:
        note(f"{len(renamed)} inputs share a file name; their outputs are named apart: "
             + ", ".join(renamed[:3]) + (", ..." if len(renamed) > 3 else ""))
    return names


def writable_reason(folder: Path) -> Optional[str]:
    """None when a file can be created (and removed) in ``folder``; else why not. A real try rather than
    ``os.access``, which says yes to root and knows nothing of read-only file systems."""
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".vesselfast-probe.", suffix=".tmp"):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def check_output_folder(out: Path, option: str = "--out") -> None:
    """Refuses, before any work, an output folder that is a file, lies under a file or cannot be written
    (the folder itself, or where it is missing, the nearest folder above it that exists). Creates nothing."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{option} {out}: is a file, not a folder; choose a folder (it is created when missing)")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{option} {out}: {existing} is a file, so the folder cannot be created; choose another {option}")
    reason = writable_reason(existing)
    if reason:
        where = "" if existing == out else f" (its nearest existing folder {existing})"
        raise UserError(f"{option} {out}{where} is not writable ({reason}); choose another {option}")


def plan_files(inputs: List[str], out: str, pixel_size_um: Optional[float] = None, fov_mm: Optional[float] = None,
               max_pixels: int = MAX_PIXELS) -> List[Job]:
    """Everything about the inputs and the output folder that can fail, checked before any model runs or
    any output is written: ``out`` writable, inputs expanded and de-duplicated, unique output names,
    every image readable (decoder messages become one note line each) and at most ``max_pixels``."""
    from vesselfast.data.io import header_size, image_size, read_image

    check_output_folder(Path(out))
    paths = unique_files(expand_inputs(inputs))
    names = output_names(paths)
    jobs, notes = [], []
    for path, name in zip(paths, names):
        size = header_size(str(path))
        if size is None or size[0] * size[1] <= max_pixels:  # a huge file is refused before it is decoded
            size = image_size(read_image(str(path), notes))
        check_pixels(path, size, max_pixels)
        px = pixel_size_um if fov_mm is None else 1000.0 * fov_mm / size[0]
        jobs.append(Job(path, name, size, px))
    for line in notes:
        note(line, "warning")
    return jobs


def check_pixels(path: Path, size: Tuple[int, int], max_pixels: int, why: str = "") -> None:
    w, h = size
    if w * h > max_pixels:
        raise UserError(f"{path}: {w} x {h} px{why} is more than --max-pixels {max_pixels} (default 4096 x 4096; "
                        f"inference holds ~45 bytes per pixel, {45 * w * h / 1e9:.1f} GB here); crop or downscale "
                        f"it, or give --max-pixels {w * h} if the memory and time are there")


def set_scales(jobs: List[Job], model_pixel_size_um: Optional[float], max_pixels: int = MAX_PIXELS) -> str:
    """Sets each job's rescale factor (its pixel size / the model's) and checks the factor and the rescaled
    size; returns what the first output line says about it."""
    given = [j.pixel_size_um for j in jobs if j.pixel_size_um is not None]
    if not given:
        return (f"model's pixel size {model_pixel_size_um:g} um/px, images not rescaled (give --pixel-size or "
                "--fov-mm to rescale scans of another size)") if model_pixel_size_um else ""
    if not model_pixel_size_um:
        note("the model does not record the pixel size it was trained for (metadata pixel_size_um), so images "
             "are not rescaled; --pixel-size / --fov-mm only set the units of --measure")
        return "images not rescaled (the model has no pixel size)"
    for job in jobs:
        job.scale = job.pixel_size_um / model_pixel_size_um
        if not 1 / MAX_RESCALE <= job.scale <= MAX_RESCALE:
            raise UserError(f"{job.path}: {job.pixel_size_um:.4g} um/px is x{job.scale:.3g} the model's "
                            f"{model_pixel_size_um:g} um/px (at most {MAX_RESCALE:g}x either way); are the units "
                            "right (--pixel-size in micrometres per pixel, 3 mm / 304 px = 9.87; --fov-mm in "
                            "millimetres)?")
        check_pixels(job.path, rescaled_size(job.size, job.scale), max_pixels,
                     f" after rescaling x{job.scale:.3g} to the model's pixel size")
    pixel = sorted({round(j.pixel_size_um, 4) for j in jobs})
    factor = sorted({round(j.scale, 3) for j in jobs})
    span = (lambda v: f"{v[0]:g}" if len(v) == 1 else f"{v[0]:g}..{v[-1]:g}")
    return f"pixel size {span(pixel)} um/px -> model's {model_pixel_size_um:g}: images rescaled x{span(factor)}"


def rescaled_size(size: Tuple[int, int], scale: float) -> Tuple[int, int]:
    return max(1, int(round(size[0] * scale))), max(1, int(round(size[1] * scale)))


def probability_map(batch_fn, meta: Dict, raw: np.ndarray, tile: int, stride: int, batch_size: int = 8,
                    scale: float = 1.0, model_scale: bool = False):
    """Raw image -> vessel probability [H, W] at the image's own size: resized by ``scale`` first (INTER_AREA
    down, INTER_LINEAR up; skipped when the size would not change), preprocessed as the model's metadata
    says, sliding windows of ``tile`` with ``stride``, then back to the image's size (linear).
    ``model_scale``: return (that map, the map at the model's pixel size before resizing back)."""
    import cv2

    from vesselfast.data import apply_spec
    from vesselfast.inference import sliding_window_probs

    h, w = raw.shape[:2]
    nw, nh = rescaled_size((w, h), scale)
    if (nw, nh) != (w, h):
        raw = cv2.resize(raw, (nw, nh), interpolation=cv2.INTER_AREA if nw < w else cv2.INTER_LINEAR)
    image, _ = apply_spec(meta["preprocessing"], raw)
    at_model = prob = sliding_window_probs(batch_fn, image, tile, stride, batch_size)
    if prob.shape != (h, w):  # rescaled, or a model whose preprocessing scales
        prob = cv2.resize(prob, (w, h), interpolation=cv2.INTER_LINEAR)
    return (prob, at_model) if model_scale else prob


def overlay(scan: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The scan as read (grey -> RGB) with the mask's pixels blended towards red: RGB uint8 [H, W, 3]."""
    rgb = np.repeat(scan[..., None], 3, axis=2) if scan.ndim == 2 else scan.copy()
    colour = np.array(OVERLAY_RGB, np.float32)
    rgb[mask] = np.round((1 - OVERLAY_ALPHA) * rgb[mask] + OVERLAY_ALPHA * colour).astype(np.uint8)
    return rgb


def write_outputs(out_dir: Path, name: str, prob: np.ndarray, threshold: float,
                  scan: Optional[np.ndarray] = None) -> List[Path]:
    """<name>_prob.png (probability x 255), <name>_mask.png (0/255) and, given the scan,
    <name>_overlay.png (:func:`overlay`), each written atomically."""
    import cv2

    out_dir.mkdir(parents=True, exist_ok=True)
    mask = prob >= threshold
    arrays = [np.round(np.clip(prob, 0, 1) * 255), mask * 255]
    if scan is not None:
        arrays.append(overlay(scan, mask)[..., ::-1])  # RGB -> OpenCV's BGR
    written = []
    for suffix, arr in zip(SUFFIXES, arrays):
        ok, buf = cv2.imencode(".png", np.ascontiguousarray(arr.astype(np.uint8)))
        if not ok:
            raise UserError(f"{out_dir}: could not encode {name}_{suffix}.png")
        path = out_dir / f"{name}_{suffix}.png"
        atomic_write(path, lambda fh, b=buf: fh.write(b.tobytes()))
        written.append(path)
    return written


def run_jobs(batch_fn, meta: Dict, jobs: List[Job], out: str, tile: int, stride: int, batch_size: int = 8,
             with_overlay: bool = False, progress: bool = True) -> List[Path]:
    """Segments planned jobs (:func:`plan_files`, :func:`set_scales`) with ``tile`` and ``stride`` (checked by
    :meth:`vesselfast.export.Segmenter.window`) and writes their PNGs; returns the probability PNG paths."""
    from tqdm import tqdm

    from vesselfast.data.io import read_image

    from vesselfast.export.quality import quality_flags

    written, threshold = [], float(meta["threshold"])
    for job in tqdm(jobs, desc="segment", disable=not progress or None):
        raw = read_image(str(job.path))
        prob, at_model = probability_map(batch_fn, meta, raw, tile, stride, batch_size, job.scale, model_scale=True)
        # measured where the reference was: at the model's pixel size
        job.quality = quality_flags(at_model, threshold, meta.get("quality_reference"))
        written.append(write_outputs(Path(out), job.name, prob, threshold, raw if with_overlay else None)[0])
    return written


def write_summary(jobs: List[Job], out: str) -> Path:
    """``<out>/segment.csv`` (atomically): per segmented job its input, output name, size, pixel size,
    rescale factor and quality measures and flag (:mod:`vesselfast.export.quality`)."""
    import csv

    from vesselfast.export.quality import COLUMNS

    path = Path(out) / SUMMARY_NAME
    header = ["image", "name", "width_px", "height_px", "pixel_size_um", "rescale"] + list(COLUMNS)

    def cell(v):
        return f"{v:.6g}" if isinstance(v, float) else ("" if v is None else str(v))

    def write(fh):
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(header)
        for job in jobs:
            q = job.quality or {}
            w.writerow([cell(v) for v in [str(job.path), job.name, job.size[0], job.size[1], job.pixel_size_um,
                                          job.scale] + [q.get(c) for c in COLUMNS]])
    atomic_write(path, write, mode="w")
    return path


def segment_files(batch_fn, meta: Dict, inputs: List[str], out: str, tile: int, stride: int, batch_size: int = 8,
                  progress: bool = True, with_overlay: bool = False, pixel_size_um: Optional[float] = None,
                  fov_mm: Optional[float] = None, max_pixels: int = MAX_PIXELS) -> List[Path]:
    """:func:`plan_files`, :func:`set_scales` (to the metadata's ``pixel_size_um``) and :func:`run_jobs`."""
    jobs = plan_files(inputs, out, pixel_size_um, fov_mm, max_pixels)
    set_scales(jobs, meta.get("pixel_size_um"), max_pixels)
    return run_jobs(batch_fn, meta, jobs, out, tile, stride, batch_size, with_overlay, progress)

"""Segmenting image files: input expansion (files, folders, globs; the image types training reads), the
shared preprocessing, sliding-window inference, PNG output (written atomically)."""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from vesselfast.checkpoint import atomic_write
from vesselfast.data.io import IMAGE_EXTS, is_image_file
from vesselfast.errors import UserError


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


def output_names(paths: List[Path]) -> List[str]:
    """File stems, made unique where two inputs share one by the folders that tell them apart."""
    stems = [p.stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    common = Path(os.path.commonpath([str(p.resolve().parent) for p in paths]))
    return ["_".join(p.resolve().relative_to(common).with_suffix("").parts) for p in paths]


def write_outputs(out_dir: Path, name: str, prob: np.ndarray, threshold: float) -> Tuple[Path, Path]:
    """<name>_prob.png (probability x 255) and <name>_mask.png (0/255), each written atomically."""
    import cv2

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix, arr in (("prob", np.round(np.clip(prob, 0, 1) * 255)), ("mask", (prob >= threshold) * 255)):
        ok, buf = cv2.imencode(".png", arr.astype(np.uint8))
        if not ok:
            raise UserError(f"{out_dir}: could not encode {name}_{suffix}.png")
        path = out_dir / f"{name}_{suffix}.png"
        atomic_write(path, lambda fh, b=buf: fh.write(b.tobytes()))
        written.append(path)
    return written[0], written[1]


def segment_files(batch_fn, meta: Dict, inputs: List[str], out: str, tile: int, stride: int, batch_size: int = 8,
                  progress: bool = True) -> List[Path]:
    """Preprocesses each input as the model's metadata says, runs ``batch_fn`` over sliding windows of
    ``tile`` with ``stride`` (checked by :meth:`vesselfast.export.Segmenter.window`) and writes the PNGs.
    Returns the probability PNG paths."""
    from tqdm import tqdm

    from vesselfast.data import apply_spec
    from vesselfast.data.io import read_image
    from vesselfast.inference import sliding_window_probs

    paths = expand_inputs(inputs)
    names = output_names(paths)
    for path in paths:  # an unreadable image fails here, before any output is written
        read_image(str(path))
    written = []
    for path, name in tqdm(list(zip(paths, names)), desc="segment", disable=not progress or None):
        raw = read_image(str(path))
        image, _ = apply_spec(meta["preprocessing"], raw)
        prob = sliding_window_probs(batch_fn, image, tile, stride, batch_size)
        written.append(write_outputs(Path(out), name, prob, float(meta["threshold"]))[0])
    return written

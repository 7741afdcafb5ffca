"""Segmenting image files with a trained segmenter: model loading (run directory or checkpoint), input
expansion (files, folders, globs), the shared preprocessing, sliding-window inference, PNG output."""
from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from vesselfast.errors import UserError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".ppm")


def final_segmenter_path(run_dir: Path) -> Path:
    """The last co-optimisation round's segmenter of a run (segmenter_K.pt with the largest K)."""
    found = []
    for p in (Path(run_dir) / "ckpt").glob("segmenter_*.pt"):
        m = re.fullmatch(r"segmenter_(\d+)\.pt", p.name)
        if m:
            found.append((int(m.group(1)), p))
    if not found:
        raise UserError(f"--model {run_dir}: no trained segmenter in {run_dir}/ckpt; finish a vesselfast train run first")
    return max(found)[1]


def load_torch_segmenter(model_path: str):
    """(SegmenterUNet in eval mode, metadata dict with preprocessing/tile/stride/threshold)."""
    from vesselfast.models import SegmenterUNet
    from vesselfast.pipeline.rundir import load_checkpoint

    path = Path(model_path)
    if not path.exists():
        raise UserError(f"--model {model_path}: no such file or directory")
    if path.is_dir():
        path = final_segmenter_path(path)
    ck = load_checkpoint(path)
    if "channels" not in ck or "model" not in ck or "preprocessing" not in ck:
        raise UserError(f"--model {path}: not a segmenter checkpoint (kind {ck.get('kind')!r})")
    model = SegmenterUNet(1, ck["channels"])
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as exc:
        raise UserError(f"--model {path}: weights do not fit the segmenter architecture "
                        f"({str(exc).splitlines()[0][:150]})")
    meta = {k: ck[k] for k in ("preprocessing", "tile", "stride", "threshold")}
    return model.eval(), meta


def expand_inputs(inputs: List[str]) -> List[Path]:
    """Files, folders (their images, sorted) and glob patterns -> image paths; errors name the input."""
    paths: List[Path] = []
    for item in inputs:
        if any(ch in item for ch in "*?["):
            matched = sorted(Path(p) for p in glob.glob(item) if p.lower().endswith(IMAGE_EXTS))
            if not matched:
                raise UserError(f"{item}: the pattern matches no image file")
            paths += matched
        elif os.path.isdir(item):
            found = sorted(p for p in Path(item).iterdir() if p.suffix.lower() in IMAGE_EXTS)
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

    from vesselfast.pipeline.rundir import atomic_write

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

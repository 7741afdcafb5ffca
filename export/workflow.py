"""Export with checks, as ``vesselfast export`` runs it: load the checkpoint, export, check the graph
and its parity with torch, then write the file atomically (nothing is written when a check fails)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from vesselfast.errors import UserError
from vesselfast.export import metadata as M


def run_target_images(model: str, n: int) -> list:
    """The first ``n`` target training images of the run directory ``model`` (images only: labels are
    never listed), or [] when it is not a run directory or trained on the built-in data."""
    import yaml

    from vesselfast.data import detect_layout

    config = Path(model) / "config.yaml"
    if not config.is_file():
        return []
    target = (yaml.safe_load(config.read_text()) or {}).get("data", {}).get("target", "builtin")
    if not target or target == "builtin" or not Path(target).is_dir():
        return []
    return [e.image for e in detect_layout(target).entries("train", labels=False)[:n]]


def parity_images(paths: Sequence[str], spec, model: str = "", n_default: int = 2):
    """Preprocessed real images for the parity check: the given files (any size), else the run's first
    target training images, else built-in synthetic OCTA images."""
    from vesselfast.data import apply_spec, builtin_domain
    from vesselfast.data.io import read_image
    from vesselfast.export.files import expand_inputs

    if paths:
        files, described = expand_inputs(list(paths)), "the given images"
    else:
        files, described = run_target_images(model, n_default), f"{n_default} of the run's target images"
    if files:
        return [apply_spec(spec, read_image(str(p)))[0] for p in files], described
    samples = builtin_domain("target", "train", n=n_default, size=256, seed=7, read_labels=False)
    return [s.image for s in samples], f"{n_default} built-in OCTA images"


def check_writable(out: Path) -> None:
    parent = out.parent  # Path("seg.onnx").parent is Path(".")
    if not parent.is_dir():
        raise UserError(f"--out {out}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise UserError(f"--out {out}: folder {parent} is not writable; choose another --out")


@dataclass
class CardOptions:
    """What ``export`` adds to the model card besides what the run directory says (export/card.py)."""
    name: Optional[str] = None            # default: the run directory's (or checkpoint's) name
    pixel_size_um: Optional[float] = None
    terms: Optional[str] = None           # default: card.TERMS
    not_for: Optional[str] = None         # default: card.NOT_FOR
    training_data: Optional[str] = None   # default: from the run's config.yaml
    quality_images: Optional[int] = None  # target training images for the quality reference; None: all, 0: none


def export_checked(model: str, out: Path, fmt: str, opset: Optional[int] = None, fp16: bool = False,
                   check_images: Sequence[str] = (), max_batch: int = 16, max_tile: int = 1024,
                   option: str = "--model", card: Optional[CardOptions] = None) -> str:
    """Returns a short report (what was written, parity numbers, the model card). ``option``: the
    command-line option that named ``model`` (errors name it)."""
    from vesselfast.export.onnx_export import DEFAULT_OPSET, PARITY, check_parity, export_onnx, parity_inputs
    from vesselfast.export.ort_runtime import ort_batch_fn, ort_session
    from vesselfast.checkpoint import atomic_write, load_segmenter

    check_writable(out)
    if fmt == "tensorrt":  # fail before the slow part when TensorRT cannot work here
        from vesselfast.export.tensorrt_engine import require_tensorrt
        require_tensorrt()
    if max_batch < 1 or max_tile < 16:
        raise UserError(f"--max-batch {max_batch} / --max-tile {max_tile}: use at least 1 and 16")
    if opset is not None and not 14 <= opset <= 23:
        raise UserError(f"--opset {opset}: use 14..23 (default {DEFAULT_OPSET})")
    torch_model, ck_meta = load_segmenter(model, option)
    images, described = parity_images(check_images, ck_meta["preprocessing"], model)  # bad paths fail before the export
    proto, meta = export_onnx(torch_model, ck_meta, opset or DEFAULT_OPSET, fp16)
    inputs = parity_inputs(meta["size_multiple"], images)
    precision = meta["precision"]
    session, provider = ort_session(proto.SerializeToString(), "cpu")
    diff = check_parity(torch_model, ort_batch_fn(session), inputs, precision, "ONNX Runtime")
    on, tol = PARITY[precision]
    lines = [f"parity ONNX Runtime ({provider}) vs torch fp32: max |difference| {diff:.2e} on the {on} of "
             f"{len(inputs) - len(images)} random batches and {described} (tolerance {tol:g}, {precision})"]
    meta, notes = model_info(model, option, meta, ort_batch_fn(session), card or CardOptions())
    lines += notes
    M.attach_onnx(proto, meta)
    onnx_bytes = proto.SerializeToString()
    if fmt == "onnx":
        atomic_write(out, lambda fh: fh.write(onnx_bytes))
        lines.append(f"wrote {out} ({len(onnx_bytes) / 1e6:.1f} MB, opset {opset or DEFAULT_OPSET}, {precision}, "
                     f"tile {meta['tile']}, stride {meta['stride']}, threshold {meta['threshold']})")
        return "\n".join(lines)

    from vesselfast.export.tensorrt_engine import build_engine, tensorrt_batch_fn

    engine = build_engine(onnx_bytes, meta, fp16, max_batch, max_tile)
    trt_inputs = [x for x in inputs if x.shape[0] <= max_batch and max(x.shape[2:]) <= max_tile]
    diff = check_parity(torch_model, tensorrt_batch_fn(engine), trt_inputs, precision, "TensorRT")
    lines.append(f"parity TensorRT vs torch fp32: max |difference| {diff:.2e} on the {on}")
    atomic_write(M.sidecar_path(out), lambda fh: fh.write(json.dumps(meta, indent=1, sort_keys=True)), "w")
    atomic_write(out, lambda fh: fh.write(engine))
    lines.append(f"wrote {out} ({len(engine) / 1e6:.1f} MB, {precision}) and {M.sidecar_path(out).name}")
    return "\n".join(lines)


def model_info(model: str, option: str, meta: Dict, batch_fn, opts: CardOptions) -> Tuple[Dict, List[str]]:
    """``meta`` with the model card, pixel size and quality reference (from the run directory ``model``
    belongs to, if any), and lines for export's report."""
    from vesselfast.checkpoint import final_segmenter_path
    from vesselfast.export import card as C

    path = Path(model)
    stage = (final_segmenter_path(path, option) if path.is_dir() else path).stem
    run, cfg, notes = C.run_of(model), None, []
    if run is not None:
        try:
            cfg = C.load_config(run)
        except UserError as exc:  # e.g. a run of an older version with retired keys: export still works
            notes.append(f"model card: {run}/config.yaml not readable ({exc}); card without training data")
    name = opts.name or (run.name if run is not None else path.stem)
    card = C.model_card(name, run, stage, cfg, opts.terms, opts.not_for, opts.training_data)
    reference = None
    if cfg is not None and opts.quality_images != 0:
        reference, note = quality_reference(cfg, batch_fn, meta, opts.quality_images)
        notes.append(note)
    meta = M.with_model_info(meta, card, opts.pixel_size_um, reference)
    return meta, C.card_lines(meta) + notes


def quality_reference(cfg, batch_fn, meta: Dict, limit: Optional[int] = None) -> Tuple[Optional[Dict], str]:
    """The quality reference (export/quality.py) of the exported graph on the run's target training
    images, loaded as training loaded them and without their labels; (None, why) when they cannot be read."""
    import numpy as np

    from vesselfast.export.quality import measures, reference_of
    from vesselfast.inference import sliding_window_probs
    from vesselfast.pipeline.inputs import load_samples

    try:
        samples = load_samples(cfg, [cfg.data.target], "target", "train", False, seed=cfg.seed)
    except UserError as exc:
        return None, f"quality reference: not recorded (target training images not readable: {exc})"
    if any(s.mask is not None for s in samples):
        raise AssertionError("target training labels were read")  # load_samples(read_labels=False) never does
    if limit and len(samples) > limit:  # evenly spread over the folder
        samples = [samples[i] for i in np.linspace(0, len(samples) - 1, limit).round().astype(int)]
    if not samples:
        return None, "quality reference: not recorded (no target training images)"
    threshold = float(meta["threshold"])
    per_image = [measures(sliding_window_probs(batch_fn, s.image, int(meta["tile"]), int(meta["stride"])), threshold)
                 for s in samples]
    where = "built-in target" if cfg.data.target == "builtin" else f"{Path(cfg.data.target).name} train split"
    ref = reference_of(per_image, threshold, f"{len(samples)} target training images ({where}, labels unread)")
    band = ", ".join(f"{m.replace('_', ' ')} {ref[m]['p5']:.3f}-{ref[m]['p95']:.3f}"
                     for m in ("marked_share", "mean_confidence", "vessel_free"))
    return ref, f"quality reference: {ref['images']}: 5-95 % {band}"

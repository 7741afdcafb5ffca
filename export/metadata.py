"""The self-description an exported segmenter carries: everything needed to use it without our training
code (preprocessing spec, sliding-window tile and stride, threshold, input contract), and what a user
should know about it: the pixel size it was trained for, its model card (export/card.py) and the quality
reference of its per-image flag (export/quality.py). Those three are optional when reading, so files
exported before they existed stay readable (docs/MODEL_CARD.md).

Stored as one JSON string under the ONNX ``metadata_props`` key ``vesselfast`` and, for TensorRT engines
(which have no metadata field), in a ``<engine>.json`` file beside the engine.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Optional

from vesselfast.errors import UserError

KEY = "vesselfast"
FORMAT = "vesselfast-segmenter/1"
REQUIRED = ("preprocessing", "tile", "stride", "threshold", "size_multiple")
OPTIONAL = ("pixel_size_um", "model_card", "quality_reference")  # null / absent: not recorded
PIXEL_SIZE_RANGE = (0.5, 200.0)  # um per pixel; OCTA scans lie around 3-30, a value in mm would be < 0.1


def segmenter_metadata(meta: Dict, channels, size_multiple: int, precision: str = "fp32") -> Dict:
    """meta: the checkpoint's inference fields (preprocessing, tile, stride, threshold)."""
    from vesselfast import __version__

    return {
        "format": FORMAT,
        "vesselfast_version": __version__,
        "input": "x: float32 [N, 1, H, W], preprocessed to [-1, 1]; H, W multiples of size_multiple",
        "output": "logits: float32 [N, 1, H, W]; sigmoid gives the vessel probability",
        "preprocessing": meta["preprocessing"],
        "tile": int(meta["tile"]),
        "stride": int(meta["stride"]),
        "threshold": float(meta["threshold"]),
        "channels": [int(c) for c in channels],
        "size_multiple": int(size_multiple),
        "precision": precision,
    }


def with_model_info(meta: Dict, card: Optional[Dict] = None, pixel_size_um: Optional[float] = None,
                    quality_reference: Optional[Dict] = None) -> Dict:
    """``meta`` plus the optional keys, each null when unknown (explicitly "not recorded")."""
    return {**meta, "pixel_size_um": None if pixel_size_um is None else float(pixel_size_um),
            "model_card": card, "quality_reference": quality_reference}


def pixel_size(pixel_size_um: Optional[float] = None, fov_mm: Optional[float] = None,
               image_px: Optional[int] = None) -> Optional[float]:
    """Micrometres per pixel from ``--pixel-size UM`` or ``--fov-mm MM --image-px N`` (None: neither)."""
    if pixel_size_um is not None and (fov_mm is not None or image_px is not None):
        raise UserError("--pixel-size: give it or --fov-mm with --image-px, not both")
    if (fov_mm is None) != (image_px is None):
        raise UserError("--fov-mm and --image-px go together (e.g. --fov-mm 3 --image-px 304 for 9.87 um/px)")
    if fov_mm is not None:
        if not (math.isfinite(fov_mm) and fov_mm > 0) or image_px < 1:
            raise UserError(f"--fov-mm {fov_mm} --image-px {image_px}: give a width in mm > 0 and its pixels >= 1")
        pixel_size_um, where = 1000.0 * fov_mm / image_px, f"--fov-mm {fov_mm:g} --image-px {image_px}"
    elif pixel_size_um is None:
        return None
    else:
        where = f"--pixel-size {pixel_size_um:g}"
    lo, hi = PIXEL_SIZE_RANGE
    if not (math.isfinite(pixel_size_um) and lo <= pixel_size_um <= hi):
        raise UserError(f"{where}: {pixel_size_um:g} um per pixel is outside {lo:g}..{hi:g}; give micrometres "
                        "per pixel, e.g. 9.87 for a 3 mm scan of 304 px")
    return round(float(pixel_size_um), 4)


def validate(meta: Dict, where: str) -> Dict:
    missing = [k for k in REQUIRED if k not in meta]
    if meta.get("format") != FORMAT or missing:
        raise UserError(f"{where}: not a vesselfast segmenter (metadata format {meta.get('format')!r}"
                        + (f", missing {', '.join(missing)}" if missing else "")
                        + "); export it with vesselfast export --onnx")
    size = meta.get("pixel_size_um")
    wrong = [k for k in ("model_card", "quality_reference") if meta.get(k) is not None and not isinstance(meta[k], dict)]
    if size is not None and (isinstance(size, bool) or not isinstance(size, (int, float)) or not size > 0):
        wrong.insert(0, "pixel_size_um")
    if wrong:
        raise UserError(f"{where}: its vesselfast metadata has an unusable {', '.join(wrong)}; re-export it")
    return meta


def attach_onnx(model_proto, meta: Dict) -> None:
    """Sets (replacing) the ``vesselfast`` metadata entry of an onnx.ModelProto."""
    for prop in list(model_proto.metadata_props):
        if prop.key == KEY:
            model_proto.metadata_props.remove(prop)
    entry = model_proto.metadata_props.add()
    entry.key, entry.value = KEY, json.dumps(meta, sort_keys=True)
    model_proto.doc_string = "vesselfast vessel segmenter; see the 'vesselfast' metadata entry for its use"


def read_onnx(path: Path) -> Dict:
    """The metadata of an ONNX file, with errors that name the file."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, older onnx other types
        raise UserError(f"--model {path}: not a readable ONNX file ({type(exc).__name__}); re-export it")
    props = {p.key: p.value for p in model.metadata_props}
    if KEY not in props:
        raise UserError(f"--model {path}: ONNX model without vesselfast metadata; export it with "
                        "vesselfast export --onnx, or use --backend torch with a checkpoint")
    try:
        meta = json.loads(props[KEY])
    except json.JSONDecodeError:
        raise UserError(f"--model {path}: its vesselfast metadata is not valid JSON; re-export it")
    return validate(meta, f"--model {path}")


def sidecar_path(engine_path: Path) -> Path:
    return Path(str(engine_path) + ".json")


def read_sidecar(engine_path: Path) -> Dict:
    side = sidecar_path(engine_path)
    if not side.is_file():
        raise UserError(f"--model {engine_path}: no {side.name} beside the engine; rebuild it with "
                        "vesselfast export --tensorrt")
    try:
        meta = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"--model {side}: unreadable metadata ({type(exc).__name__}); rebuild the engine")
    return validate(meta, f"--model {side}")

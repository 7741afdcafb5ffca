"""The self-description an exported segmenter carries: everything needed to use it without our training
code (preprocessing spec, sliding-window tile and stride, threshold, input contract).

Stored as one JSON string under the ONNX ``metadata_props`` key ``vesselfast`` and, for TensorRT engines
(which have no metadata field), in a ``<engine>.json`` file beside the engine.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

from vesselfast.errors import UserError

KEY = "vesselfast"
FORMAT = "vesselfast-segmenter/1"
REQUIRED = ("preprocessing", "tile", "stride", "threshold", "size_multiple")


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


def validate(meta: Dict, where: str) -> Dict:
    missing = [k for k in REQUIRED if k not in meta]
    if meta.get("format") != FORMAT or missing:
        raise UserError(f"{where}: not a vesselfast segmenter (metadata format {meta.get('format')!r}"
                        + (f", missing {', '.join(missing)}" if missing else "")
                        + "); export it with vesselfast export --onnx")
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

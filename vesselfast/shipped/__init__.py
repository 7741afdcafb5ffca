"""The segmenter shipped with vesselfast: what ``vesselfast segment`` uses without ``--model``.

It was trained by the project's own ``real-cpu`` preset from labelled colour fundus photographs (DRIVE +
CHASE_DB1) to the OCTA-500 3M training images, whose labels no stage read, and exported to ONNX with its
model card and quality reference in the metadata. docs/MODELS.md is its card: data and terms, the command
and seed that re-create it, its scores on OCTA-500 3M test, the pixel size it expects and what it is not for.
"""
from __future__ import annotations

from pathlib import Path

from vesselfast.errors import UserError

NAME = "vesselfast-octa500-3m"
FILE = Path(__file__).with_name(f"{NAME}.onnx")


def model_path() -> Path:
    """The shipped ONNX file; a clear error when an install left it out."""
    if not FILE.is_file():
        raise UserError(f"the shipped model {FILE} is missing from this install (reinstall vesselfast, or give "
                        "--model with an exported .onnx or a run directory)")
    return FILE

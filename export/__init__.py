"""Deployment of trained segmenters: ONNX export with self-describing metadata, TensorRT engines, and
:class:`Segmenter`, the one inference interface for every format and runtime (docs/EXPORT.md)."""
from vesselfast.export.metadata import read_onnx as read_onnx_metadata
from vesselfast.export.onnx_export import export_onnx
from vesselfast.export.api import Segmenter

__all__ = ["Segmenter", "export_onnx", "read_onnx_metadata"]

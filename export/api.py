"""``Segmenter``: one trained vessel segmenter behind one interface, whatever its format (run directory,
checkpoint, ONNX file, TensorRT engine) and runtime (torch, ONNX Runtime, TensorRT).

    from vesselfast.export import Segmenter
    seg = Segmenter.load("seg.onnx")                  # backend "auto": ONNX Runtime for .onnx
    prob = seg.predict(image)                         # raw uint8 image [H, W] or [H, W, 3] -> [H, W] in [0, 1]
    mask = prob >= seg.threshold
    seg.segment_files(["scans/"], "out/")             # <name>_prob.png and <name>_mask.png per image

Preprocessing, tile, stride and threshold come from the model's own metadata, through the same functions
training used (:func:`vesselfast.data.apply_spec`, :func:`vesselfast.inference.sliding_window_probs`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from vesselfast.errors import UserError

BACKENDS = ("auto", "torch", "ort", "tensorrt")
ONNX_SUFFIXES = (".onnx",)
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


def model_kind(path: Path) -> str:
    """checkpoint (a run directory or .pt file) | onnx | engine."""
    if path.is_dir():
        return "checkpoint"
    if path.suffix.lower() in ONNX_SUFFIXES:
        return "onnx"
    if path.suffix.lower() in ENGINE_SUFFIXES:
        return "engine"
    return "checkpoint"


class Segmenter:
    """A loaded segmenter. ``batch_fn``: float32 [N, 1, t, t] -> logits [N, 1, t, t]; ``meta``: the
    export metadata (preprocessing, tile, stride, threshold, size_multiple)."""

    def __init__(self, batch_fn, meta: Dict, backend: str, provider: str):
        self.batch_fn, self.meta, self.backend, self.provider = batch_fn, meta, backend, provider

    # -- loading ----------------------------------------------------------------------------------
    @classmethod
    def load(cls, model: str, backend: str = "auto", device: str = "auto", fp16: bool = False,
             precision: str = "auto") -> "Segmenter":
        """model: run directory | segmenter checkpoint | .onnx | TensorRT engine (with its .json).
        A checkpoint given to ``ort`` or ``tensorrt`` is exported in memory first. ``precision`` (torch
        backend): auto | fp32 | bf16 | fp16, auto being what the device runs natively."""
        from vesselfast.export import metadata as M

        if backend not in BACKENDS:
            raise UserError(f"--backend {backend}: choose one of {', '.join(BACKENDS)}")
        path = Path(model)
        if not path.exists():
            raise UserError(f"--model {model}: no such file or directory")
        kind = model_kind(path)
        if backend == "auto":
            backend = {"checkpoint": "torch", "onnx": "ort", "engine": "tensorrt"}[kind]
        if backend == "torch" and kind != "checkpoint":
            raise UserError(f"--model {path}: --backend torch needs a run directory or checkpoint; "
                            f"run {path.suffix} files with --backend {'ort' if kind == 'onnx' else 'tensorrt'}")
        if backend == "tensorrt":  # before any slow export
            from vesselfast.export.tensorrt_engine import require_tensorrt
            require_tensorrt("--backend tensorrt")
        if kind == "engine":
            if backend != "tensorrt":
                raise UserError(f"--model {model}: a TensorRT engine runs only with --backend tensorrt")
            from vesselfast.export.tensorrt_engine import tensorrt_batch_fn

            return cls(tensorrt_batch_fn(path.read_bytes()), M.read_sidecar(path), "tensorrt", "TensorRT")
        if kind == "onnx":
            return cls.from_onnx(path.read_bytes(), M.read_onnx(path), backend, device, fp16)
        from vesselfast.checkpoint import load_segmenter

        torch_model, meta = load_segmenter(str(path))
        return cls.from_model(torch_model, meta, backend, device, precision=precision, fp16=fp16)

    @classmethod
    def from_model(cls, model, meta: Dict, backend: str = "torch", device: str = "auto", precision: str = "auto",
                   fp16: bool = False) -> "Segmenter":
        """A SegmenterUNet with its checkpoint's inference fields (preprocessing, tile, stride, threshold).
        ``torch`` runs it eagerly, channels_last (``precision`` auto | fp32 | bf16 | fp16 autocast);
        ``ort`` / ``tensorrt`` export it in memory first (``fp16``: half precision inside the graph)."""
        if backend == "torch":
            from vesselfast.export.metadata import segmenter_metadata
            from vesselfast.inference import torch_batch_fn
            from vesselfast.models.precision import resolved

            device = torch_device(device)
            precision = resolved(device, precision)
            meta = segmenter_metadata(meta, model.channels, size_multiple=1)  # eager torch takes any size
            return cls(torch_batch_fn(model.to(device), device, precision, channels_last=True), meta, "torch",
                       f"torch {device} {precision}")
        from vesselfast.export.onnx_export import export_onnx

        proto, meta = export_onnx(model, meta, fp16=fp16)
        return cls.from_onnx(proto.SerializeToString(), meta, backend, device, fp16)

    @classmethod
    def from_onnx(cls, onnx_bytes: bytes, meta: Dict, backend: str = "ort", device: str = "auto",
                  fp16: bool = False) -> "Segmenter":
        """A serialized exported graph with its metadata, in ONNX Runtime or (built now) TensorRT."""
        if backend == "ort":
            from vesselfast.export.ort_runtime import ort_batch_fn, ort_session

            session, provider = ort_session(onnx_bytes, device)
            return cls(ort_batch_fn(session), meta, "ort", provider)
        from vesselfast.export.tensorrt_engine import build_engine, tensorrt_batch_fn

        return cls(tensorrt_batch_fn(build_engine(onnx_bytes, meta, fp16)), meta, "tensorrt", "TensorRT")

    # -- inference --------------------------------------------------------------------------------
    @property
    def threshold(self) -> float:
        return float(self.meta["threshold"])

    def describe(self) -> str:
        return f"backend {self.backend} ({self.provider}), tile {self.meta['tile']}, stride {self.meta['stride']}"

    def window(self, tile: Optional[int] = None, stride: Optional[int] = None):
        """(tile, stride) after checking them against the model: tiles must be multiples of its
        ``size_multiple`` (exported graphs upsample by a constant factor)."""
        tile = int(tile or self.meta["tile"])
        stride = int(stride or self.meta["stride"])
        m = int(self.meta["size_multiple"])
        if tile < 16 or tile % m:
            below, above = tile // m * m, (tile // m + 1) * m
            hint = "" if m == 1 else f"; use {above}" if below < 16 else f"; use {below} or {above}"
            raise UserError(f"--tile {tile}: this {self.backend} model needs a multiple of {m}, at least 16{hint}")
        if not 1 <= stride <= tile:
            raise UserError(f"--stride {stride}: use 1..tile ({tile})")
        return tile, stride

    def probabilities(self, image: np.ndarray, tile: Optional[int] = None, stride: Optional[int] = None,
                      batch_size: int = 8) -> np.ndarray:
        """Preprocessed image float32 [H, W] in [-1, 1] -> vessel probability [H, W]."""
        from vesselfast.inference import sliding_window_probs

        tile, stride = self.window(tile, stride)
        return sliding_window_probs(self.batch_fn, image, tile, stride, batch_size)

    def preprocess(self, raw: np.ndarray) -> np.ndarray:
        from vesselfast.data import apply_spec

        return apply_spec(self.meta["preprocessing"], raw)[0]

    def predict(self, raw: np.ndarray, **window) -> np.ndarray:
        """Raw uint8 image (as read from disk) -> vessel probability [H', W'] (H', W' after the model's
        preprocessing scale, the input size for OCTA models)."""
        return self.probabilities(self.preprocess(raw), **window)

    def segment_files(self, inputs: List[str], out: str, tile: Optional[int] = None, stride: Optional[int] = None,
                      batch_size: int = 8, progress: bool = True) -> List[Path]:
        """Files, folders or globs -> ``<out>/<name>_prob.png`` and ``_mask.png``; returns the prob paths."""
        from vesselfast.export.files import segment_files

        tile, stride = self.window(tile, stride)
        return segment_files(self.batch_fn, self.meta, inputs, out, tile, stride, batch_size, progress)


def torch_device(device: str) -> str:
    import torch

    if device in ("auto", ""):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: torch {torch.__version__} sees no CUDA GPU; use --device cpu")
    if not (device == "cpu" or device.startswith("cuda")):
        raise UserError(f"--device {device}: use auto, cpu or cuda[:N]")
    return device

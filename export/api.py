"""``Segmenter``: one trained vessel segmenter behind one interface, whatever its format (run directory,
checkpoint, ONNX file, TensorRT engine) and runtime (torch, ONNX Runtime, TensorRT).

    from vesselfast.export import Segmenter
    seg = Segmenter.load("seg.onnx")                  # backend "auto": ONNX Runtime for .onnx
    prob = seg.predict(image)                         # raw uint8 image [H, W] or [H, W, 3] -> [H, W] in [0, 1]
    mask = prob >= seg.threshold
    seg.segment_files(["scans/"], "out/")             # <name>_prob.png and <name>_mask.png per image
    seg.predict(image, pixel_size_um=15.0)            # a 6 mm / 400 px scan, rescaled to the model's pixel size

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

    @property
    def pixel_size_um(self) -> Optional[float]:
        """Micrometres per pixel of the images the model was trained on (metadata ``pixel_size_um``), if known."""
        value = self.meta.get("pixel_size_um")
        return float(value) if value else None

    def describe(self, tile: Optional[int] = None, stride: Optional[int] = None) -> str:
        """Backend, provider and the sliding window used (``window(tile, stride)``: the options' values)."""
        tile, stride = self.window(tile, stride)
        return f"backend {self.backend} ({self.provider}), tile {tile}, stride {stride}"

    def window(self, tile: Optional[int] = None, stride: Optional[int] = None):
        """(tile, stride) after checking them against the model: tiles must be multiples of its
        ``size_multiple`` (exported graphs upsample by a constant factor). A tile without a stride keeps the
        model's overlap (stride / tile)."""
        check_window(tile, stride)
        model_tile, model_stride = int(self.meta["tile"]), int(self.meta["stride"])
        tile = model_tile if tile is None else int(tile)
        if stride is None:
            stride = model_stride if tile == model_tile else max(1, round(tile * model_stride / model_tile))
        m = int(self.meta["size_multiple"])
        if tile % m:
            below, above = tile // m * m, (tile // m + 1) * m
            hint = f"; use {above}" if below < MIN_TILE else f"; use {below} or {above}"
            raise UserError(f"--tile {tile}: this {self.backend} model needs a multiple of {m}, at least "
                            f"{MIN_TILE}{hint}")
        if stride > tile:
            raise UserError(f"--stride {stride}: use 1..tile ({tile}); a stride above the tile would skip pixels")
        return tile, int(stride)

    def probabilities(self, image: np.ndarray, tile: Optional[int] = None, stride: Optional[int] = None,
                      batch_size: int = 8) -> np.ndarray:
        """Preprocessed image float32 [H, W] in [-1, 1] -> vessel probability [H, W]."""
        from vesselfast.inference import sliding_window_probs

        tile, stride = self.window(tile, stride)
        return sliding_window_probs(self.batch_fn, image, tile, stride, batch_size)

    def preprocess(self, raw: np.ndarray) -> np.ndarray:
        from vesselfast.data import apply_spec

        return apply_spec(self.meta["preprocessing"], raw)[0]

    def predict(self, raw: np.ndarray, pixel_size_um: Optional[float] = None, tile: Optional[int] = None,
                stride: Optional[int] = None, batch_size: int = 8, model_scale: bool = False):
        """Raw uint8 image (as read from disk) -> vessel probability [H, W] at the image's size.
        ``pixel_size_um`` (the image's micrometres per pixel): resize it to the model's pixel size first
        and the probabilities back (no rescale when either is unknown). ``model_scale``: return (that map,
        the map at the model's pixel size), the one the quality flag is taken on."""
        from vesselfast.export.files import probability_map

        scale = pixel_size_um / self.pixel_size_um if pixel_size_um and self.pixel_size_um else 1.0
        tile, stride = self.window(tile, stride)
        return probability_map(self.batch_fn, self.meta, raw, tile, stride, batch_size, scale, model_scale)

    def segment_files(self, inputs: List[str], out: str, tile: Optional[int] = None, stride: Optional[int] = None,
                      batch_size: int = 8, progress: bool = True, overlay: bool = False,
                      pixel_size_um: Optional[float] = None, fov_mm: Optional[float] = None,
                      max_pixels: Optional[int] = None) -> List[Path]:
        """Files, folders or globs -> ``<out>/<name>_prob.png``, ``_mask.png`` (and ``_overlay.png``); returns
        the prob paths. Every check runs first (:func:`vesselfast.export.files.plan_files`)."""
        from vesselfast.export import files

        tile, stride = self.window(tile, stride)
        jobs = files.plan_files(inputs, out, pixel_size_um, fov_mm, max_pixels or files.MAX_PIXELS)
        files.set_scales(jobs, self.pixel_size_um, max_pixels or files.MAX_PIXELS)
        return self.run_jobs(jobs, out, tile, stride, batch_size, overlay, progress)

    def run_jobs(self, jobs, out: str, tile: int, stride: int, batch_size: int = 8, overlay: bool = False,
                 progress: bool = True) -> List[Path]:
        """Planned jobs (:func:`vesselfast.export.files.plan_files`) -> their PNGs; the prob paths."""
        from vesselfast.export.files import run_jobs

        return run_jobs(self.batch_fn, self.meta, jobs, out, tile, stride, batch_size, overlay, progress)


MIN_TILE = 16  # the default network pools a window 4 times; 16 px is 1 px at its bottom


def check_window(tile: Optional[int], stride: Optional[int]) -> None:
    """The model-independent part of :meth:`Segmenter.window` (before a model is loaded); None: the model's."""
    if tile is not None and tile < MIN_TILE:
        raise UserError(f"--tile {tile}: the sliding window needs at least {MIN_TILE} px (the network halves it "
                        "4 times); leave --tile out for the model's own")
    if stride is not None and stride < 1:
        raise UserError(f"--stride {stride}: use 1..tile; the window must move by at least 1 px (leave --stride "
                        "out for the model's own overlap)")


def torch_device(device: str) -> str:
    import torch

    if device in ("auto", ""):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: torch {torch.__version__} sees no CUDA GPU; use --device cpu")
    if not (device == "cpu" or device.startswith("cuda")):
        raise UserError(f"--device {device}: use auto, cpu or cuda[:N]")
    return device

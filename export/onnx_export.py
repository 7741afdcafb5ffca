"""Segmenter -> self-describing ONNX: dynamic batch, height and width (multiples of the network's
``size_multiple``), the preprocessing in the metadata, ``onnx.checker`` and a torch parity check."""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from vesselfast.errors import UserError
from vesselfast.export import metadata as M

DEFAULT_OPSET = 18
# What the parity check compares and how far it lets the export deviate from float32 torch: fp32 graphs
# on the logits themselves; fp16 graphs (11-bit mantissas through ~20 convolutions, logits up to ~20) on
# the probabilities users see, where 2e-2 is 5 grey levels of the probability PNG. (torch's own fp16
# forward differs from fp32 by up to 0.012 on 256-px OCTA images with the quick-preset segmenter.)
PARITY = {"fp32": ("logits", 1e-4), "fp16": ("probabilities", 2e-2)}


class _Half(torch.nn.Module):
    """fp16 weights and activations inside, float32 input and output (callers need not change)."""

    def __init__(self, model):
        super().__init__()
        self.model = model.half()

    def forward(self, x):
        return self.model(x.half()).float()


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter logs progress and optional-package notes (torchvision) at WARNING level."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def export_model(model, fp16: bool = False) -> torch.nn.Module:
    """The module that gets exported: a copy in eval mode with the constant-factor upsampling."""
    model = copy.deepcopy(model).float().eval().cpu()
    model.fixed_upsample = True
    return _Half(model) if fp16 else model


def export_onnx(model, meta: Dict, opset: int = DEFAULT_OPSET, fp16: bool = False) -> Tuple[object, Dict]:
    """SegmenterUNet + checkpoint inference fields -> (onnx.ModelProto carrying the export metadata,
    that metadata)."""
    import onnx

    module = export_model(model, fp16)
    m = model.size_multiple
    example = torch.zeros(2, 1, 4 * m, 3 * m)
    dims = {0: torch.export.Dim("batch", min=1, max=4096),
            2: m * torch.export.Dim("h_blocks", min=1, max=4096), 3: m * torch.export.Dim("w_blocks", min=1, max=4096)}
    with warnings.catch_warnings(), torch.no_grad(), _quiet_exporter():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter is not the user's business
        try:
            program = torch.onnx.export(module, (example,), None, dynamo=True, verbose=False, opset_version=opset,
                                        input_names=["x"], output_names=["logits"],
                                        dynamic_shapes={"x": dims}, optimize=True)
        except Exception as exc:
            raise UserError(f"--opset {opset}: the ONNX export failed ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200]}); try the default opset {DEFAULT_OPSET}")
    proto = program.model_proto
    meta = M.segmenter_metadata(meta, model.channels, m, "fp16" if fp16 else "fp32")
    M.attach_onnx(proto, meta)
    onnx.checker.check_model(proto, full_check=True)
    return proto, meta


def parity_inputs(size_multiple: int, images: Sequence[np.ndarray] = (), seed: int = 0) -> List[np.ndarray]:
    """Random batches of several shapes plus each preprocessed image (padded with background to a
    multiple of ``size_multiple``), as float32 [N, 1, H, W]."""
    from vesselfast.data.preprocess import BACKGROUND

    rng = np.random.default_rng(seed)
    m = size_multiple
    batches = [rng.uniform(-1, 1, size=(n, 1, h * m, w * m)).astype(np.float32) for n, h, w in ((1, 4, 4), (3, 2, 5))]
    for image in images:
        h, w = (-(-s // m) * m for s in image.shape)
        padded = np.full((1, 1, h, w), BACKGROUND, np.float32)
        padded[0, 0, :image.shape[0], :image.shape[1]] = image
        batches.append(padded)
    return batches


def max_abs_difference(torch_model, batch_fn, inputs: Sequence[np.ndarray], on: str = "logits") -> float:
    """max |batch_fn(x) - torch_model(x)| over the inputs, on logits or sigmoid probabilities (float32 torch
    in eval mode is the reference)."""
    torch_model = torch_model.float().eval()
    post = (lambda z: 1.0 / (1.0 + np.exp(-z.astype(np.float64)))) if on == "probabilities" else (lambda z: z)
    worst = 0.0
    with torch.no_grad():
        for x in inputs:
            ref = torch_model(torch.from_numpy(x)).numpy()
            worst = max(worst, float(np.abs(post(batch_fn(x)) - post(ref)).max()))
    return worst


def check_parity(torch_model, batch_fn, inputs: Sequence[np.ndarray], precision: str, what: str) -> float:
    """Raises UserError when the exported model disagrees with torch by more than PARITY allows."""
    on, tol = PARITY[precision]
    diff = max_abs_difference(torch_model, batch_fn, inputs, on)
    if not np.isfinite(diff) or diff > tol:
        raise UserError(f"{what}: parity check failed, max |{what} - torch| = {diff:.3g} on the {on} exceeds "
                        f"{tol:g} ({precision}); nothing was written. Please report this")
    return diff

"""Mixed precision and memory format, switchable from the config.

``precision`` is ``fp32``, ``bf16`` (autocast), ``fp16`` (autocast with gradient scaling, GPUs only) or
``auto``, which :func:`vesselfast.hardware.resolve_precision` turns into what this machine runs natively.
Memory format: channels_last for every inference and for the segmenter's training, NCHW for the
generator's training. Measured on both CPU classes (docs/PRECISION.md): channels_last made inference
and segmenter training faster in fp32 and bf16 alike, so it does not depend on the CPU.
"""
from __future__ import annotations

import contextlib
from typing import Dict

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def resolved(device: torch.device | str, precision: str) -> str:
    """``precision`` with ``auto`` replaced by this machine's choice for ``device``."""
    if precision == "auto":
        from vesselfast.hardware import resolve_precision
        return resolve_precision("auto", device)[0]
    return precision


def autocast(device: torch.device | str, precision: str):
    """torch.autocast for 'bf16' / 'fp16', a no-op for 'fp32'; 'auto' as :func:`resolved`. fp16 is GPU-only."""
    precision = resolved(device, precision)
    if precision not in _DTYPES:
        raise ValueError(f"precision must be one of auto, {', '.join(sorted(_DTYPES))}, got {precision!r}")
    dtype = _DTYPES[precision]
    device_type = torch.device(device).type
    if dtype is None:
        return contextlib.nullcontext()
    if dtype is torch.float16 and device_type == "cpu":
        raise ValueError("fp16 autocast is for GPUs; use bf16 or auto on CPU")
    return torch.autocast(device_type=device_type, dtype=dtype)


class GradScaling:
    """``loss.backward()`` and ``opt.step()``, through a :class:`torch.amp.GradScaler` when training in
    fp16 (whose 5 exponent bits would flush small gradients to zero), plainly otherwise. ``state()`` is
    what a training checkpoint must hold to resume exactly: the scaler under fp16, nothing otherwise."""

    def __init__(self, precision: str, device: torch.device | str):
        fp16 = resolved(device, precision) == "fp16"
        self.scaler = torch.amp.GradScaler(torch.device(device).type) if fp16 else None

    def backward_step(self, loss: torch.Tensor, opt: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            loss.backward()
            opt.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(opt)  # skipped when the scaled gradients overflowed
        self.scaler.update()

    def state(self) -> Dict[str, object]:
        return {} if self.scaler is None else {"scaler": self.scaler}


def to_memory_format(module_or_tensor, channels_last: bool):
    return module_or_tensor.to(memory_format=torch.channels_last) if channels_last else module_or_tensor

"""Mixed precision and memory format, switchable from the config (DESIGN.md section 3 has the numbers:
bf16 autocast 1.5-2.3x on this CPU; channels_last helps inference and the segmenter, but made generator
training 1.8x slower)."""
from __future__ import annotations

import contextlib

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def autocast(device: torch.device | str, precision: str):
    """torch.autocast for 'bf16' / 'fp16', a no-op for 'fp32'. fp16 is GPU-only."""
    if precision not in _DTYPES:
        raise ValueError(f"precision must be one of {sorted(_DTYPES)}, got {precision!r}")
    dtype = _DTYPES[precision]
    device_type = torch.device(device).type
    if dtype is None:
        return contextlib.nullcontext()
    if dtype is torch.float16 and device_type == "cpu":
        raise ValueError("fp16 autocast is for GPUs; use bf16 on CPU")
    return torch.autocast(device_type=device_type, dtype=dtype)


def to_memory_format(module_or_tensor, channels_last: bool):
    return module_or_tensor.to(memory_format=torch.channels_last) if channels_last else module_or_tensor

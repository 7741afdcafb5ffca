"""Backend registry of the fused ops: one door per op, several implementations behind it.

Backends, in order of preference for ``backend="auto"``:
- CUDA tensors: ``cuda`` (compiled kernels of vesselfast._C), ``triton`` (JIT kernels in
  vesselfast.kernels), ``torch`` (the plain reference);
- CPU tensors: ``cpu`` (compiled C++/OpenMP kernels of vesselfast._C), ``torch``.
``cuda`` comes before ``triton`` because it needs no JIT warm-up; neither has been measured against
the other on a GPU yet (docs/BENCHMARKS.md says so).

``VESSELFAST_BACKEND=<name>`` replaces ``auto`` everywhere (handy to compare or to rule a kernel out).
An explicit backend that cannot run raises :class:`BackendUnavailable` saying why; ``auto`` never fails,
since ``torch`` always runs. Triton kernels run on CPU tensors only under ``TRITON_INTERPRET=1``
(Triton's interpreter, used by the tests), and ``auto`` never picks them there.

The public functions ask :func:`resolve`, which ``torch.compile`` runs as plain Python while it traces
(it is marked a constant result): the choice is made once per compiled graph and nothing of the registry
(environment, import checks) is traced.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Dict, List, Optional

import torch

from vesselfast import _ext

BACKENDS = ("cuda", "triton", "cpu", "torch")
ENV_VAR = "VESSELFAST_BACKEND"


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


@functools.lru_cache(maxsize=None)
def triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising something else
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def backend_unavailable_reason(backend: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """None when ``backend`` can run on tensors of ``device`` (and ``dtype``), else a human-readable reason."""
    device = torch.device(device)
    if backend == "torch":
        return None
    if backend in BACKENDS and dtype is not None and dtype not in KERNEL_DTYPES:
        return f"the {backend} kernels take float32, bfloat16 or float16 tensors, not {dtype}"
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend runs on CPU tensors, these are on {device}"
        return None if _ext.cpu_built() else _ext.ERROR
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, these are on {device}"
        if not _ext.cpu_built():
            return _ext.ERROR
        if not _ext.cuda_built():
            return ("vesselfast._C was built without CUDA kernels (CPU torch or no CUDA toolkit at "
                    "install time); reinstall with a CUDA torch and CUDA_HOME set")
        return None
    if backend == "triton":
        err = triton_import_error()
        if err:
            return err
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpret():
            return None
        return f"triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); got {device}"
    return f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)} or 'auto'"


class Op:
    """One fused op: a reference implementation plus optional faster backends."""

    def __init__(self, name: str, reference: Callable):
        self.name = name
        self.impls: Dict[str, Callable] = {"torch": reference}

    def _reason(self, backend: str, device, dtype=None) -> Optional[str]:
        reason = backend_unavailable_reason(backend, device, dtype)
        if reason is None and backend not in self.impls:
            reason = f"{self.name} has no {backend} implementation"
        return reason

    def available(self, device) -> List[str]:
        return [b for b in BACKENDS if self._reason(b, device) is None]

    def pick(self, device, backend: str = "auto", dtype: Optional[torch.dtype] = None) -> str:
        """Name of the backend that will run for tensors on ``device`` (of ``dtype``, when given)."""
        requested = backend
        if backend == "auto":
            backend = os.environ.get(ENV_VAR, "").strip() or "auto"
        if backend == "auto":
            dev = torch.device(device)
            order = ("cuda", "triton", "torch") if dev.type == "cuda" else ("cpu", "torch")
            return next(b for b in order if self._reason(b, dev, dtype) is None)
        reason = self._reason(backend, device, dtype)
        if reason is not None:
            source = f" (from {ENV_VAR})" if requested == "auto" else ""
            raise BackendUnavailable(f"{self.name}: backend {backend!r}{source} cannot run: {reason}")
        return backend


OPS: Dict[str, Op] = {}


def new_op(name: str, reference: Callable) -> Op:
    op = Op(name, reference)
    OPS[name] = op
    return op


@torch.compiler.assume_constant_result
def resolve(op_name: str, device: torch.device, backend: str = "auto", dtype: Optional[torch.dtype] = None) -> str:
    """``OPS[op_name].pick(device, backend, dtype)``. Under ``torch.compile`` this runs once, in Python,
    when a call is traced, and its answer is a constant of the graph; the device and dtype of the tensors
    are guarded anyway, ``VESSELFAST_BACKEND`` is read at that moment (set it before compiling)."""
    return OPS[op_name].pick(device, backend, dtype)


def describe() -> dict:
    """Per op: backends available on CPU (and CUDA when present) and what ``auto`` picks."""
    out = {}
    for name, op in OPS.items():
        entry = {"implemented": sorted(op.impls), "available": op.available("cpu"), "auto_cpu": op.pick("cpu")}
        if torch.cuda.is_available():
            entry["available_cuda"] = op.available("cuda")
            entry["auto_cuda"] = op.pick("cuda")
        out[name] = entry
    return out

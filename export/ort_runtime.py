"""ONNX Runtime sessions for exported segmenters: CPU provider with one intra-op thread per usable core
and full graph optimisation (which includes the NCHWc layout on x86); the CUDA provider when
onnxruntime-gpu and a GPU are present."""
from __future__ import annotations

import os
from typing import Union

import numpy as np

from vesselfast.errors import UserError


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def choose_providers(device: str = "auto"):
    """device: auto | cpu | cuda -> ONNX Runtime provider list, with a clear error for impossible asks."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in have:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise UserError("--device cuda: this onnxruntime has no CUDA provider (have "
                        f"{', '.join(have)}); pip install onnxruntime-gpu on a machine with an NVIDIA GPU")
    return ["CPUExecutionProvider"]


def ort_session(model: Union[str, bytes], device: str = "auto", threads: int = 0):
    """(InferenceSession, name of the provider that runs it). ``model``: a path or serialized bytes."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # One thread per core the process may use: more oversubscribes, and inter-op parallelism does not
    # help a chain of convolutions.
    opts.intra_op_num_threads = threads or usable_cores()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(model, opts, providers=choose_providers(device))
    except UserError:
        raise
    except Exception as exc:
        where = model if isinstance(model, str) else "the exported model"
        raise UserError(f"--model {where}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:200]})")
    return session, session.get_providers()[0]


def ort_batch_fn(session) -> "callable":
    """Wraps a session for :func:`vesselfast.inference.sliding_window_probs`."""
    name = session.get_inputs()[0].name

    def fn(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {name: np.ascontiguousarray(batch, dtype=np.float32)})[0]

    return fn


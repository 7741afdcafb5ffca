"""TensorRT engines from the exported ONNX graph, and a runner for them. Needs the ``tensorrt`` package
(10.x API: named I/O tensors, ``execute_async_v3``) and a CUDA GPU; everything else in vesselfast works
without either, so the imports live inside the functions."""
from __future__ import annotations

from typing import Dict

import numpy as np

from vesselfast.errors import UserError

MAX_BATCH = 16
MAX_TILE = 1024


def require_tensorrt(option: str = "--tensorrt"):
    """The tensorrt module, or a UserError that says what is missing."""
    try:
        import tensorrt as trt
    except ImportError:
        raise UserError(f"{option}: the tensorrt package is not installed; on a machine with an NVIDIA GPU "
                        "run pip install tensorrt (or pip install 'vesselfast[gpu]')")
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"{option}: no CUDA GPU is visible to torch ({torch.__version__}); TensorRT engines are "
                        "built and run on the GPU that will use them")
    return trt


def build_engine(onnx_bytes: bytes, meta: Dict, fp16: bool = False, max_batch: int = MAX_BATCH,
                 max_tile: int = MAX_TILE) -> bytes:
    """Serialized engine for inputs [1..max_batch, 1, m..max_tile, m..max_tile], optimised for the
    model's own tile. TF32 is switched off so that an fp32 engine meets the fp32 parity tolerance."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"--tensorrt: TensorRT cannot parse the exported ONNX graph ({errors[:300]})")
    config = builder.create_builder_config()
    config.clear_flag(trt.BuilderFlag.TF32)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    m, tile = int(meta["size_multiple"]), int(meta["tile"])
    if max_tile % m or max_tile < tile:
        raise UserError(f"--max-tile {max_tile}: use a multiple of {m} of at least the model's tile {tile}")
    profile = builder.create_optimization_profile()
    profile.set_shape("x", (1, 1, m, m), (min(8, max_batch), 1, tile, tile), (max_batch, 1, max_tile, max_tile))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise UserError("--tensorrt: TensorRT could not build an engine (see its messages above)")
    return bytes(engine)


def tensorrt_batch_fn(engine_bytes: bytes):
    """Wraps a serialized engine for :func:`vesselfast.inference.sliding_window_probs` (float32 in and
    out, torch CUDA tensors as device buffers on the current stream)."""
    trt = require_tensorrt("--backend tensorrt")
    import torch

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_bytes)
    if engine is None:
        raise UserError("--model: TensorRT cannot load this engine (built by another TensorRT version or GPU?); "
                        "rebuild it with vesselfast export --tensorrt")
    context = engine.create_execution_context()

    def fn(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).cuda()
        context.set_input_shape("x", tuple(x.shape))
        out = torch.empty(tuple(context.get_tensor_shape("logits")), dtype=torch.float32, device="cuda")
        context.set_tensor_address("x", x.data_ptr())
        context.set_tensor_address("logits", out.data_ptr())
        stream = torch.cuda.current_stream()
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return out.cpu().numpy()

    return fn

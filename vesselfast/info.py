"""What this install can run: versions, extension build, Triton, and the backend of every fused op."""
from __future__ import annotations

import platform

import torch

from vesselfast import __version__, _ext, allocator, hardware


def _heavy_allocator() -> str:
    choice = allocator.plan()
    return "system (VESSELFAST_ALLOCATOR=system)" if choice == "system" else choice


def _version(module: str):
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or broken: report, do not fail
        return None


def _runtimes() -> dict:
    """Inference runtimes for exported segmenters (vesselfast segment --backend ort|tensorrt)."""
    try:
        import onnxruntime
        providers = onnxruntime.get_available_providers()
    except Exception:  # not installed or broken: report, do not fail
        providers = []
    return {"onnxruntime_providers": providers, "tensorrt": _version("tensorrt")}


def collect() -> dict:
    from vesselfast import ops  # registers every op
    from vesselfast.ops.registry import triton_import_error

    mod, reason = _ext.load()
    triton_err = triton_import_error()
    return {
        "vesselfast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cpu_threads": torch.get_num_threads(),
        "hardware": hardware.describe(),
        "allocator": {"this_process": allocator.current(), "heavy_commands": _heavy_allocator()},
        "versions": {m: _version(m) for m in ("numpy", "scipy", "cv2", "onnx", "onnxruntime", "triton")},
        "extension": {"cpu": mod is not None, "cuda": _ext.cuda_built(), "error": reason or None},
        "triton": {"available": triton_err is None, "error": triton_err},
        "ops": ops.describe(),
        "runtimes": _runtimes(),
    }


def format_text(info: dict) -> str:
    ext, hw = info["extension"], info["hardware"]
    lines = [
        f"vesselfast {info['vesselfast']}  python {info['python']}  torch {info['torch']}"
        f" (CUDA {info['torch_cuda'] or 'none'}, GPU {'yes' if info['cuda_available'] else 'no'})"
        f"  threads {info['cpu_threads']}",
        "  " + "  ".join(f"{k} {v or '-'}" for k, v in info["versions"].items()),
        f"cpu: {hw['cpu_model']}, torch capability {hw['cpu_capability']}, {hw['native_bf16_reason']}"
        f" -> precision auto = {hw['auto_cpu']} on CPU" + (f", {hw['auto_cuda']} on CUDA" if "auto_cuda" in hw else ""),
        f"extension vesselfast._C: cpu={'built' if ext['cpu'] else 'missing'}"
        f" cuda={'built' if ext['cuda'] else 'not built'}" + (f"  ({ext['error']})" if ext["error"] else ""),
        f"triton: {'available' if info['triton']['available'] else info['triton']['error']}",
        f"segment runtimes: onnxruntime providers {', '.join(info['runtimes']['onnxruntime_providers']) or 'none'};"
        f" tensorrt {info['runtimes']['tensorrt'] or 'not installed'}",
        f"allocator for train/eval/segment/bench: {info['allocator']['heavy_commands']}"
        " (tcmalloc > mimalloc > glibc-tuned, by what is installed; VESSELFAST_ALLOCATOR=system to turn off)",
        "fused ops (auto picks the first available of cuda, triton, cpu, torch for the tensor's device):",
    ]
    for name, op in info["ops"].items():
        line = f"  {name:<18} cpu tensors -> {op['auto_cpu']:<6} available: {', '.join(op['available'])}"
        if "auto_cuda" in op:
            line += f" | cuda tensors -> {op['auto_cuda']} available: {', '.join(op['available_cuda'])}"
        lines.append(line)
    return "\n".join(lines)

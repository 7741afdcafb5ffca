"""What this machine runs fast, and the precision ``auto`` stands for on it.

Mixed precision only pays where the hardware executes it. On CPUs with native BF16 (AVX512_BF16 or AMX,
e.g. AMD Zen 4/5, Intel Sapphire Rapids) bf16 autocast made our networks 1.3-2x faster than fp32; on CPUs
without it (AVX2-only: Intel before Cooper Lake, AMD before Zen 4; AVX-512 without BF16) oneDNN emulates
bf16 and a generator training step took 21x longer than in fp32 (docs/PRECISION.md has the table).

So ``auto`` (the default of ``generator.precision``, ``segmenter.precision`` and of ``--precision`` in
``segment``, ``eval`` and ``bench``) means:
- CPU: ``bf16`` when torch reports native BF16 (its own checks: oneDNN's bf16 support, which honours
  ``ONEDNN_MAX_CPU_ISA``, and the CPU's AVX512_BF16 / AMX flags on x86), else ``fp32``;
- CUDA: ``bf16`` where the device has it (compute capability >= 8.0), else ``fp16`` with gradient
  scaling on devices with tensor cores (>= 7.0: 2-4x over fp32 there), else ``fp32``.
Decisions depend on what the hardware reports, never on a list of model names.
"""
from __future__ import annotations

import functools
import platform
from typing import Dict, Optional, Tuple

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@functools.lru_cache(maxsize=None)
def cpu_model() -> str:
    """The CPU's model name as the kernel reports it, with its family and model numbers (virtual machines
    often report a bare "AMD EPYC": family 25 model 1 is Zen 3, family 26 is Zen 5)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def cpu_capability() -> str:
    """torch's vector capability for its own CPU kernels (``AVX512``, ``AVX2``, ``DEFAULT``, ...)."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - very old torch or an exotic build: report, do not fail
        return "unknown"


def _torch_check(name: str) -> Optional[bool]:
    fn = getattr(torch.cpu, name, None)
    try:
        return None if fn is None else bool(fn())
    except Exception:  # noqa: BLE001 - not answerable on this build
        return None


@functools.lru_cache(maxsize=None)
def native_bf16_cpu() -> Tuple[bool, str]:
    """(True when this CPU executes bf16 matrix work natively, the reason in words)."""
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001 - torch built without oneDNN
        onednn = False
    if not onednn:
        return False, "oneDNN has no bf16 kernels for this CPU (or ONEDNN_MAX_CPU_ISA caps them)"
    if platform.machine().lower() in ("x86_64", "amd64", "i686", "x86"):
        flags = [name for name, check in (("AVX512_BF16", "_is_avx512_bf16_supported"),
                                         ("AMX", "_is_amx_tile_supported")) if _torch_check(check)]
        if not flags:
            return False, "no AVX512_BF16 or AMX: oneDNN would emulate bf16 with fp32 instructions"
        return True, f"native BF16 ({', '.join(flags)})"
    return True, "native BF16 (oneDNN reports bf16 support on this CPU)"


def _cuda_capability(device) -> Tuple[int, int]:
    return torch.cuda.get_device_capability(torch.device(device))


def cuda_bf16(device) -> bool:
    dev = torch.device(device)
    try:
        with torch.cuda.device(dev):
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch < 2.3: no including_emulation; fall back to the capability
        return _cuda_capability(dev) >= (8, 0)


def resolve_precision(requested: str, device) -> Tuple[str, str]:
    """(precision to run, why). ``requested`` other than ``auto`` is returned as it is."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if requested != "auto":
        return requested, "set explicitly"
    dev = torch.device(device)
    if dev.type == "cuda":
        if cuda_bf16(dev):
            return "bf16", f"auto: {torch.cuda.get_device_name(dev)} has bf16"
        major, minor = _cuda_capability(dev)
        if (major, minor) >= (7, 0):
            return "fp16", (f"auto: {torch.cuda.get_device_name(dev)} (sm_{major}{minor}) has no bf16; fp16 "
                            "tensor cores with gradient scaling")
        return "fp32", f"auto: {torch.cuda.get_device_name(dev)} (sm_{major}{minor}) has neither bf16 nor tensor cores"
    if dev.type == "cpu":
        native, why = native_bf16_cpu()
        return ("bf16" if native else "fp32"), f"auto on {cpu_model()}: {why}"
    return "fp32", f"auto: no mixed precision on {dev.type}"


def emulation_warning(device, settings: Dict[str, str]) -> Optional[str]:
    """One line naming every setting (name -> precision, e.g. ``{"generator.precision": "bf16"}`` or
    ``{"--precision": "bf16"}``) that would run bf16 emulated on this CPU, with the fix; else None."""
    names = [name for name, precision in settings.items() if precision == "bf16"]
    if not names or torch.device(device).type != "cpu":
        return None
    native, why = native_bf16_cpu()
    if native:
        return None
    fix = " ".join(f"{n} auto" if n.startswith("--") else f"--set {n}=auto" for n in names)
    return (f"{' and '.join(names)} bf16 on {cpu_model()} ({cpu_capability()}): {why}, so bf16 is emulated "
            f"here and runs 10-20x slower than fp32; use {fix} (fp32 on this CPU)")


def option_precision(requested: str, device, option: str = "--precision") -> Tuple[str, Optional[str]]:
    """A command's ``--precision`` for ``device``: (precision to run, a warning line when it runs
    emulated, else None). fp16 on a CPU is refused with a UserError naming the option."""
    from vesselfast.errors import UserError

    if torch.device(device).type == "cpu" and requested == "fp16":
        raise UserError(f"{option} fp16 needs a GPU; use {option} auto (or bf16 / fp32) on CPU")
    precision = resolve_precision(requested, device)[0]
    return precision, emulation_warning(device, {option: precision})


def describe() -> dict:
    """For ``vesselfast info`` and the benchmarks' machine record."""
    native, why = native_bf16_cpu()
    out = {"cpu_model": cpu_model(), "cpu_capability": cpu_capability(), "native_bf16": native,
           "native_bf16_reason": why, "auto_cpu": resolve_precision("auto", "cpu")[0]}
    if torch.cuda.is_available():
        out["auto_cuda"] = resolve_precision("auto", "cuda")[0]
    return out

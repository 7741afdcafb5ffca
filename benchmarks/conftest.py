"""pytest-benchmark setup shared by every benchmark group (benchmarks/test_bench_<group>.py).

Environment (``vesselfast bench`` sets these from its options):
- ``VESSELFAST_BENCH_QUICK=1``: tiny sizes and 3 rounds, so CI runs the suite in seconds;
- ``VESSELFAST_BENCH_SIZES``: comma-separated element counts (``1M,4M,16M``, ``65536``), overriding the default;
- ``VESSELFAST_BENCH_THREADS``: torch/OpenMP threads (default 2, the design machine's core count);
- ``VESSELFAST_BENCH_DEVICE``: ``cpu`` or ``cuda`` (default: cuda when available);
- ``VESSELFAST_BENCH_COMPILE=0/1``: include ``torch.compile`` baselines (default: on, off in quick mode);
- ``VESSELFAST_BENCH_ROUNDS``: timed rounds per benchmark, overriding each group's choice.
The machine (CPU model and capability, native BF16 and what precision ``auto`` picks, threads, load, torch/triton versions, which parts of vesselfast._C were built,
allocator variables, GPU) is recorded in the JSON's ``machine_info['vesselfast']``, with
``other_processes_cores``: the cores other processes kept busy during the run (from /proc/stat), since
on a shared machine that, not the code, can decide a multi-threaded timing.
"""
from __future__ import annotations

import os
import time

import pytest
import torch


def _flag(name: str, default: bool) -> bool:
    v = os.environ.get(name)
    return default if v is None or v == "" else v.strip().lower() in ("1", "true", "yes", "on")


QUICK = _flag("VESSELFAST_BENCH_QUICK", False)
THREADS = int(os.environ.get("VESSELFAST_BENCH_THREADS", "2"))
torch.set_num_threads(THREADS)


def parse_count(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(float(text[:-1] if mult > 1 else text) * mult)


def bench_sizes(default, quick):
    env = os.environ.get("VESSELFAST_BENCH_SIZES", "").strip()
    if env:
        return [parse_count(s) for s in env.split(",") if s.strip()]
    return list(quick if QUICK else default)


def bench_device() -> torch.device:
    name = os.environ.get("VESSELFAST_BENCH_DEVICE", "").strip()
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def with_compile() -> bool:
    return _flag("VESSELFAST_BENCH_COMPILE", not QUICK)


def rounds_for(nbytes: int) -> int:
    """Rounds per benchmark: 3 in quick mode (tiny sizes: still milliseconds), else enough for a stable
    median in bounded time."""
    if QUICK:
        return 3
    return 40 if nbytes <= 64 << 20 else 15


def _cpu_busy_seconds():
    """(machine-wide busy CPU seconds from /proc/stat, this process's CPU seconds), or None."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
        ticks = [int(v) for v in fields]
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
        hz = os.sysconf("SC_CLK_TCK")
        t = os.times()
        return (sum(ticks[:8]) - idle) / hz, t.user + t.system
    except (OSError, ValueError, IndexError):
        return None


_SESSION_START = {}


def pytest_configure(config):
    config.addinivalue_line("markers", "bench_group(name): the `vesselfast bench` group of a benchmark file")
    _SESSION_START.update(wall=time.monotonic(), busy=_cpu_busy_seconds())


def other_processes_cores():
    """Average number of cores other processes kept busy since the session started (contention check:
    with T threads on T cores, anything above ~0.1 makes the parallel kernels' timings unreliable)."""
    start, now = _SESSION_START.get("busy"), _cpu_busy_seconds()
    if start is None or now is None:
        return None
    wall = time.monotonic() - _SESSION_START["wall"]
    if wall <= 0:
        return None
    return max(0.0, ((now[0] - start[0]) - (now[1] - start[1])) / wall)


def cpu_isa() -> str:
    """The element-loop variant the C++ kernels pick (csrc/include/vesselfast/cpu_dtype.h), from the CPU
    flags and VESSELFAST_CPU_ISA (which can only lower it)."""
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    order = ["generic", "avx2", "avx512"]
    hw = ("avx512" if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags
          else "avx2" if {"avx2", "f16c"} <= flags else "generic")
    want = os.environ.get("VESSELFAST_CPU_ISA", hw)
    return min(hw, want if want in order else hw, key=order.index)


def pytest_benchmark_update_machine_info(config, machine_info):
    from vesselfast import _ext, allocator, hardware
    try:
        import triton
        triton_version = triton.__version__
    except Exception as exc:  # not installed or broken: record, do not fail
        triton_version = f"unavailable ({type(exc).__name__})"
    mod, reason = _ext.load()
    info = {
        "cpu_model": hardware.cpu_model(),
        "cpu_capability": hardware.cpu_capability(),
        "native_bf16": hardware.native_bf16_cpu()[0],
        "precision_auto": hardware.resolve_precision("auto", bench_device())[0],
        "cpu_isa": cpu_isa(),
        "stream_store_bytes": mod.stream_store_bytes() if mod is not None and hasattr(mod, "stream_store_bytes") else None,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "other_processes_cores": other_processes_cores(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "extension": {"cpu": mod is not None, "cuda": _ext.cuda_built(), "error": reason or None},
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "device": str(bench_device()),
        "quick": QUICK,
        "allocator": allocator.current(),
        "allocator_env": {k: os.environ.get(k) for k in ("LD_PRELOAD", "GLIBC_TUNABLES") if os.environ.get(k)},
    }
    machine_info["vesselfast"] = info


@pytest.fixture
def sync():
    """Callable that waits for the device (CUDA) so timings cover the kernels, not just launches."""
    dev = bench_device()
    if dev.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def record(benchmark, suite: str, op: str, impl: str, size: int, role: str = None, per_call: int = 1, **extra):
    """Tags a benchmark for ``vesselfast bench``'s summary. Within one (suite, op, size): the row with
    ``role="ref"`` (else impl "eager") is what speedups are measured against, the row with
    ``role="floor"`` is the lower bound (else, for ops, the copy moving the same bytes). ``per_call``:
    units (steps, images) one timed call handles; the summary reports time per unit."""
    benchmark.group = f"{suite}:{op}:{size}"
    benchmark.extra_info.update(suite=suite, op=op, impl=impl, numel=size, per_call=per_call,
                                device=str(bench_device()), threads=torch.get_num_threads(), **extra)
    if role is not None:
        benchmark.extra_info["role"] = role


def timed(benchmark, fn, sync, rounds: int, warmup: int = 1):
    """Runs ``fn`` (then waits for the device) ``rounds`` times after ``warmup`` untimed calls."""
    rounds = int(os.environ.get("VESSELFAST_BENCH_ROUNDS") or rounds)

    def call():
        out = fn()
        sync()
        return out
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=warmup)


def timed_with_floor(benchmark, fn, floor_fn, sync, rounds: int, warmup: int = 1):
    """``timed`` with the floor measured in the same rounds: before every call of ``fn``, one call of
    ``floor_fn`` (a copy moving the same bytes) is timed outside the benchmark's clock. The floor and the
    op then see the same machine state (another tenant's memory traffic, clock, page placement), which a
    copy row measured minutes later does not. Records in extra_info ``floor_s`` (median of the floor's
    times) and ``floor_ratio`` (median over rounds of floor time / op time in that round)."""
    rounds = int(os.environ.get("VESSELFAST_BENCH_ROUNDS") or rounds)
    floor_times = []

    def setup():
        t0 = time.perf_counter()
        floor_fn()
        sync()
        floor_times.append(time.perf_counter() - t0)

    def call():
        out = fn()
        sync()
        return out
    benchmark.pedantic(call, setup=setup, rounds=rounds, iterations=1, warmup_rounds=warmup)
    op_times = list(benchmark.stats.stats.data)
    floors = floor_times[len(floor_times) - len(op_times):]  # the warm-up rounds' floors dropped
    ratios = sorted(f / t for f, t in zip(floors, op_times) if t > 0)
    benchmark.extra_info["floor_s"] = sorted(floors)[len(floors) // 2]
    benchmark.extra_info["floor_ratio"] = ratios[len(ratios) // 2] if ratios else None

"""``vesselfast bench [GROUP...] [--quick] [--json OUT] [--compare BASELINE.json] [--fail-over PCT]``.

A thin wrapper over pytest-benchmark. Groups are the files ``benchmarks/test_bench_<GROUP>.py``: ``ops``
(fused ops vs eager, torch.compile and the copy floor), ``generator`` (training step), ``sampling`` (one
DDIM step, one inversion), ``synthesis`` (per image per sampler), ``segmenter`` (training step, inference
with torch/bf16/ONNX Runtime), ``pipeline`` (the tiny preset end to end); a new group is a new file,
nothing to register. The command runs pytest on the selected files with ``--benchmark-json`` and prints
one table: time per unit, GB/s where bytes are known, speedup over the reference, over torch.compile,
fraction of the floor, U-Net evaluations per image.

Contract for a benchmark file (helpers ``record`` and ``timed`` in benchmarks/conftest.py): each
benchmark puts ``suite``, ``op``, ``impl`` and ``numel`` (the size) in ``benchmark.extra_info``, and
optionally ``per_call`` (units per timed call), ``role`` ("ref" or "floor"), ``bytes`` and ``evals``.

``--compare BASELINE.json`` (a ``--json`` file of an earlier run, or a raw pytest-benchmark JSON) checks
the ratios measured within each run (speedup over the reference, fraction of the floor), which transfer
between machines and loads far better than absolute times, and U-Net evaluations per image; times per
unit only when the baseline's machine is the same (CPU model, threads, torch, device). It exits with 1
when anything got worse by more than ``--fail-over`` percent (evaluations: by any amount).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

from vesselfast.errors import UserError

STATS = ("median", "min", "mean")


def add_arguments(p):
    p.add_argument("groups", nargs="*", metavar="GROUP",
                   help="benchmark groups to run (files benchmarks/test_bench_<GROUP>.py; default: all)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, 3 rounds, no torch.compile: a smoke run in seconds (CI)")
    p.add_argument("--json", metavar="OUT", help="write the summary (rows, ratios, machine) as JSON")
    p.add_argument("--compare", metavar="BASELINE.json",
                   help="compare within-run ratios against an earlier --json output; exit 1 on regression")
    p.add_argument("--fail-over", type=float, default=10.0, metavar="PCT",
                   help="with --compare: fail when a ratio got worse by more than PCT percent (default 10)")
    p.add_argument("--stat", choices=STATS, default="median", help="statistic of the rounds used (default median)")
    p.add_argument("--sizes", metavar="N[,N...]", help="element counts, e.g. 1M,4M,16M (overrides the defaults)")
    p.add_argument("--threads", type=int, metavar="T", help="torch/OpenMP threads (default 2)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="device of the tensors (default: cuda if available)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    p.add_argument("-k", dest="keyword", metavar="EXPR", help="pytest -k expression to select benchmarks")
    p.add_argument("--bench-dir", metavar="DIR", help="folder of the benchmark files (default: the repo's benchmarks/)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="first wait up to SECONDS for other processes to leave the CPUs idle (shared machines)")
    p.add_argument("-v", "--verbose", action="store_true", help="show pytest's and pytest-benchmark's own output")


def busy_cores(interval: float = 1.0) -> Optional[float]:
    """Cores kept busy by the whole machine over ``interval`` seconds (this process sleeps meanwhile)."""
    def sample():
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        return sum(ticks[:8]) - ticks[3] - ticks[4]
    try:
        import time
        a = sample()
        time.sleep(interval)
        return (sample() - a) / os.sysconf("SC_CLK_TCK") / interval
    except (OSError, ValueError, IndexError):
        return None


def wait_quiet(max_seconds: float, threshold: float = 0.1) -> None:
    import time
    deadline = time.monotonic() + max_seconds
    while True:
        busy = busy_cores(2.0)
        if busy is None or busy <= threshold:
            return
        if time.monotonic() >= deadline:
            print(f"still {busy:.2f} cores busy after waiting {max_seconds:g} s: running anyway", file=sys.stderr)
            return
        print(f"waiting for a quiet machine ({busy:.2f} cores busy)", file=sys.stderr, flush=True)
        time.sleep(10)


# ------------------------------------------------------------------------------------------------
# Locating and running the suite
# ------------------------------------------------------------------------------------------------
def find_bench_dir(explicit: Optional[str] = None) -> Path:
    candidates = [explicit, os.environ.get("VESSELFAST_BENCH_DIR")]
    import vesselfast
    candidates += [str(Path(vesselfast.__file__).resolve().parents[1] / "benchmarks"), str(Path.cwd() / "benchmarks")]
    for c in candidates:
        if c and (Path(c) / "conftest.py").is_file():
            return Path(c).resolve()
    if explicit:
        raise UserError(f"--bench-dir {explicit} has no conftest.py: not a vesselfast benchmarks folder")
    raise UserError("benchmarks/ not found: run from a source checkout, or pass --bench-dir DIR "
                    "(or set VESSELFAST_BENCH_DIR)")


def discover_groups(bench_dir: Path) -> Dict[str, Path]:
    return {p.stem[len("test_bench_"):]: p for p in sorted(bench_dir.glob("test_bench_*.py"))}


def select_files(bench_dir: Path, groups: List[str]) -> List[Path]:
    available = discover_groups(bench_dir)
    if not available:
        raise UserError(f"no benchmark files (test_bench_<group>.py) in {bench_dir}")
    if not groups:
        return list(available.values())
    unknown = [g for g in groups if g not in available]
    if unknown:
        raise UserError(f"unknown benchmark group(s) {', '.join(unknown)}; available: {', '.join(available)}")
    return [available[g] for g in dict.fromkeys(groups)]


def run_pytest(files: List[Path], raw_json: Path, args) -> int:
    env = dict(os.environ)
    if args.quick:
        env["VESSELFAST_BENCH_QUICK"] = "1"
    if args.sizes:
        env["VESSELFAST_BENCH_SIZES"] = args.sizes
    if args.threads:
        env["VESSELFAST_BENCH_THREADS"] = str(args.threads)
    if args.device:
        env["VESSELFAST_BENCH_DEVICE"] = args.device
    if args.no_compile:
        env["VESSELFAST_BENCH_COMPILE"] = "0"
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cmd = [sys.executable, "-m", "pytest", *map(str, files), "-p", "no:cacheprovider", "--benchmark-enable",
           "--benchmark-only", f"--benchmark-json={raw_json}", "-q" if args.verbose else "-qq"]
    if args.keyword:
        cmd += ["-k", args.keyword]
    print(f"running: {' '.join(cmd)}", file=sys.stderr, flush=True)
    if args.verbose:
        return subprocess.call(cmd, env=env, cwd=files[0].parent.parent)
    res = subprocess.run(cmd, env=env, cwd=files[0].parent.parent, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stdout[-6000:] + res.stderr[-3000:])
    return res.returncode


# ------------------------------------------------------------------------------------------------
# Summary: rows with ratios measured in the same run
# ------------------------------------------------------------------------------------------------
def _streaming(nbytes) -> str:
    """The kernels' streaming-store threshold as the machine line shows it ('' when not recorded)."""
    if nbytes is None:
        return ""
    return f", streaming stores past {nbytes / 2**20:.0f} MB" if nbytes > 0 else ", no streaming stores"


def summarize(raw: dict, stat: str = "median") -> List[dict]:
    """Rows (one per benchmark with op/impl in extra_info) with time per unit, GB/s and the within-run
    ratios: ``vs_ref`` (reference time / time: the row with role "ref", else impl "eager", of the same
    suite, op and size), ``vs_compile``, ``floor`` (floor time / time: the median per-round ratio where the
    benchmark timed its floor beside it, else the row with role "floor", else the copy moving the same
    bytes)."""
    entries = []
    for b in raw.get("benchmarks", []):
        ex = b.get("extra_info", {})
        if "op" not in ex or "impl" not in ex:
            continue
        per_call = ex.get("per_call") or 1
        entries.append(dict(suite=ex.get("suite", "?"), op=ex["op"], impl=ex["impl"], numel=ex.get("numel"),
                            bytes=ex.get("bytes"), role=ex.get("role"), evals=ex.get("evals"),
                            time_s=b["stats"][stat] / per_call, name=b.get("name"),
                            floor_s=ex.get("floor_s"), floor_ratio=ex.get("floor_ratio")))
    by_key = {(e["suite"], e["op"], e["numel"], e["impl"]): e for e in entries}
    by_role = {(e["suite"], e["op"], e["numel"], e["role"]): e for e in entries if e["role"]}
    copies = {(e["suite"], e["bytes"]): e for e in entries if e["op"] == "copy"}
    rows = []
    for e in entries:
        if e["op"] == "copy":
            continue
        row = dict(e)
        t, key = e["time_s"], (e["suite"], e["op"], e["numel"])
        row["gbps"] = e["bytes"] / t / 1e9 if e["bytes"] and t > 0 else None
        ref = by_role.get((*key, "ref")) or by_key.get((*key, "eager"))
        comp = by_key.get((*key, "compile"))
        floor = by_role.get((*key, "floor")) or copies.get((e["suite"], e["bytes"]))
        row["vs_ref"] = ref["time_s"] / t if ref and t > 0 else None
        row["vs_compile"] = comp["time_s"] / t if comp and t > 0 else None
        if e.get("floor_ratio") is not None:  # the floor measured round by round beside the op
            row["floor_time_s"], row["floor"] = e["floor_s"], e["floor_ratio"]
        else:
            row["floor_time_s"] = floor["time_s"] if floor else None
            row["floor"] = floor["time_s"] / t if floor and t > 0 else None
        rows.append(row)
    for e in entries:  # the copy floors themselves, for reference
        if e["op"] == "copy":
            rows.append(dict(e, gbps=e["bytes"] / e["time_s"] / 1e9 if e["time_s"] > 0 else None, vs_ref=None,
                             vs_compile=None, floor_time_s=e["time_s"], floor=1.0))
    order = {"eager": 0, "fp32": 0, "compile": 1, "torch": 2, "auto": 3, "auto-scalar": 3.5, "cpu": 4,
             "cpu-kernel": 5, "triton": 6, "cuda": 7, "cuda-kernel": 8, "copy": 9}
    rows.sort(key=lambda r: (r["suite"], r["op"] == "copy", r["op"], r["numel"] or 0, r.get("bytes") or 0,
                             order.get(r["impl"], 6), r["impl"]))
    return rows


def _fmt(v, spec, empty="-"):
    return empty if v is None else format(v, spec)


def _count(n):
    if n is None:
        return "?"
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def format_table(rows: List[dict], stat: str) -> str:
    """One table; ``size`` is elements for ops, pixels (side) for the model groups."""
    head = (f"{'suite':<10} {'op':<21} {'size':>5} {'impl':<11} {stat + ' ms':>11} {'GB/s':>6} {'x ref':>6}"
            f" {'x compile':>9} {'% floor':>7} {'evals':>5}")
    lines = [head, "-" * len(head)]
    prev = None
    for r in rows:
        key = (r["suite"], r["op"], r["numel"])
        if prev is not None and key != prev:
            lines.append("")
        prev = key
        op = r["op"] if r["op"] != "copy" else f"copy ({r['bytes'] // (4 * r['numel'])}N floats)"
        lines.append(f"{r['suite']:<10} {op:<21} {_count(r['numel']):>5} {r['impl']:<11} {r['time_s'] * 1e3:>11.3f}"
                     f" {_fmt(r['gbps'], '6.1f'):>6} {_fmt(r['vs_ref'], '6.2f'):>6} {_fmt(r['vs_compile'], '9.2f'):>9}"
                     f" {_fmt(None if r['floor'] is None else 100 * r['floor'], '7.0f'):>7}"
                     f" {_fmt(r.get('evals'), '5d'):>5}")
    return "\n".join(lines)


def load_baseline(path: str, stat: str):
    """(rows, machine info or None) of a ``--json`` file or a raw pytest-benchmark JSON."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"baseline {path} not found") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"baseline {path} is not readable JSON ({exc})") from None
    if isinstance(data, dict) and "rows" in data:
        return data["rows"], data.get("machine")
    if isinstance(data, dict) and "benchmarks" in data:
        return summarize(data, stat), data.get("machine_info", {}).get("vesselfast")
    raise UserError(f"baseline {path} is neither a `vesselfast bench --json` file nor a pytest-benchmark JSON")


RATIOS = ("vs_ref", "floor")
# What makes two runs "the same machine" for comparing absolute times.
# A different CPU capability (AVX2 vs AVX-512, native BF16 or not) is a different machine even when the
# model string is the same (virtual machines often report a bare "AMD EPYC").
MACHINE_KEYS = ("cpu_model", "cpu_capability", "native_bf16", "logical_cpus", "torch_threads", "torch", "device",
                "gpu", "quick")


def machine_differences(a: Optional[dict], b: Optional[dict]) -> List[str]:
    """The MACHINE_KEYS in which two runs' machines differ (all of them when either is unknown)."""
    if not a or not b:
        return list(MACHINE_KEYS)
    return [k for k in MACHINE_KEYS if a.get(k) != b.get(k)]


def same_machine(a: Optional[dict], b: Optional[dict]) -> bool:
    return not machine_differences(a, b)


def _line(r, what, then, now, change, bad):
    return (f"{r['suite']:<10} {r['op']:<21} {_count(r['numel']):>5} {r['impl']:<11} {what:<7} {then:9.3g} -> "
            f"{now:9.3g} ({change:+6.1f}%){'  REGRESSION' if bad else ''}")


def compare(current: List[dict], baseline: List[dict], fail_over: float, absolute: bool = False):
    """(lines, regressions). Always: every within-run ratio present in both runs (worse = lower), and
    U-Net evaluations per image (worse = more, any increase counts). With ``absolute`` (same machine):
    the time per unit too (worse = slower)."""
    base = {(r["suite"], r["op"], r["numel"], r["impl"]): r for r in baseline}
    lines, regressions = [], []
    for r in current:
        b = base.get((r["suite"], r["op"], r["numel"], r["impl"]))
        if b is None or r["op"] == "copy":
            continue
        checks = []
        is_reference = r["impl"] == "eager" or r.get("role") in ("ref", "floor")
        if not is_reference:
            checks += [(ratio, b.get(ratio), r.get(ratio), fail_over, True) for ratio in RATIOS]
        checks.append(("evals", b.get("evals"), r.get("evals"), 0.0, False))
        if absolute:
            checks.append(("ms", b["time_s"] * 1e3, r["time_s"] * 1e3, fail_over, False))
        for what, then, now, limit, higher_is_better in checks:
            if now is None or not then:
                continue
            change = 100.0 * (now / then - 1.0)
            bad = (change < -limit) if higher_is_better else (change > limit)
            line = _line(r, what, then, now, change, bad)
            lines.append(line)
            if bad:
                regressions.append(line)
    return lines, regressions


def run(args) -> int:
    if args.fail_over < 0:
        raise UserError("--fail-over must be >= 0 (percent)")
    baseline, base_machine = load_baseline(args.compare, args.stat) if args.compare else (None, None)
    bench_dir = find_bench_dir(args.bench_dir)
    files = select_files(bench_dir, args.groups)
    try:
        import pytest_benchmark  # noqa: F401
    except ImportError:
        raise UserError("pytest-benchmark is not installed: pip install 'vesselfast[test]'") from None
    if args.wait_quiet > 0:
        wait_quiet(args.wait_quiet)
    with tempfile.TemporaryDirectory() as tmp:
        raw_path = Path(tmp) / "raw.json"
        rc = run_pytest(files, raw_path, args)
        if rc != 0:
            print(f"vesselfast bench: pytest exited with {rc}", file=sys.stderr)
            return rc if rc > 0 else 1
        raw = json.loads(raw_path.read_text())
    rows = summarize(raw, args.stat)
    mi = raw.get("machine_info", {}).get("vesselfast", {})
    alloc = ", ".join(f"{k}={v}" for k, v in (mi.get("allocator_env") or {}).items()) or "system malloc"
    print(f"machine: {mi.get('cpu_model')} (torch {mi.get('cpu_capability')}, native BF16 "
          f"{'yes' if mi.get('native_bf16') else 'no'}, precision auto = {mi.get('precision_auto')}, "
          f"{mi.get('cpu_isa')} loops{_streaming(mi.get('stream_store_bytes'))}), {mi.get('torch_threads')} threads,"
          f" torch {mi.get('torch')}, device {mi.get('device')}{', GPU ' + mi['gpu'] if mi.get('gpu') else ''},"
          f" {alloc}")
    print(format_table(rows, args.stat))
    others = mi.get("other_processes_cores")
    if others is not None:
        print(f"other processes kept {others:.2f} cores busy during the run"
              + ("  WARNING: contended machine, multi-threaded timings are unreliable" if others > 0.15 else ""))
    if args.json:
        out = {"stat": args.stat, "machine": mi, "datetime": raw.get("datetime"), "rows": rows,
               "pytest_benchmark": {"version": raw.get("version"), "commit_info": raw.get("commit_info")}}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    if baseline is not None:
        differs = machine_differences(mi, base_machine)
        absolute = not differs
        lines, regressions = compare(rows, baseline, args.fail_over, absolute)
        print(f"\ncompared with {args.compare} (fail over {args.fail_over:g}% worse; "
              + ("same machine: ratios, evaluations and times)" if absolute else
                 f"another machine or set-up (differs in {', '.join(differs)}): ratios and evaluations only, "
                 "not times)"))
        print("\n".join(lines) if lines else "  nothing in common to compare")
        if regressions:
            print(f"{len(regressions)} ratio(s) regressed by more than {args.fail_over:g}%", file=sys.stderr)
            return 1
    return 0

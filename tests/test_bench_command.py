"""`vesselfast bench`: group discovery, the summary's ratios, --compare, and one real quick run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vesselfast.cli import main
from vesselfast.commands import bench
from vesselfast.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def _bench(op, impl, numel, seconds, nbytes=None, suite="ops"):
    extra = dict(suite=suite, op=op, impl=impl, numel=numel)
    if nbytes is not None:
        extra["bytes"] = nbytes
    return {"name": f"{op}-{impl}", "extra_info": extra, "stats": {"median": seconds, "min": seconds * 0.9,
                                                                    "mean": seconds}}


def _raw(cpu_time=0.001):
    n = 1 << 20
    return {"machine_info": {}, "benchmarks": [
        _bench("ddim_step", "eager", n, 0.010, 12 * n),
        _bench("ddim_step", "compile", n, 0.002, 12 * n),
        _bench("ddim_step", "cpu", n, cpu_time, 12 * n),
        _bench("copy", "copy", n, 0.0008, 12 * n),
        _bench("copy", "copy", n, 0.0020, 28 * n),  # another byte count: not this op's floor
        {"name": "unrelated", "extra_info": {}, "stats": {"median": 1.0}},
    ]}


def test_summary_ratios_are_within_run():
    rows = bench.summarize(_raw(), "median")
    cpu = next(r for r in rows if r["impl"] == "cpu")
    assert cpu["vs_eager"] == pytest.approx(10.0)
    assert cpu["vs_compile"] == pytest.approx(2.0)
    assert cpu["floor"] == pytest.approx(0.8)
    assert cpu["gbps"] == pytest.approx(12 * (1 << 20) / 0.001 / 1e9)
    assert [r["impl"] for r in rows if r["op"] == "ddim_step"] == ["eager", "compile", "cpu"]
    assert not any(r.get("name") == "unrelated" for r in rows)
    table = bench.format_table(rows, "median")
    assert "ddim_step" in table and "1M" in table and "80" in table  # 80 % of the floor


def test_compare_flags_only_regressions(tmp_path):
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"rows": bench.summarize(_raw(0.001), "median")}))
    baseline = bench.load_rows(str(base), "median")
    # 20 % slower cpu kernel: both its ratios drop by 1/1.2 - 1 = -16.7 %
    lines, bad = bench.compare(bench.summarize(_raw(0.0012), "median"), baseline, fail_over=10)
    assert len(lines) == 4 and len(bad) == 2 and all("cpu" in b for b in bad)
    _, bad = bench.compare(bench.summarize(_raw(0.0012), "median"), baseline, fail_over=20)
    assert bad == []
    _, bad = bench.compare(bench.summarize(_raw(0.0008), "median"), baseline, fail_over=0)
    assert bad == []  # faster is never a regression
    # a raw pytest-benchmark JSON works as a baseline too
    raw = tmp_path / "raw.json"
    raw.write_text(json.dumps(_raw(0.001)))
    assert len(bench.load_rows(str(raw), "median")) == len(baseline)


def test_groups_are_benchmark_files():
    bench_dir = bench.find_bench_dir()
    groups = bench.discover_groups(bench_dir)
    assert "ops" in groups and groups["ops"].name == "test_bench_ops.py"
    with pytest.raises(UserError, match="unknown benchmark group"):
        bench.select_files(bench_dir, ["nope"])


def test_bad_input_exits_2(tmp_path, capsys):
    assert main(["bench", "nope"]) == 2
    assert main(["bench", "ops", "--compare", str(tmp_path / "missing.json")]) == 2
    assert "not found" in capsys.readouterr().err


def test_quick_run_end_to_end(tmp_path):
    """The CI path: `vesselfast bench ops --quick --json` runs the real suite in seconds."""
    out = tmp_path / "quick.json"
    env = dict(os.environ, VESSELFAST_BENCH_SIZES="16K")
    res = subprocess.run([sys.executable, "-m", "vesselfast", "bench", "ops", "--quick", "--json", str(out)],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads(out.read_text())
    impls = {(r["op"], r["impl"]) for r in data["rows"]}
    for op in ("ddim_step", "ddim_inverse_step", "ddpm_step", "vessel_noise_loss"):
        assert (op, "eager") in impls and (op, "cpu") in impls
    assert all(r["floor"] is not None for r in data["rows"])
    assert data["machine"]["torch_threads"] >= 1 and data["machine"]["cpu_model"]
    assert "x eager" in res.stdout
    # comparing a run with itself never fails
    res = subprocess.run([sys.executable, "-m", "vesselfast", "bench", "ops", "--quick", "--compare", str(out),
                          "--fail-over", "1000"], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]

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
    assert cpu["vs_ref"] == pytest.approx(10.0)
    assert cpu["vs_compile"] == pytest.approx(2.0)
    assert cpu["floor"] == pytest.approx(0.8)
    assert cpu["gbps"] == pytest.approx(12 * (1 << 20) / 0.001 / 1e9)
    assert [r["impl"] for r in rows if r["op"] == "ddim_step"] == ["eager", "compile", "cpu"]
    assert not any(r.get("name") == "unrelated" for r in rows)
    table = bench.format_table(rows, "median")
    assert "ddim_step" in table and "1M" in table and "80" in table  # 80 % of the floor


def test_paired_floor_wins_over_the_copy_row():
    """A row that timed its floor beside it reports that ratio, not the copy row measured apart."""
    raw = _raw()
    cpu = next(b for b in raw["benchmarks"] if b["name"] == "ddim_step-cpu")
    cpu["extra_info"].update(floor_s=0.0009, floor_ratio=0.93)
    rows = bench.summarize(raw, "median")
    row = next(r for r in rows if r["impl"] == "cpu")
    assert row["floor"] == pytest.approx(0.93) and row["floor_time_s"] == pytest.approx(0.0009)
    eager = next(r for r in rows if r["impl"] == "eager")
    assert eager["floor"] == pytest.approx(0.08)  # no paired floor: the copy moving the same bytes


def test_compare_flags_only_regressions(tmp_path):
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"rows": bench.summarize(_raw(0.001), "median")}))
    baseline, _ = bench.load_baseline(str(base), "median")
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
    assert len(bench.load_baseline(str(raw), "median")[0]) == len(baseline)


def _model_raw(step_seconds, evals=16, floor_seconds=0.09):
    """A model-level group: per_call units, explicit ref/floor roles, evaluations per image."""
    def b(impl, seconds, role=None, per_call=4, ev=None):
        extra = dict(suite="sampling", op="inversion", impl=impl, numel=64, per_call=per_call, role=role)
        if ev is not None:
            extra["evals"] = ev
        return {"name": impl, "extra_info": extra, "stats": {"median": seconds, "min": seconds, "mean": seconds}}
    return {"machine_info": {}, "benchmarks": [b("unet", 4 * floor_seconds, "floor"), b("slow", 0.8, "ref"),
                                               b("auto", 4 * step_seconds, ev=evals)]}


def test_roles_per_call_and_evals():
    rows = {r["impl"]: r for r in bench.summarize(_model_raw(0.1), "median")}
    assert rows["auto"]["time_s"] == pytest.approx(0.1)  # per unit, not per call
    assert rows["auto"]["vs_ref"] == pytest.approx(2.0)  # against the role="ref" row, not "eager"
    assert rows["auto"]["floor"] == pytest.approx(0.9)  # against the role="floor" row
    base = bench.summarize(_model_raw(0.1), "median")
    _, bad = bench.compare(bench.summarize(_model_raw(0.1, evals=17), "median"), base, fail_over=50)
    assert len(bad) == 1 and "evals" in bad[0]  # one more network evaluation is a regression at any --fail-over
    # absolute times: compared only when asked (same machine); the reference rows count there too
    slower = bench.summarize(_model_raw(0.1, floor_seconds=0.2), "median")
    assert bench.compare(slower, base, 10, absolute=False)[1] == []
    _, bad = bench.compare(slower, base, 10, absolute=True)
    assert len(bad) == 1 and "unet" in bad[0] and " ms " in bad[0]


def test_same_machine_needs_every_key():
    a = {k: "x" for k in bench.MACHINE_KEYS}
    assert bench.same_machine(a, dict(a))
    assert not bench.same_machine(a, dict(a, torch_threads=4))
    assert not bench.same_machine(a, None)
    # the same model string with another capability (AVX2 vs AVX-512, native BF16 or not) is another machine
    assert not bench.same_machine(a, dict(a, cpu_capability="AVX2"))
    assert bench.machine_differences(a, dict(a, native_bf16=not a.get("native_bf16"))) == ["native_bf16"]


def test_committed_baseline_is_loadable():
    rows, machine = bench.load_baseline(str(REPO / "benchmarks" / "baseline.json"), "median")
    assert machine["cpu_model"] and machine["torch_threads"] >= 1
    suites = {r["suite"] for r in rows}
    assert {"ops", "generator", "sampling", "synthesis", "segmenter", "pipeline"} <= suites
    assert all(r["vs_ref"] is None or r["vs_ref"] > 0 for r in rows)


def test_groups_are_benchmark_files():
    bench_dir = bench.find_bench_dir()
    groups = bench.discover_groups(bench_dir)
    assert set(groups) == {"ops", "generator", "sampling", "synthesis", "segmenter", "pipeline"}
    assert groups["ops"].name == "test_bench_ops.py"
    with pytest.raises(UserError, match="unknown benchmark group"):
        bench.select_files(bench_dir, ["nope"])


def test_bad_input_exits_2(tmp_path, capsys):
    assert main(["bench", "nope"]) == 2
    assert main(["bench", "ops", "--compare", str(tmp_path / "missing.json")]) == 2
    assert "not found" in capsys.readouterr().err


def _bench_cli(*argv, env=None, timeout=600):
    env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "vesselfast", "bench", *argv], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout)


def test_quick_run_of_every_group(tmp_path):
    """The CI path: `vesselfast bench --quick --json` runs the whole suite (every group) in seconds."""
    out = tmp_path / "quick.json"
    res = _bench_cli("--quick", "--json", str(out))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads(out.read_text())
    impls = {(r["suite"], r["op"], r["impl"]) for r in data["rows"]}
    for op in ("ddim_step", "ddim_inverse_step", "ddpm_step", "vessel_noise_loss"):
        assert {("ops", op, "eager"), ("ops", op, "auto"), ("ops", op, "cpu")} <= impls
    assert {("generator", "generator_train_step", p) for p in ("fp32", "bf16")} <= impls
    assert {("sampling", "sampling_step", i) for i in ("unet", "eager", "auto")} <= impls
    assert {("synthesis", "synthesis", s) for s in ("ddim_latent", "ddim_noise", "ddpm_latent", "ddpm_noise")} <= impls
    assert {("segmenter", "infer_whole", i) for i in ("eager", "bf16", "ort")} <= impls
    assert ("pipeline", "pipeline", "tiny") in impls
    evals = {r["impl"]: r["evals"] for r in data["rows"] if r["suite"] == "synthesis"}
    assert evals["ddpm_noise"] == 100 and evals["ddim_noise"] == 10  # quick mode: T = 100, 10 DDIM steps
    assert all(r["floor"] is not None for r in data["rows"] if r["suite"] == "ops")
    # the fused rows timed their floor round by round beside them; the references (eager, compile, and
    # group_norm_act's NCHW row) did not
    ops_rows = [r for r in data["rows"] if r["suite"] == "ops" and r["op"] != "copy"]
    assert all((r["floor_ratio"] is not None) == (r["impl"] not in ("eager", "compile", "nchw")) for r in ops_rows)
    assert {("ops", "group_norm_act", i) for i in ("eager", "nchw", "auto", "cpu")} <= impls
    assert data["machine"]["torch_threads"] >= 1 and data["machine"]["cpu_model"]
    assert "x ref" in res.stdout


def test_compare_fails_the_run_on_a_regression(tmp_path):
    """``--compare`` end to end, with no timing in the verdict: a baseline in which the fused ops' default
    path was a billion times faster than eager makes each of those rows a regression (exit 1, one flagged
    line each, whatever this machine measures); rows the baseline lacks are not compared. Whether a slower
    op is caught by real timings is the benchmarks' business (docs/BENCHMARKS.md), not CI's; that
    VESSELFAST_BACKEND=torch makes the default path run the reference is
    tests/test_ops_backends.py::test_env_var_forces_torch."""
    steps = ("ddim_step", "ddim_inverse_step", "ddpm_step")
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"rows": [dict(suite="ops", op=op, numel=1 << 16, impl="auto", vs_ref=1e9)
                                         for op in steps]}))
    res = _bench_cli("ops", "--quick", "--compare", str(base), "--fail-over", "99",
                     env={"VESSELFAST_BENCH_SIZES": "64K", "VESSELFAST_BENCH_ROUNDS": "1"})
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-2000:]
    compared = [line.split() for line in res.stdout.split("\ncompared with ", 1)[1].splitlines()[1:]]
    assert sorted((w[1], w[3], w[4], w[-1]) for w in compared) == [(op, "auto", "vs_ref", "REGRESSION")
                                                                    for op in sorted(steps)]
    assert "3 ratio(s) regressed by more than 99%" in res.stderr

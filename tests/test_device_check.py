"""scripts/device_check.sh --dry-run: every step of the GPU check is listed, the script's syntax and paths
are checked, and what runs without a GPU runs (a build without CUDA, the CUDA tests' collection)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dry_run_lists_every_step_and_builds_without_cuda(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "out"),
               VESSELFAST_DEVICE_DATA=str(tmp_path / "no_data"))
    res = subprocess.run(["bash", str(REPO / "scripts" / "device_check.sh"), "--dry-run"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = (tmp_path / "out" / "summary.txt").read_text()
    for step in ("01_env", "02_build", "03_info", "04_tests", "05_train", "06_bench_ops", "07_bench_models",
                 "08_bench_ops_compile"):
        assert f"would run {step}" in summary, step
    assert "extension builds without CUDA (1 module)" in summary
    assert "preset gpu-short resolves" in summary and "CUDA test(s)" in summary
    assert "--preset gpu-short --device cuda" in summary


def test_unknown_option_is_refused():
    res = subprocess.run(["bash", str(REPO / "scripts" / "device_check.sh"), "--gpu"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2 and "unknown option --gpu" in res.stderr

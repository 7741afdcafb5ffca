"""Benchmark group ``pipeline``: the ``tiny`` preset end to end (``vesselfast train --preset tiny``: every
stage, built-in data, in a fresh run directory each round). No in-run ratio exists for it, so
``vesselfast bench --compare`` checks its time only against a baseline from the same machine."""
from __future__ import annotations

import itertools
import json

import pytest

from conftest import QUICK, record, timed

from vesselfast.cli import main

GROUP = "pipeline"
pytestmark = pytest.mark.bench_group(GROUP)


def test_tiny_pipeline(benchmark, sync, tmp_path):
    counter = itertools.count()
    last = {}

    def run():
        out = tmp_path / f"run{next(counter)}"
        if main(["train", "--preset", "tiny", "--out", str(out)]) != 0:
            raise RuntimeError("vesselfast train --preset tiny failed")
        last["out"] = out

    record(benchmark, GROUP, "pipeline", "tiny", 0, per_call=1)
    timed(benchmark, run, sync, rounds=1 if QUICK else 3, warmup=0)
    metrics = json.loads((last["out"] / "metrics.json").read_text())
    benchmark.extra_info["stage_seconds"] = {k: v.get("seconds") for k, v in metrics.get("stages", {}).items()}

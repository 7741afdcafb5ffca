"""Timing helper shared by the measure_*.py scripts (not a benchmark suite: see benchmarks/ for those)."""
from __future__ import annotations

import statistics
import time


def median_ms(fn, n: int = 5, warm: int = 1) -> float:
    """Median wall time of ``n`` calls of ``fn`` after ``warm`` untimed ones, in milliseconds."""
    for _ in range(warm):
        fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)

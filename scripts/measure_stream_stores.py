#!/usr/bin/env python
"""The CPU kernels with and without non-temporal (streaming) stores, against a copy, interleaved.

    python scripts/measure_stream_stores.py [--rounds 15]

For N = 1M, 4M, 16M float32 elements (batch 8): the DDIM step kernel (x, eps -> out, preallocated) and
the vessel-weighted loss's backward kernel (eps, eps_hat, w -> a fresh gradient), each called directly
(no Python op path) with ``VESSELFAST_STREAM_STORES=0`` (cached stores) and ``=1`` (streamed), and a
``dst.copy_(src)`` moving the same bytes. Every round times the copy, then the kernel both ways (median of
10 calls each); the "% floor" is the median over rounds of copy time / kernel time. The kernels read the
variable on every call (csrc/include/vesselfast/cpu_dtype.h ``stream_stores_pay``); without it they
stream when a call moves more bytes than the last-level cache (``vesselfast._C.stream_store_bytes()``),
which this script prints.
Run it under the CLI's allocator to match `vesselfast bench` (the tunables `vesselfast info` prints).
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch
from _timing import median_ms

import vesselfast.ops  # noqa: F401  (registers the ops)
from vesselfast import _ext
from vesselfast.ops import diffusion_step as ds

BATCH, WIDTH = 8, 256


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(2)
    mod, reason = _ext.load()
    if mod is None:
        raise SystemExit(f"measure_stream_stores.py: the C++ extension is not built ({reason})")
    llc = mod.stream_store_bytes()
    print(f"kernels stream past {llc / 2**20:.0f} MB moved (last-level cache); threads {torch.get_num_threads()}; "
          f"ISA cap {os.environ.get('VESSELFAST_CPU_ISA', 'none')}")
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    gen = torch.Generator().manual_seed(0)
    for kind, sizes in (("ddim_step", (1 << 20, 1 << 22, 1 << 24)), ("loss_bwd", (1 << 22, 1 << 24))):
        for numel in sizes:
            shape = (BATCH, 1, numel // BATCH // WIDTH, WIDTH)
            a, b = (torch.randn(shape, generator=gen) for _ in range(2))
            if kind == "ddim_step":
                out = torch.empty_like(a)
                coef = ds.ddim_coefficients(abar[500:508], abar[480:488], 0.0)
                kernel = lambda: torch.ops.vesselfast.diffusion_step_out(a, b, coef, None, True, out)  # noqa: E731
                tensors = 3
            else:
                w = (torch.rand(shape, generator=gen) < 0.2).float()
                g = torch.full((BATCH,), 1.0 / BATCH)
                _, sum_w = torch.ops.vesselfast.vessel_noise_loss_fwd(a, b, w)
                kernel = lambda: torch.ops.vesselfast.vessel_noise_loss_bwd(g, a, b, w, sum_w)  # noqa: E731
                tensors = 4
            src = torch.randn(tensors * numel // 2)
            dst = torch.empty_like(src)
            times = {"copy": [], "cached": [], "streamed": []}
            for _ in range(args.rounds):
                times["copy"].append(median_ms(lambda: dst.copy_(src), n=10))
                for name, flag in (("cached", "0"), ("streamed", "1")):
                    os.environ["VESSELFAST_STREAM_STORES"] = flag
                    times[name].append(median_ms(kernel, n=10))
            os.environ.pop("VESSELFAST_STREAM_STORES")
            med = {k: statistics.median(v) for k, v in times.items()}
            floor = {k: 100 * statistics.median(c / t for c, t in zip(times["copy"], times[k]))
                     for k in ("cached", "streamed")}
            default = "streamed" if tensors * numel * 4 > llc > 0 else "cached"
            print(f"{kind:9s} N={numel >> 20:2d}M  copy {med['copy']:7.3f} ms  cached {med['cached']:7.3f} ms "
                  f"({floor['cached']:3.0f}% floor)  streamed {med['streamed']:7.3f} ms ({floor['streamed']:3.0f}% "
                  f"floor)  default here: {default}", flush=True)


if __name__ == "__main__":
    main()

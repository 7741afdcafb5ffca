#!/usr/bin/env python
"""The allocator-sensitive workloads of docs/ALLOCATOR.md under each allocator, interleaved.

    python scripts/measure_allocators.py [--repeats 3]

Each configuration runs this file's workload in a fresh process (an allocator must be chosen before
Python starts): generator inference at 128 px (batch 16), one 400 px segmenter image, a fused step op with
a fresh 16M-element output, the vessel-weighted loss forward + backward at 16M, a preallocated copy of
4N floats (the bandwidth floor), and the process's peak resident memory. Configurations whose library is
not installed are skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys


def workload() -> dict:
    import numpy as np
    import torch
    from _timing import median_ms

    import vesselfast.ops as ops
    from vesselfast.inference import sliding_window_probs, torch_batch_fn
    from vesselfast.models import SegmenterUNet
    from vesselfast.pipeline.config import GeneratorTrainConfig
    from vesselfast.pipeline.generative import EpsModel, build_generator

    torch.set_num_threads(2)

    def med(f, r=7, w=2):
        return median_ms(f, r, w)

    out = {}
    g = EpsModel(build_generator(GeneratorTrainConfig(), 0), "auto", "cpu")
    x, t = torch.randn(16, 1, 128, 128), torch.full((16,), 500)
    out["generator inference 128 px"] = med(lambda: g(x, t))
    torch.manual_seed(0)
    fn = torch_batch_fn(SegmenterUNet(1, (16, 32, 64, 128, 256)), "cpu", "auto", channels_last=True)
    img = np.random.default_rng(0).uniform(-1, 1, (400, 400)).astype(np.float32)
    out["segmenter 400 px"] = med(lambda: sliding_window_probs(fn, img, 400, 400))
    n = 1 << 24
    a = torch.randn(8, 1, n // 8 // 256, 256)
    e, z = torch.randn_like(a), torch.randn_like(a)
    out["ddpm_step fresh 16M"] = med(lambda: ops.ddpm_step(a, e, 0.5, 0.6, noise=z), r=20)
    h = a.clone().requires_grad_(True)
    w = (torch.rand_like(a) < .2).float()
    gg = torch.full((8,), 1 / 8)
    out["loss fwd+bwd 16M"] = med(lambda: torch.autograd.grad(ops.vessel_noise_loss(e, h, w, reduction="none"), h, gg)[0],
                                  r=20)
    src = torch.randn(2 * n)
    dst = torch.empty_like(src)
    out["copy 4N floats 16M"] = med(lambda: dst.copy_(src), r=20)
    import resource
    out["peak RSS (MB)"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def configurations() -> dict:
    from vesselfast import allocator

    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "GLIBC_TUNABLES")}
    base.update(VESSELFAST_ALLOCATOR="system")
    tuned_mmap = allocator.GLIBC_TUNABLES.replace(":glibc.malloc.mmap_max=0", "")
    tuned_no_huge = tuned_mmap.replace(":glibc.malloc.hugetlb=1", "")
    cfgs = {"system": dict(base), "glibc-tuned (no huge pages)": dict(base, GLIBC_TUNABLES=tuned_no_huge),
            "glibc-tuned + hugetlb, blocks > 32 MB mmap'd": dict(base, GLIBC_TUNABLES=tuned_mmap),
            "glibc-tuned (default: + hugetlb, mmap_max=0)": dict(base, GLIBC_TUNABLES=allocator.GLIBC_TUNABLES)}
    mi, tc = allocator.find_mimalloc(), allocator.find_tcmalloc()
    if mi:
        cfgs["mimalloc"] = dict(base, LD_PRELOAD=mi)
        cfgs["mimalloc + large OS pages"] = dict(base, LD_PRELOAD=mi, **allocator.MIMALLOC_OPTIONS)
    if tc:
        cfgs["tcmalloc"] = dict(base, LD_PRELOAD=tc)
    return cfgs


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(workload()))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    results = {}
    for _ in range(args.repeats):
        for name, env in configurations().items():
            res = subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True, text=True)
            if res.returncode != 0:
                print(f"{name}: failed\n{res.stderr[-2000:]}", file=sys.stderr)
                continue
            for k, v in json.loads(res.stdout.strip().splitlines()[-1]).items():
                results.setdefault(name, {}).setdefault(k, []).append(v)
    keys = list(next(iter(results.values())))
    print("| workload (ms, median of runs) | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for k in keys:
        print(f"| {k} | " + " | ".join(f"{statistics.median(results[c][k]):.1f}" for c in results) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

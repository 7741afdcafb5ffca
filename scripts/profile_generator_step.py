"""Where a generator training step spends its time: torch.profiler over steps of
:func:`vesselfast.pipeline.generative.train_generator` with a preset's generator (default real-cpu: base 32,
(1, 2, 2), batch 8, 64-px crops), grouped by kind of work (forward convolutions, their backward, norms,
activations, the loss, AdamW, EMA, data and augmentation) and by operator.

    python scripts/profile_generator_step.py [--preset real-cpu] [--precision bf16] [--steps 20] [--threads 2]
                                             [--onednn] [--roofline]

Prints the machine, the mean step time outside the profiler, and two tables (self CPU time). Percentages
are the numbers to read; absolute times are only meaningful on a quiet machine. ``--onednn`` adds a third:
oneDNN's own execution times per primitive kind and implementation (its verbose mode, one step), where
the memory-layout reorders around each convolution show, which torch.profiler counts inside the
convolution ops. ``--roofline`` adds the step's convolution FLOPs (counted by torch's FlopCounterMode), the
rate the convolutions reach inside the step, the machine's dense matmul rate at the same precision and
threads, and the step time if every convolution ran at that rate (a bound on what a faster convolution
could give).
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from vesselfast import hardware
from vesselfast.diffusion import NoiseSchedule
from vesselfast.pipeline.config import resolve
from vesselfast.pipeline.generative import build_generator, train_generator

from _timing import median_ms  # scripts/, on the path when a script runs

# operator name fragments -> kind of work (first match wins)
KINDS = [
    ("convolution backward", ("convolution_backward", "mkldnn_convolution_backward")),
    ("convolution", ("conv", "mkldnn_convolution")),
    ("matmul / linear", ("addmm", "mm", "bmm", "linear")),
    ("group norm", ("group_norm", "native_group_norm")),  # also vesselfast::group_norm_act_fwd / _bwd
    ("activation", ("silu", "gelu", "relu", "sigmoid")),
    ("optimizer (AdamW)", ("adam", "_foreach_", "lerp", "addcdiv", "addcmul", "sqrt", "mul_", "add_", "div_")),
    ("noise loss", ("vessel_noise_loss", "vesselfast::")),
    ("dtype casts", ("to_copy", "_to_copy", "copy_")),
    ("interpolate / pooling", ("upsample", "pool", "interpolate")),
    ("random / data", ("randn", "randint", "normal", "uniform", "index", "flip", "rot90", "grid_sampler")),
]


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, frags in KINDS:
        if any(f in low for f in frags):
            return kind
    return "other"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="real-cpu")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--crop", type=int, default=None, help="crop size (default: the preset's)")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--onednn", action="store_true", help="also oneDNN's per-primitive times (verbose mode)")
    ap.add_argument("--roofline", action="store_true", help="also the convolutions' rate against a dense matmul's")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = resolve(args.preset, overrides={"generator": {"precision": args.precision}})
    gcfg, crop = cfg.generator, args.crop or cfg.data.crop
    precision = hardware.resolve_precision(gcfg.precision, torch.device("cpu"))[0]
    gcfg.precision = precision
    g = torch.Generator().manual_seed(0)
    n = 4 * gcfg.batch_size
    images = torch.rand(n, 1, crop, crop, generator=g) * 2 - 1
    masks = (torch.rand(n, 1, crop, crop, generator=g) < 0.1).float()
    sched = NoiseSchedule.make(cfg.diffusion.schedule, cfg.diffusion.T)
    model = build_generator(gcfg, 0)
    print(f"machine: {hardware.cpu_model()}, {args.threads} threads, torch {torch.__version__}; "
          f"preset {args.preset}: base {gcfg.base_channels} x {list(gcfg.channel_mult)}, batch {gcfg.batch_size}, "
          f"{crop} px, precision {precision}")
    train_generator(model, images, masks, 3, gcfg, sched, seed=0)  # warm-up (allocations, oneDNN primitives)
    t = time.perf_counter()
    train_generator(model, images, masks, args.steps, gcfg, sched, seed=0)
    print(f"step: {1e3 * (time.perf_counter() - t) / args.steps:.1f} ms (mean of {args.steps}, outside the profiler)")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        train_generator(model, images, masks, args.steps, gcfg, sched, seed=0)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    by_kind = collections.Counter()
    for e in events:
        by_kind[kind_of(e.key)] += e.self_cpu_time_total
    print(f"\nself CPU time by kind of work ({total / 1e3 / args.steps:.1f} ms per step under the profiler)")
    for kind, us in by_kind.most_common():
        print(f"  {kind:<24} {us / 1e3 / args.steps:8.2f} ms  {100 * us / total:5.1f} %")
    print(f"\ntop {args.top} operators (self CPU time)")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]:
        print(f"  {e.key[:44]:<44} {e.self_cpu_time_total / 1e3 / args.steps:8.2f} ms  "
              f"{100 * e.self_cpu_time_total / total:5.1f} %  calls/step {e.count / args.steps:6.1f}")
    if args.roofline:
        conv_ms = (by_kind["convolution"] + by_kind["convolution backward"]) / 1e3 / args.steps
        roofline(model, images[:gcfg.batch_size], masks[:gcfg.batch_size], precision, conv_ms,
                 1e3 * total / 1e6 / args.steps)
    if args.onednn:
        onednn_table(lambda: train_generator(model, images, masks, 1, gcfg, sched, seed=0), args.steps)
    return 0


def roofline(model, x, cond, precision: str, conv_ms: float, step_ms: float, n: int = 2048) -> None:
    """Prints the convolutions' GFLOP/s inside the step (``conv_ms`` per step of self CPU time) against an
    [n x n] @ [n x n] matmul's at ``precision``, and the step (``step_ms``, under the profiler) with every
    convolution at the matmul's rate. ``x``, ``cond``: one batch, [B x 1 x H x W]."""
    from torch.utils.flop_counter import FlopCounterMode

    from vesselfast.models import autocast

    t = torch.zeros(x.shape[0], dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        with autocast("cpu", precision):
            out = model(x, t, cond)
        out.float().square().mean().backward()
    counts = counter.get_flop_counts()["Global"]
    conv = sum(v for k, v in counts.items() if "convolution" in str(k))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    gemm = 2 * n ** 3 / median_ms(lambda: a @ b, n=10, warm=3) / 1e6
    rate = conv / 1e6 / conv_ms
    bound = step_ms - conv_ms + conv / 1e6 / gemm
    print(f"\nroofline ({precision}): convolutions {conv / 1e9:.1f} GFLOP per step in {conv_ms:.1f} ms = "
          f"{rate:.0f} GFLOP/s; a [{n} x {n}] matmul {gemm:.0f} GFLOP/s ({100 * rate / gemm:.0f} % of it)")
    print(f"  the step ({step_ms:.1f} ms under the profiler) with every convolution at the matmul's rate: "
          f"{bound:.1f} ms ({step_ms / bound:.2f}x)")


def onednn_table(one_step, steps: int) -> None:
    """oneDNN's verbose lines of ``steps`` steps (printed by the library to the process's stdout), summed by
    (primitive, implementation, propagation kind) and divided by ``steps``."""
    sys.stdout.flush()
    # a file, not a pipe: one step writes more than a pipe's buffer, and nobody would read it meanwhile
    with tempfile.TemporaryFile("w+") as log:
        saved = os.dup(1)
        os.dup2(log.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                for _ in range(steps):
                    one_step()
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        log.seek(0)
        lines = [ln.strip().split(",") for ln in log if ln.startswith("onednn_verbose") and ",exec," in ln]
    sums = collections.defaultdict(lambda: [0, 0.0])
    for f in lines:
        i = f.index("exec")
        try:
            ms = float(f[-1])
        except ValueError:
            continue
        key = (f[i + 2], f[i + 3], f[i + 4])
        sums[key][0] += 1
        sums[key][1] += ms
    total = sum(ms for _, ms in sums.values())
    print(f"\noneDNN primitives, per step over {steps} steps ({total / steps:.1f} ms inside oneDNN)")
    for (prim, impl, prop), (count, ms) in sorted(sums.items(), key=lambda kv: -kv[1][1])[:12]:
        print(f"  {prim:<12} {impl:<34} {prop:<17} {ms / steps:8.2f} ms  {100 * ms / total:5.1f} %  "
              f"calls/step {count / steps:g}")


if __name__ == "__main__":
    from vesselfast.errors import UserError
    try:
        raise SystemExit(main())
    except UserError as e:  # a bad --preset or precision: one line, exit 2
        print(f"{Path(__file__).name}: {e}", file=sys.stderr)
        raise SystemExit(2)

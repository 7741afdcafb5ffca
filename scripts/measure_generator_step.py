"""The generator training step's speed-ups, each measured against today's eager step in the same run:
AdamW's for-loop (torch's CPU default), foreach and fused implementations; torch.compile (inductor) of the
network's forward and backward, its compile time reported apart; a larger batch (time per sample); the
network in NCHW instead of channels_last (its norms then run through the plain-torch reference).

    python scripts/measure_generator_step.py [--preset real-cpu] [--precisions bf16,fp32] [--steps 8] [--rounds 3]

Every variant runs the pipeline's step (train_generator's body: forward under autocast, the
vessel-weighted noise loss, backward, the optimiser, the EMA as one foreach lerp) on the preset's network,
batch and crop, with the same random crops. Rounds interleave the variants so that drift on a shared
machine hits them alike; the median of the rounds' means is printed, with its ratio to the eager step.
Measure on a quiet machine and name its CPU.
"""
from __future__ import annotations

import argparse
import sys
import statistics
import time
from pathlib import Path

import torch

from vesselfast import hardware
from vesselfast.data import thick_mask
from vesselfast.diffusion import NoiseSchedule
from vesselfast.models import EMA, autocast, to_memory_format
from vesselfast.ops import vessel_noise_loss
from vesselfast.pipeline.config import resolve
from vesselfast.pipeline.generative import build_generator


def make_step(gcfg, sched, batch: int, crop: int, precision: str, optim: str, compile_model: bool,
              channels_last: bool = True):
    """A closure running one training step; returns (step, seconds spent compiling on its first call)."""
    model = to_memory_format(build_generator(gcfg, 0), channels_last).train()
    ema = EMA(model, gcfg.ema_decay)
    kw = {"foreach": optim == "foreach"} if optim in ("loop", "foreach") else {"fused": True}
    opt = torch.optim.AdamW(model.parameters(), lr=gcfg.lr * batch / gcfg.batch_size, weight_decay=0.0, **kw)
    net = torch.compile(model) if compile_model else model
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(batch, 1, crop, crop, generator=g) * 2 - 1
    cond = (torch.rand(batch, 1, crop, crop, generator=g) < 0.08).float()
    w = thick_mask(cond, radius=2)

    def step():
        t = torch.randint(0, sched.T, (batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x_t = to_memory_format(sched.q_sample(x0, t, noise), channels_last)
        with autocast("cpu", precision):
            eps_hat = net(x_t, t, cond)
        loss = vessel_noise_loss(noise, eps_hat.float(), w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(model)

    t0 = time.perf_counter()
    step()
    return step, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="real-cpu")
    ap.add_argument("--precisions", default="bf16,fp32")
    ap.add_argument("--steps", type=int, default=8, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    bad = [x for x in args.precisions.split(",") if x not in ("bf16", "fp32")]
    if bad:
        ap.error(f"--precisions: {', '.join(bad)} not among bf16, fp32")
    torch.set_num_threads(args.threads)
    cfg = resolve(args.preset)
    gcfg, crop, b = cfg.generator, cfg.data.crop, cfg.generator.batch_size
    sched = NoiseSchedule.make(cfg.diffusion.schedule, cfg.diffusion.T)
    print(f"machine: {hardware.cpu_model()} ({hardware.cpu_capability()}, native BF16 "
          f"{'yes' if hardware.native_bf16_cpu()[0] else 'no'}), {args.threads} threads, torch {torch.__version__}; "
          f"preset {args.preset}: base {gcfg.base_channels} x {list(gcfg.channel_mult)}, batch {b}, {crop} px")
    variants = [("eager, AdamW for-loop (today)", b, "loop", False, True), ("AdamW foreach", b, "foreach", False, True),
                ("AdamW fused", b, "fused", False, True)]
    if not args.no_compile:
        variants += [("torch.compile, AdamW fused", b, "fused", True, True)]
    variants += [(f"batch {2 * b}, lr x2, AdamW fused (per {b} samples)", 2 * b, "fused", False, True),
                 ("NCHW, norms in plain torch", b, "loop", False, False)]
    for precision in args.precisions.split(","):
        steps = {}
        for name, batch, optim, comp, cl in variants:
            fn, first = make_step(gcfg, sched, batch, crop, precision, optim, comp, cl)
            fn()  # warm: oneDNN primitives, allocations, (compiled) the backward graph
            steps[name] = (fn, batch, first)
        times = {name: [] for name in steps}
        for _ in range(args.rounds):
            for name, (fn, batch, _) in steps.items():
                t = time.perf_counter()
                for _ in range(args.steps):
                    fn()
                times[name].append((time.perf_counter() - t) / args.steps * b / batch)
        base = statistics.median(times[variants[0][0]])
        print(f"\n{precision}: ms per step of {b} samples (median of {args.rounds} rounds x {args.steps} steps)")
        for name, (_, _, first) in steps.items():
            ms = 1e3 * statistics.median(times[name])
            extra = f"  (first call {first:.1f} s: compile)" if "compile" in name else ""
            print(f"  {name:<48} {ms:8.1f} ms  {1e3 * base / ms:5.2f}x{extra}")
    return 0


if __name__ == "__main__":
    from vesselfast.errors import UserError
    try:
        raise SystemExit(main())
    except UserError as e:  # a bad --preset or precision: one line, exit 2
        print(f"{Path(__file__).name}: {e}", file=sys.stderr)
        raise SystemExit(2)

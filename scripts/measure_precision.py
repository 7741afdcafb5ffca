#!/usr/bin/env python
"""fp32 vs bf16, NCHW vs channels_last, for the project's own networks on this CPU (docs/PRECISION.md).

    python scripts/measure_precision.py                                          # this CPU as it is
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python scripts/measure_precision.py   # the AVX2 class

Medians of timed calls after a warm-up, 2 threads: the quick preset's generator training step (batch 8,
64 px, NCHW as the pipeline trains it), its inference (batch 16) and the segmenter's training step
(batch 8), each in fp32 and bf16 autocast.
"""
from __future__ import annotations

import dataclasses

import torch
from _timing import median_ms


def generator_step(prec, channels_last, sched, x0, mask):
    """One generator training step (forward, weighted loss, backward, AdamW) in a given memory format:
    train_generator itself always trains in NCHW, so the comparison needs its own step."""
    from vesselfast.models import autocast
    from vesselfast.ops import vessel_noise_loss
    from vesselfast.pipeline.config import GeneratorTrainConfig
    from vesselfast.pipeline.generative import build_generator

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_generator(GeneratorTrainConfig(), 0).train().to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), 2e-4)

    def step():
        t = torch.randint(0, sched.T, (x0.shape[0],))
        noise = torch.randn_like(x0)
        with autocast("cpu", prec):
            eps = model(sched.q_sample(x0, t, noise).contiguous(memory_format=fmt), t,
                        mask.contiguous(memory_format=fmt))
        loss = vessel_noise_loss(noise, eps.float(), mask).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def main() -> int:
    from vesselfast import hardware
    from vesselfast.diffusion import NoiseSchedule
    from vesselfast.models import SegmenterUNet, autocast, to_memory_format
    from vesselfast.pipeline.config import GeneratorTrainConfig
    from vesselfast.pipeline.generative import build_generator, train_generator
    from vesselfast.pipeline.segmentation import train_segmenter

    torch.set_num_threads(2)
    native, why = hardware.native_bf16_cpu()
    print(f"{hardware.cpu_model()}, torch capability {hardware.cpu_capability()}, {why}")
    sched = NoiseSchedule.make("linear", 1000)
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(64, 1, 64, 64, generator=g) * 2 - 1
    masks = (torch.rand(64, 1, 64, 64, generator=g) < .12).float()
    for prec in ("fp32", "bf16"):
        gcfg = dataclasses.replace(GeneratorTrainConfig(), precision=prec)
        model = build_generator(gcfg, 0)
        ms = median_ms(lambda: train_generator(model, imgs, masks, 2, gcfg, sched, 0), n=3) / 2
        print(f"{prec} generator training step (batch 8, 64 px, NCHW): {ms:.1f} ms")
        for cl in (False, True):
            print(f"{prec} generator training step, hand-rolled (batch 8, {'channels_last' if cl else 'NCHW'}): "
                  f"{median_ms(generator_step(prec, cl, sched, imgs[:8], masks[:8]), n=7, warm=2):.1f} ms")
        for cl in (False, True):
            net = to_memory_format(build_generator(GeneratorTrainConfig(), 0).eval(), cl)
            x = imgs[:16].contiguous(memory_format=torch.channels_last) if cl else imgs[:16]
            t = torch.full((16,), 500)

            def infer():
                with torch.no_grad(), autocast("cpu", prec):
                    net(x, t, masks[:16])
            print(f"{prec} generator inference (batch 16, {'channels_last' if cl else 'NCHW'}): {median_ms(infer):.1f} ms")
        for cl in (False, True):
            torch.manual_seed(0)
            seg = SegmenterUNet(1, (16, 32, 64, 128, 256))
            ms = median_ms(lambda: train_segmenter(imgs, masks, 4, 8, model=seg, precision=prec, channels_last=cl),
                           n=3) / 4
            print(f"{prec} segmenter training step (batch 8, {'channels_last' if cl else 'NCHW'}): {ms:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python
"""Domain gap of the built-in synthetic data: a segmenter trained on synthetic fundus (preprocessed like
real fundus) applied to synthetic OCTA, against one trained on synthetic OCTA labels (the oracle).

    python scripts/measure_domain_gap.py            # defaults: the numbers in docs/DATA.md
    python scripts/measure_domain_gap.py --steps 100 --n-train 8   # a quick smoke run

Uses vesselfast.pipeline.segmentation (train_segmenter / predict_probs) and vesselfast.metrics. The oracle's
target training labels are drawn from the generator directly: this is a measurement, not the method.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=24, help="training images per domain")
    ap.add_argument("--n-test", type=int, default=16, help="test images per domain")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--crops", type=int, default=512, help="training crops per domain (half vessel-centred)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-clahe", action="store_true", help="preprocess both domains without CLAHE")
    ap.add_argument("--skip-oracle", action="store_true", help="train only the source-only model")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--png", default=None, help="write a picture: OCTA test image | label | source-only | oracle")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from vesselfast.data import Sample, builtin_domain, preprocess_target, random_crops
    from vesselfast.data.synthetic import sample_rng, synth_octa
    from vesselfast.metrics import evaluate_images
    from vesselfast.pipeline.segmentation import predict_probs, train_segmenter

    t0 = time.perf_counter()
    clahe = not args.no_clahe
    src_train = builtin_domain("source", "train", args.n_train, args.size, args.seed, clahe=clahe)
    src_test = builtin_domain("source", "test", args.n_test, args.size, args.seed, clahe=clahe)
    tgt_test = builtin_domain("target", "test", args.n_test, args.size, args.seed, clahe=clahe)
    oracle_train = []
    for i in range(args.n_train):   # labelled synthetic OCTA for the oracle only
        g, m = synth_octa(sample_rng(args.seed, "target", "train", i), args.size)
        im, mm, fv = preprocess_target(g, m, clahe=clahe)
        oracle_train.append(Sample(f"oracle_{i}", im, mm, fv, "builtin"))
    t_data = time.perf_counter() - t0

    def fit(samples, seed):
        rng = np.random.default_rng(seed)
        x, y, _ = random_crops(samples, args.crops, args.crop, rng, vessel_centred=0.5)
        return train_segmenter(torch.from_numpy(x), torch.from_numpy(y), steps=args.steps, batch_size=args.batch,
                               seed=seed)

    def evaluate(model, samples):
        probs = [predict_probs(model, s.image) for s in samples]
        fovs = [s.fov if s.modality == "fundus" else None for s in samples]
        r = evaluate_images(probs, [s.mask for s in samples], fovs)
        return {k: round(float(r[k]), 4) for k in ("dsc", "dsc_std", "auc", "auc_std", "ahd", "ahd_std")}

    t1 = time.perf_counter()
    f_src = fit(src_train, args.seed)
    t_src = time.perf_counter() - t1
    t1 = time.perf_counter()
    f_tgt = None if args.skip_oracle else fit(oracle_train, args.seed + 1)
    t_tgt = time.perf_counter() - t1
    res = {
        "fundus->fundus (sanity)": evaluate(f_src, src_test),
        "fundus->OCTA (source only: the gap)": evaluate(f_src, tgt_test),
    }
    if f_tgt is not None:
        res["OCTA->OCTA (oracle)"] = evaluate(f_tgt, tgt_test)
    if args.png and f_tgt is not None:
        import cv2

        s = tgt_test[0]
        row = [(s.image + 1) / 2, s.mask.astype(np.float32), predict_probs(f_src, s.image),
               predict_probs(f_tgt, s.image)]
        cv2.imwrite(args.png, np.clip(np.concatenate(row, 1) * 255 + 0.5, 0, 255).astype(np.uint8))
    res["settings"] = vars(args)
    res["seconds"] = {"data": round(t_data, 1), "train_source": round(t_src, 1), "train_oracle": round(t_tgt, 1),
                      "total": round(time.perf_counter() - t0, 1)}
    for k, v in res.items():
        if k not in ("settings", "seconds"):
            print(f"{k:38s} DSC {v['dsc']:.3f} +- {v['dsc_std']:.3f}   AUC {v['auc']:.3f}   AHD {v['ahd']:.2f} px")
    print("seconds:", res["seconds"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

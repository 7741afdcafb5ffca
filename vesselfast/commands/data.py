"""``vesselfast data synth --out DIR [--n N] [--size S] [--seed K]`` and
``vesselfast data check PATH... [--role source|target] [--split S] [--json]``."""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

from vesselfast.errors import UserError


def add_arguments(p):
    sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    s = sub.add_parser("synth", help="write the built-in synthetic fundus (source) and OCTA (target) data set",
                       description="Write the built-in synthetic domains in the generic layout: "
                                   "OUT/source/{train,val,test}/{images,masks,fov}/ and "
                                   "OUT/target/train/images/ (unlabelled), OUT/target/{val,test}/{images,masks}/.")
    s.add_argument("--out", required=True, help="output folder (must not exist, or be empty)")
    s.add_argument("--n", type=int, default=40, help="training images per domain (val: n/4, test: n/2; default 40)")
    s.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    c = sub.add_parser("check", help="validate data folders: layout, counts, sizes, vessel fraction",
                       description="Validate one domain made of one or more folders.")
    c.add_argument("paths", nargs="+", metavar="PATH", help="data folder(s) of one domain, checked as one")
    c.add_argument("--role", choices=("source", "target"), default=None,
                   help="source (labelled fundus) or target (OCTA; train labels never read); "
                        "default: from the detected layout")
    c.add_argument("--split", choices=("train", "val", "test", "all"), default="all",
                   help="check only this split of folders that have splits (default: all; a folder without "
                        "splits counts for every split)")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(_data_parser=p)


def run(args) -> int:
    if args.data_command == "synth":
        return _synth(args)
    if args.data_command == "check":
        return _check(args)
    args._data_parser.print_help()
    return 2


def _check(args) -> int:
    from vesselfast.data.check import check_paths, format_report, infer_role

    role = args.role or infer_role(args.paths)
    rep = check_paths(args.paths, role, split=args.split)
    print(json.dumps(rep, indent=2) if args.json else format_report(rep))
    problems = rep["problems"]
    if problems:
        if len(problems) == 1:
            raise UserError(problems[0])
        print(f"vesselfast: error: {len(problems)} problems; fix each and check again:", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        return 2
    return 0


def _synth(args) -> int:
    if args.n < 1:
        raise UserError(f"--n {args.n}: must be >= 1")
    if args.size < 32:
        raise UserError(f"--size {args.size}: must be >= 32 (default 256)")
    out = os.path.abspath(args.out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UserError(f"--out {args.out}: already exists and is not an empty folder; choose a new path or remove it")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise UserError(f"--out {args.out}: parent folder {parent} does not exist; create it first")
    t0 = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix=".synth-", dir=parent)
    try:
        counts = write_synthetic(tmp, n=args.n, size=args.size, seed=args.seed)
        if os.path.isdir(out):
            os.rmdir(out)  # empty, checked above
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    dt = time.perf_counter() - t0
    total = sum(counts.values())
    print(f"wrote {total} images to {out} in {dt:.1f} s: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"use: --source {os.path.join(out, 'source')} --target {os.path.join(out, 'target')}", file=sys.stderr)
    return 0


def split_counts(n: int):
    return {"train": n, "val": max(1, n // 4), "test": max(1, n // 2)}


def write_synthetic(root: str, n: int, size: int = 256, seed: int = 0):
    """Write the synthetic domains under ``root`` (generic layout); returns {"source/train": count, ...}.
    Target train images are written without labels, as real target training data."""
    import numpy as np

    from vesselfast.data.synthetic import raw_pair

    counts = {}
    for role in ("source", "target"):
        for split, k in split_counts(n).items():
            base = os.path.join(root, role, split)
            dirs = ["images"] + (["masks", "fov"] if role == "source" else ([] if split == "train" else ["masks"]))
            for d in dirs:
                os.makedirs(os.path.join(base, d), exist_ok=True)
            for i in range(k):
                img, mask, fov = raw_pair(role, split, i, size, seed)
                stem = f"{i:04d}"
                im = img[..., ::-1] if img.ndim == 3 else img  # OpenCV writes BGR
                _write(os.path.join(base, "images", stem + ".png"), im)
                if "masks" in dirs:
                    _write(os.path.join(base, "masks", stem + ".png"), (mask * 255).astype(np.uint8))
                if "fov" in dirs:
                    _write(os.path.join(base, "fov", stem + ".png"), fov.astype(np.uint8) * 255)
            counts[f"{role}/{split}"] = k
    manifest = {"generator": "vesselfast.data.synthetic", "version": 1, "n": n, "size": size, "seed": seed,
                "counts": counts, "layout": "generic: {train,val,test}/images|masks[|fov]; target/train unlabelled"}
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    return counts


def _write(path, arr):
    import cv2

    if not cv2.imwrite(path, arr):
        raise UserError(f"{path}: could not write the file; check the disk and permissions")

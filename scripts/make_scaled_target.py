#!/usr/bin/env python
"""A second labelled OCTA target from one you have: every image and label of a split-folder data set
(``{train,val,test}/image|label``) resampled by one factor, as a scan of another pixel size would show
them. Images by area averaging (box filter), labels by bilinear interpolation of 0/255 thresholded at half,
written as PNG under DST in the same layout. Used for docs/PIPELINE.md, "A second target".

    python scripts/make_scaled_target.py ../shared/data/octa/OCTA-500_3M /tmp/OCTA3M_x0667 --scale 0.6667
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--scale", type=float, required=True, help="new size / old size, e.g. 0.6667")
    args = ap.parse_args(argv)
    if not args.scale > 0:
        ap.error(f"--scale {args.scale}: give a factor above 0")
    src, dst = Path(args.src), Path(args.dst)
    folders = [(src / sp / kind, kind) for sp in ("train", "val", "test") for kind in ("image", "label")
               if (src / sp / kind).is_dir()]
    if not folders:
        ap.error(f"{src}: no {{train,val,test}}/image or label folder; give a split-folder data set")
    if dst.exists():
        ap.error(f"{dst}: exists; give a new folder")
    partial = dst.with_name(dst.name + ".partial")  # renamed to dst when complete: nothing half-written
    try:
        shutil.rmtree(partial, ignore_errors=True)
        for folder, kind in folders:
            write_scaled(folder, partial / folder.relative_to(src), kind, args.scale)
        partial.rename(dst)
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        print(f"make_scaled_target.py: cannot write {dst} ({exc.strerror or exc}); give a writable folder",
              file=sys.stderr)
        return 2
    return 0


def write_scaled(folder, out, kind: str, scale: float) -> None:
    """Every file of ``folder`` resampled by ``scale`` into ``out`` as PNG (``kind``: image or label)."""
    import numpy as np
    from PIL import Image

    out.mkdir(parents=True)
    for f in sorted(p for p in folder.iterdir() if p.is_file()):
        im = Image.open(f).convert("L")
        size = (max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale)))
        if kind == "image":
            im = im.resize(size, Image.Resampling.BOX)
        else:
            a = np.asarray(im.resize(size, Image.Resampling.BILINEAR))
            im = Image.fromarray(np.where(a >= 128, 255, 0).astype(np.uint8))
        im.save(out / (f.stem + ".png"))
    print(f"{folder}: {sum(1 for _ in out.iterdir())} files resampled", flush=True)


if __name__ == "__main__":
    sys.exit(main())

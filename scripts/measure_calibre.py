#!/usr/bin/env python
"""Mean labelled vessel width (area / skeleton length, per image then mean) of data folders and of the
built-in synthetic domains, and the rescale factor that matches each to OCTA-500 3M.

    python scripts/measure_calibre.py ../shared/data/fundus/DRIVE ../shared/data/fundus/CHASE_DB1 \
        ../shared/data/octa/OCTA-500_3M
"""
from __future__ import annotations

import argparse
import sys

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="*")
    ap.add_argument("--reference", type=float, default=None,
                    help="target calibre in px (default: measured on an OCTA-500 3M path if given, else 1.68)")
    ap.add_argument("--synthetic", type=int, default=20, help="synthetic images per domain (0: skip)")
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args(argv)

    from vesselfast.data.calibre import mean_width
    from vesselfast.data.io import read_mask
    from vesselfast.data.layouts import detect
    from vesselfast.data.synthetic import raw_pair

    rows = []
    for p in args.paths:
        lay = detect(p)
        role_test = lay.modality == "octa"
        # OCTA: only labels of val/test are read (train labels stay untouched, as everywhere)
        ents = [e for sp in (("val", "test") if role_test else ("all",)) for e in lay.entries(sp, True)]
        ws = [mean_width(read_mask(e.mask)) for e in ents]
        rows.append((lay.key, p, len(ws), float(np.nanmean(ws)), float(np.nanstd(ws))))
    for role in (("source", "target") if args.synthetic else ()):
        ws = [mean_width(raw_pair(role, "test", i, args.size)[1]) for i in range(args.synthetic)]
        rows.append((f"synthetic {role} @{args.size}", "builtin", len(ws), float(np.mean(ws)), float(np.std(ws))))
    ref = args.reference
    if ref is None:
        ref = next((r[3] for r in rows if r[0] == "OCTA-500_3M"), 1.68)
    print(f"{'data':28s} {'images':>6s} {'width px':>10s} {'factor to ' + format(ref, '.2f') + ' px':>18s}")
    for key, p, n, m, s in rows:
        print(f"{key:28s} {n:6d} {m:6.2f}+-{s:4.2f} {ref / m:18.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

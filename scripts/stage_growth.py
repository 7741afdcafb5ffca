#!/usr/bin/env python
"""Stage by stage cost of one run against another (e.g. a target repeated 4x against the normal run):
seconds of each stage in both runs' stages.json, their ratio, the segmenters' inference seconds, and
per kind of work (metrics.json ``profile``). A stage one run took from a ``--reuse`` run counts with
the seconds it cost where it was computed.

    python scripts/stage_growth.py runs/normal runs/4x [--limit 1.5]

Prints a markdown table; exits 1 when a stage's ratio is above ``--limit`` (default: only report).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _load(run: str, name: str) -> dict:
    path = Path(run) / name
    if not path.is_file():
        print(f"stage_growth.py: {path}: not found; point both arguments at run directories made by "
              "vesselfast train", file=sys.stderr)
        raise SystemExit(2)
    return json.loads(path.read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference")
    ap.add_argument("other")
    ap.add_argument("--limit", type=float, help="fail (exit 1) when a stage's ratio exceeds it")
    args = ap.parse_args(argv)
    ref, other = _load(args.reference, "stages.json"), _load(args.other, "stages.json")
    worst = (0.0, "")
    print(f"| stage | {args.reference} s | {args.other} s | ratio | inference s (ratio) |")
    print("|---|---|---|---|---|")
    for stage in ref:
        if stage not in other or "seconds" not in ref[stage]:
            continue
        a, b = ref[stage]["seconds"], other[stage]["seconds"]
        ratio = b / a if a > 0 else float("nan")
        ia, ib = ref[stage].get("inference_seconds"), other[stage].get("inference_seconds")
        inf = f"{ia:.1f} -> {ib:.1f} ({ib / ia:.2f})" if ia and ib else ""
        print(f"| {stage} | {a:.1f} | {b:.1f} | {ratio:.2f} | {inf} |")
        worst = max(worst, (ratio, stage))
    pa = _load(args.reference, "metrics.json").get("profile", {})
    pb = _load(args.other, "metrics.json").get("profile", {})
    for kind in pa:
        if kind in pb and pa[kind] > 0:
            print(f"| *{kind}* | {pa[kind]:.1f} | {pb[kind]:.1f} | {pb[kind] / pa[kind]:.2f} | |")
    ta, tb = sum(pa.values()), sum(pb.values())
    print(f"| **all stages** | {ta:.1f} | {tb:.1f} | {tb / ta:.2f} | |")
    print(f"\nlargest stage ratio: {worst[0]:.2f} ({worst[1]})")
    return 1 if args.limit is not None and worst[0] > args.limit else 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python
"""Diagnostic: ``vesselfast train`` with the survey's target calibre replaced by a given width, so that a
run shows what the rest of the method does when the sources are rescaled to the target's true vessel width
(each source folder by ``target_calibre / its labelled calibre``, as the survey would with that estimate).
The width comes from the caller, e.g. ``scripts/measure_calibre.py`` on the target's test labels; a run made
this way has seen a label-derived number and is an oracle for docs/PIPELINE.md's ablations, not a result.

    GLIBC_TUNABLES=... python scripts/train_at_calibre.py --target-calibre 1.63 -- --preset real-cpu \
        --source ../shared/data/fundus/DRIVE ../shared/data/fundus/CHASE_DB1 --target /tmp/OCTA3M_x0667 \
        --out runs/oracle_x0667_s0

Everything after ``--`` goes to ``vesselfast train``. Set the CLI's allocator tunables yourself (the CLI
re-executes itself to set them only when started from the shell, which would drop the replacement).
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target-calibre", type=float, required=True, help="the target's mean vessel width in px")
    args = ap.parse_args(ours)
    if not args.target_calibre > 0:
        ap.error(f"--target-calibre {args.target_calibre}: give a width above 0 px")

    from vesselfast.cli import main as cli_main
    from vesselfast.data.calibre import mean_calibre
    from vesselfast.pipeline import run as run_module
    from vesselfast.pipeline.rundir import LOG

    def fixed_calibre(ctx, inputs, sample):
        calibres = {folder: mean_calibre(s.mask for s in samples) for folder, samples in inputs.sources.items()}
        factors = {folder: args.target_calibre / c for folder, c in calibres.items()}
        LOG.info(f"survey replaced (scripts/train_at_calibre.py): target calibre {args.target_calibre:.2f} px given; "
                 f"rescale factors " + ", ".join(f"{k} {v:.3f}" for k, v in factors.items()))
        # an identity no real survey has, so a later --reuse of this run never takes its data stages
        ctx.cache.identities["survey"] = f"oracle-calibre-{args.target_calibre:g}"
        return factors

    run_module.survey_stage = fixed_calibre
    return cli_main(["train", *rest])


if __name__ == "__main__":
    sys.exit(main())

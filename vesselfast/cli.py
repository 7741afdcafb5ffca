"""``vesselfast`` command line: ``info | train | eval | compare | segment | measure | export | bench | data``.

Each sub-command lives in ``vesselfast/commands/<name>.py`` with ``add_arguments(parser)`` and
``run(args) -> int``: a small entry function that calls plain library functions. Modules are imported
only when their command runs, so ``vesselfast info`` stays fast. A :class:`vesselfast.UserError`
becomes one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import List, Optional

from vesselfast import __version__
from vesselfast.errors import UserError

# name -> one-line help; the module vesselfast.commands.<name> implements it.
COMMANDS = {
    "info": "versions, compiled extension, Triton, and which backend each fused op uses",
    "train": "run the method end to end into a run directory",
    "eval": "evaluate a run's saved segmenters on target test images",
    "compare": "put runs' metrics side by side, with what each run changed",
    "segment": "segment images with a trained model",
    "measure": "vessel biomarkers (density, calibre, fractal dimension, branches) of binary masks to a CSV",
    "export": "export a trained segmenter to ONNX / TensorRT",
    "bench": "throughput benchmarks (pytest-benchmark) and regression check",
    "data": "synthesise the built-in data set or check a data folder",
}


def _command_module(name: str):
    return importlib.import_module(f"vesselfast.commands.{name}")


def build_parser(argv: List[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vesselfast", description="Cross-domain retinal vessel segmentation: train on labelled colour fundus "
        "photographs and unlabelled OCTA scans, then segment and measure OCTA. Run 'vesselfast COMMAND --help' "
        "for a command's options.")
    parser.add_argument("--version", action="version", version=f"vesselfast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Only the command being run gets its (possibly heavy) module imported.
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:
            _command_module(name).add_arguments(p)
            p.set_defaults(_run=_command_module(name).run)
    return parser


# Commands that run long on big tensors get the tuned allocator (see vesselfast/allocator.py).
HEAVY = ("train", "eval", "segment", "bench")


def main(argv: Optional[List[str]] = None) -> int:
    from_shell = argv is None
    argv = sys.argv[1:] if argv is None else argv
    if from_shell and argv and argv[0] in HEAVY:
        from vesselfast.allocator import reexec_with_tuned_allocator
        reexec_with_tuned_allocator(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not hasattr(args, "_run"):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args._run(args) or 0)
    except UserError as exc:
        print(f"vesselfast: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # `vesselfast info | head`: the reader left early, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush is silent
        return 0
    except KeyboardInterrupt:
        print("vesselfast: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

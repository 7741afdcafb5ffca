"""``vesselfast segment --model seg.onnx|DIR|checkpoint INPUT... --out OUT``: probability and binary PNGs.

The model's metadata decides preprocessing, tile, stride and threshold; ``--backend auto`` runs ONNX
files with ONNX Runtime, engines with TensorRT and checkpoints with torch.
"""


def add_arguments(p):
    from vesselfast.commands.measure import add_pixel_size_argument

    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    p.add_argument("--model", required=True,
                   help="an exported .onnx, a TensorRT engine, a run directory (its final segmenter) or a checkpoint")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--backend", default="auto", choices=["auto", "ort", "torch", "tensorrt"],
                   help="runtime (default: by model type; a checkpoint with ort/tensorrt is exported in memory)")
    p.add_argument("--tile", type=int, help="sliding-window tile (default: the model's)")
    p.add_argument("--stride", type=int, help="sliding-window stride (default: the model's)")
    p.add_argument("--batch", type=int, default=8, help="tiles per batch (default 8)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: a GPU when there is one)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="torch backend: autocast precision (default auto: bf16 where the hardware runs it "
                        "natively, else fp32 on CPU)")
    p.add_argument("--measure", action="store_true",
                   help="also write the masks' vessel biomarkers to OUT/biomarkers.csv (see vesselfast measure)")
    add_pixel_size_argument(p, "the units of --measure")


def run(args) -> int:
    import sys
    from pathlib import Path

    from vesselfast.errors import UserError
    from vesselfast.export.api import Segmenter, model_kind, torch_device
    from vesselfast.hardware import option_precision
    from vesselfast.export.files import expand_inputs
    from vesselfast.commands.measure import CSV_NAME, check_pixel_size, measure_files

    if args.batch < 1:
        raise UserError(f"--batch {args.batch}: use at least 1")
    check_pixel_size(args.pixel_size)
    expand_inputs(args.inputs)  # bad inputs fail before a model is loaded or exported
    precision = args.precision
    if args.backend == "torch" or (args.backend == "auto" and model_kind(Path(args.model)) == "checkpoint"):
        precision, warning = option_precision(args.precision, torch_device(args.device))
        if warning:
            print(f"vesselfast: warning: {warning}", file=sys.stderr)
    seg = Segmenter.load(args.model, args.backend, args.device, precision=precision)
    seg.window(args.tile, args.stride)
    print(f"vesselfast segment: {seg.describe()}", flush=True)
    written = seg.segment_files(args.inputs, args.out, args.tile, args.stride, args.batch)
    print(f"wrote {len(written)} probability maps and masks to {args.out}")
    if args.measure:  # the masks as written: <name>_mask.png beside each <name>_prob.png
        masks = [p.with_name(p.name[:-len("_prob.png")] + "_mask.png") for p in written]
        measure_files(masks, Path(args.out) / CSV_NAME, args.pixel_size)
        print(f"wrote the biomarkers of {len(masks)} masks to {Path(args.out) / CSV_NAME}")
    return 0

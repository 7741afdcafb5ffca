"""``vesselfast segment [--model seg.onnx|DIR|checkpoint] INPUT... --out OUT``: probability and binary PNGs
(and with ``--overlay`` the scan with its mask drawn in red), and ``OUT/segment.csv``: per image its size,
pixel size, rescale factor and quality flag (export/quality.py). Without ``--model``: the shipped model
(vesselfast/shipped, docs/MODELS.md).

The model's metadata decides preprocessing, tile, stride and threshold; ``--backend auto`` runs ONNX
files with ONNX Runtime, engines with TensorRT and checkpoints with torch. Every check (options, output
folder, inputs, sizes, rescale factors) runs before the first image is segmented.
"""


def add_arguments(p):
    from vesselfast.commands.measure import add_pixel_size_argument
    from vesselfast.export.files import MAX_PIXELS

    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    p.add_argument("--model",
                   help="an exported .onnx, a TensorRT engine, a run directory (its final segmenter) or a checkpoint "
                        "(default: the shipped model, trained without OCTA labels for 3 x 3 mm / 304 px scans; "
                        "docs/MODELS.md)")
    p.add_argument("--out", required=True, help="output folder (created when missing)")
    p.add_argument("--backend", default="auto", choices=["auto", "ort", "torch", "tensorrt"],
                   help="runtime (default: by model type; a checkpoint with ort/tensorrt is exported in memory)")
    p.add_argument("--tile", type=int, help="sliding-window tile in px, at least 16 (default: the model's)")
    p.add_argument("--stride", type=int,
                   help="sliding-window stride in px, 1..tile (default: the model's; with --tile, the model's overlap)")
    p.add_argument("--batch", type=int, default=8, help="tiles per batch (default 8)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: a GPU when there is one)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="torch backend: autocast precision (default auto: bf16 where the hardware runs it "
                        "natively, else fp32 on CPU)")
    p.add_argument("--overlay", action="store_true",
                   help="also write <name>_overlay.png: the scan with its vessel mask drawn in red")
    p.add_argument("--measure", action="store_true",
                   help="also write the masks' vessel biomarkers to OUT/biomarkers.csv (see vesselfast measure)")
    add_pixel_size_argument(p, "each image is resized to the model's pixel size for segmenting and the maps back; "
                               "also the units of --measure")
    p.add_argument("--fov-mm", type=float, metavar="MM",
                   help="instead of --pixel-size: the scans' field of view width in mm (pixel size = 1000 * MM / "
                        "image width, e.g. 3 for a 3 x 3 mm scan)")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                   help=f"largest image segmented, width x height after any rescale (default {MAX_PIXELS} = "
                        "4096 x 4096; memory is ~45 bytes per pixel)")


def check_options(args) -> None:
    """Option values refused before anything is read or loaded."""
    from vesselfast.commands.measure import check_pixel_size
    from vesselfast.errors import UserError
    from vesselfast.export.api import check_window

    if args.batch < 1:
        raise UserError(f"--batch {args.batch}: use at least 1")
    if args.max_pixels < 1:
        raise UserError(f"--max-pixels {args.max_pixels}: give a positive number of pixels (width x height)")
    check_window(args.tile, args.stride)
    check_pixel_size(args.pixel_size)
    if args.fov_mm is not None:
        if args.pixel_size is not None:
            raise UserError("--pixel-size and --fov-mm both given: give one (pixel size = 1000 * MM / image width)")
        check_pixel_size(args.fov_mm, "--fov-mm", "give the scans' field of view width in millimetres, a positive "
                                                   "number (e.g. 3 for a 3 x 3 mm scan)")


def run(args) -> int:
    import sys
    from pathlib import Path

    from vesselfast.export.api import Segmenter, model_kind, torch_device
    from vesselfast.hardware import option_precision
    from vesselfast.export.files import plan_files, set_scales, write_summary
    from vesselfast.export.quality import WIDTH, pixel_size_warning, quality_summary
    from vesselfast.commands.measure import CSV_NAME, measure_files

    check_options(args)
    model, named = args.model, args.model
    if model is None:
        from vesselfast import shipped
        model, named = str(shipped.model_path()), f"{shipped.NAME} (shipped; docs/MODELS.md)"
    # bad inputs and an unwritable --out fail before a model is loaded or exported
    jobs = plan_files(args.inputs, args.out, args.pixel_size, args.fov_mm, args.max_pixels)
    precision = args.precision
    if args.backend == "torch" or (args.backend == "auto" and model_kind(Path(model)) == "checkpoint"):
        precision, warning = option_precision(args.precision, torch_device(args.device))
        if warning:
            print(f"vesselfast: warning: {warning}", file=sys.stderr)
    seg = Segmenter.load(model, args.backend, args.device, precision=precision)
    tile, stride = seg.window(args.tile, args.stride)
    scaling = set_scales(jobs, seg.pixel_size_um, args.max_pixels)
    count = f"{len(jobs)} image{'s' if len(jobs) != 1 else ''}"
    print(f"vesselfast segment: model {named}, {seg.describe(tile, stride)}; {count}"
          + (f"; {scaling}" if scaling else ""), flush=True)
    written = seg.run_jobs(jobs, args.out, tile, stride, args.batch, args.overlay)
    summary = write_summary(jobs, args.out)
    kinds = "probability maps, masks and overlays" if args.overlay else "probability maps and masks"
    print(f"wrote {len(written)} {kinds} to {args.out}, one row per image to {summary}")
    print(quality_summary([job.name for job in jobs], [job.quality for job in jobs]))
    if args.pixel_size is None and args.fov_mm is None:
        warning = pixel_size_warning([job.quality[WIDTH] for job in jobs], seg.meta.get("quality_reference"),
                                     seg.pixel_size_um)
        if warning:
            print(f"vesselfast: warning: {warning}", file=sys.stderr)
    if args.measure:  # the masks as written: <name>_mask.png beside each <name>_prob.png, at the image's size
        masks = [p.with_name(p.name[:-len("_prob.png")] + "_mask.png") for p in written]
        measure_files(masks, Path(args.out) / CSV_NAME, [job.pixel_size_um for job in jobs])
        print(f"wrote the biomarkers of {len(masks)} masks to {Path(args.out) / CSV_NAME}")
    return 0

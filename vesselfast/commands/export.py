"""``vesselfast export --onnx | --tensorrt (--run DIR | --checkpoint FILE) --out FILE``.

Exports the final (or a given) segmenter, checks it against torch on random and real inputs, and only
then writes the file: a failed check leaves nothing behind. The file carries its model card and, from a
run directory, the quality reference of the per-image flag (docs/MODEL_CARD.md).
"""


def add_arguments(p):
    fmt = p.add_mutually_exclusive_group(required=True)
    fmt.add_argument("--onnx", action="store_true", help="write an ONNX model with vesselfast metadata")
    fmt.add_argument("--tensorrt", action="store_true", help="write a serialized TensorRT engine (needs a GPU)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory: exports its final segmenter")
    src.add_argument("--checkpoint", help="a segmenter checkpoint (e.g. DIR/ckpt/segmenter_2.pt)")
    p.add_argument("--out", required=True, help="output file (.onnx, or .engine for --tensorrt)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    p.add_argument("--fp16", action="store_true", help="half-precision weights and activations inside")
    p.add_argument("--check-images", nargs="*", default=[], metavar="IMAGE",
                   help="real images for the parity check (default: the run's first two target images, "
                        "else two built-in synthetic OCTA images)")
    p.add_argument("--max-batch", type=int, default=16, help="TensorRT: largest batch of tiles")
    p.add_argument("--max-tile", type=int, default=1024, help="TensorRT: largest tile side")
    card = p.add_argument_group("model card (docs/MODEL_CARD.md)")
    card.add_argument("--name", help="the model's name (default: the run directory's or checkpoint's name)")
    card.add_argument("--pixel-size", type=float, metavar="UM",
                      help="micrometres per pixel of the training target images (3 mm / 304 px: 9.87)")
    card.add_argument("--fov-mm", type=float, metavar="MM",
                      help="instead of --pixel-size: the training images' field of view width in mm, with --image-px")
    card.add_argument("--image-px", type=int, metavar="N", help="with --fov-mm: the training images' width in pixels")
    card.add_argument("--terms", help="licence / terms of use (default: research use, the training data's terms)")
    card.add_argument("--not-for", metavar="TEXT", help="what the model is not for (default: a generic statement)")
    card.add_argument("--training-data", metavar="TEXT",
                      help="describe the training data (default: from the run's config.yaml)")
    card.add_argument("--quality-images", type=int, metavar="N",
                      help="target training images measured for the quality flag's reference (default: all; 0: none)")


def run(args) -> int:
    from pathlib import Path

    from vesselfast.errors import UserError
    from vesselfast.export.api import ENGINE_SUFFIXES, ONNX_SUFFIXES
    from vesselfast.export.metadata import pixel_size
    from vesselfast.export.workflow import CardOptions, export_checked

    out = Path(args.out)
    suffixes = ONNX_SUFFIXES if args.onnx else ENGINE_SUFFIXES
    want = suffixes[0]
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; give a file name such as {out / ('seg' + want)}")
    if out.suffix.lower() not in suffixes:  # segment picks the runtime by the suffix: refuse, do not rename
        raise UserError(f"--out {out}: {'an ONNX model' if args.onnx else 'a TensorRT engine'} needs the "
                        f"{' / '.join(suffixes)} suffix (vesselfast segment tells the formats apart by it); "
                        f"use --out {out.with_name(out.name + want)}")
    if args.quality_images is not None and args.quality_images < 0:
        raise UserError(f"--quality-images {args.quality_images}: give a number of images >= 0 (0: no quality reference)")
    card = CardOptions(name=args.name, pixel_size_um=pixel_size(args.pixel_size, args.fov_mm, args.image_px),
                       terms=args.terms, not_for=args.not_for, training_data=args.training_data,
                       quality_images=args.quality_images)
    report = export_checked(args.run or args.checkpoint, out, "onnx" if args.onnx else "tensorrt",
                            opset=args.opset, fp16=args.fp16, check_images=args.check_images,
                            max_batch=args.max_batch, max_tile=args.max_tile,
                            option="--run" if args.run else "--checkpoint", card=card)
    print(report)
    return 0

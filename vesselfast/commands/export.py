"""``vesselfast export --onnx | --tensorrt (--run DIR | --checkpoint FILE) --out FILE``.

Exports the final (or a given) segmenter, checks it against torch on random and real inputs, and only
then writes the file: a failed check leaves nothing behind.
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


def run(args) -> int:
    from pathlib import Path

    from vesselfast.errors import UserError
    from vesselfast.export.workflow import export_checked

    out = Path(args.out)
    want = ".onnx" if args.onnx else ".engine"
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; give a file name such as {out / ('seg' + want)}")
    report = export_checked(args.run or args.checkpoint, out, "onnx" if args.onnx else "tensorrt",
                            opset=args.opset, fp16=args.fp16, check_images=args.check_images,
                            max_batch=args.max_batch, max_tile=args.max_tile)
    print(report)
    return 0

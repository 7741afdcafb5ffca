"""``vesselfast segment --model DIR|checkpoint INPUT... --out OUT``: probability and binary PNGs."""


def add_arguments(p):
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    p.add_argument("--model", required=True, help="run directory (its final segmenter) or a segmenter checkpoint")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--backend", default="torch", choices=["torch"], help="inference backend")
    p.add_argument("--tile", type=int, help="sliding-window tile (default: the model's)")
    p.add_argument("--stride", type=int, help="sliding-window stride (default: the model's)")
    p.add_argument("--batch", type=int, default=8, help="tiles per batch")
    p.add_argument("--device", default="cpu")


def run(args) -> int:
    from vesselfast.errors import UserError
    from vesselfast.inference import torch_batch_fn
    from vesselfast.segment import load_torch_segmenter, segment_files

    if args.tile is not None and args.tile < 16:
        raise UserError(f"--tile {args.tile}: use at least 16")
    if args.stride is not None and args.stride < 1:
        raise UserError(f"--stride {args.stride}: use at least 1")
    model, meta = load_torch_segmenter(args.model)
    written = segment_files(torch_batch_fn(model.to(args.device), args.device), meta, args.inputs, args.out,
                            args.tile, args.stride, args.batch)
    print(f"backend torch: wrote {len(written)} probability maps and masks to {args.out}")
    return 0

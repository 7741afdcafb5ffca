"""``vesselfast train``: the method end to end into a run directory (resumable)."""


def add_arguments(p):
    from vesselfast.pipeline.config import PRESETS

    p.add_argument("--config", help="YAML file with config keys (docs/PIPELINE.md lists them); applied after the preset")
    p.add_argument("--preset", help=f"{' | '.join(PRESETS)} (default: quick, or the config file's)")
    p.add_argument("--source", nargs="+", metavar="PATH", help="labelled fundus folder(s), or 'builtin'")
    p.add_argument("--target", metavar="PATH", help="OCTA folder (training split images; labels are never read)")
    p.add_argument("--target-test", metavar="PATH", help="OCTA folder for evaluation (default: --target's test split)")
    p.add_argument("--out", default="runs/vesselfast", help="run directory (default: runs/vesselfast)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out (a plain re-run into the same directory does the same)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. rounds=2")
    p.add_argument("--reuse", action="append", default=[], metavar="RUN_DIR",
                   help="take every stage whose identity (the config it reads and the stages it consumes) is "
                        "unchanged from this finished run instead of recomputing it (repeatable)")
    p.add_argument("--device", help="cpu | cuda")


def run(args) -> int:
    import os

    from vesselfast.errors import UserError
    from vesselfast.pipeline.config import resolve

    overrides = {}
    if args.source:
        overrides.setdefault("data", {})["source"] = args.source
    if args.target:
        overrides.setdefault("data", {})["target"] = args.target
    if args.target_test:
        overrides.setdefault("data", {})["target_test"] = args.target_test
    if args.device:
        overrides["device"] = args.device
    if args.resume:
        cfg_path = os.path.join(args.out, "config.yaml")
        if not os.path.exists(cfg_path):
            raise UserError(f"--resume: {cfg_path} not found; start the run without --resume first")
        if not (args.config or args.preset or args.set or overrides):
            args.config = cfg_path  # resume exactly what was started
    cfg = resolve(args.preset, args.config, args.set, overrides)
    if cfg.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            what = f"--device {cfg.device}" if args.device else f"device={cfg.device} (config)"
            raise UserError(f"{what}: no CUDA GPU is visible to torch {torch.__version__}; use --device cpu")

    from vesselfast.pipeline import dist
    from vesselfast.pipeline.launch import run_pipeline

    dist.init_from_env(cfg.device)  # under torchrun: join the process group (gloo on CPU, NCCL on GPU)
    main_rank = dist.is_main()
    try:
        metrics = run_pipeline(cfg, args.out, args.reuse)
    finally:
        dist.shutdown()
    if main_rank:
        from vesselfast.pipeline.keys import final_key

        best = metrics.get(final_key(metrics) or "iter0", {})
        score = f"final DSC {best['dsc']:.4f}" if "dsc" in best else "not evaluated (no labelled test images)"
        print(f"done: {args.out}/report.md  {score}")
    return 0

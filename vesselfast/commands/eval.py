"""``vesselfast eval --run DIR [--target-test PATH]``: re-evaluate a run's saved segmenters."""


def add_arguments(p):
    p.add_argument("--run", required=True, help="run directory made by vesselfast train")
    p.add_argument("--target-test", help="labelled OCTA folder (default: the run's target test split)")
    p.add_argument("--json", help="also write the metrics to this JSON file (checked writable before evaluating)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="segmenter inference precision (default auto: bf16 where the hardware runs it natively, "
                        "else fp32 on CPU)")


def run(args) -> int:
    import json
    from pathlib import Path

    from vesselfast.checkpoint import atomic_write
    from vesselfast.commands.measure import check_csv_writable
    from vesselfast.pipeline.evaluation import evaluate_run
    from vesselfast.pipeline.report import strict_json

    if args.json:
        check_csv_writable(Path(args.json), "--json", "metrics.json")
    res = evaluate_run(args.run, args.target_test, args.precision)
    print(f"{'model':<20}{'DSC':>8}{'±':>7}{'AUC':>8}{'ACC':>8}{'AHD px':>8}{'n':>5}")
    for key, m in res.items():
        print(f"{key:<20}{m['dsc']:8.4f}{m['dsc_std']:7.3f}{m['auc']:8.4f}{m['acc']:8.4f}{m['ahd']:8.2f}{m['n_images']:5d}")
    if args.json:
        text = json.dumps(strict_json(res), indent=2)
        atomic_write(Path(args.json), lambda fh: fh.write(text), "w")
    return 0

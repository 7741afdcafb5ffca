"""``vesselfast compare RUN_DIR... [--json OUT] [--plot OUT.png]``: runs side by side."""


def add_arguments(p):
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories made by vesselfast train (the first "
                                                             "is the reference the 'changed' column is relative to)")
    p.add_argument("--json", metavar="OUT", help="also write the table as JSON")
    p.add_argument("--plot", metavar="OUT.png", help="also draw DSC per model, one line per run")


def run(args) -> int:
    import json
    from pathlib import Path

    from vesselfast.checkpoint import atomic_write
    from vesselfast.pipeline.compare import compare_runs, format_markdown, json_ready, plot
    from vesselfast.pipeline.report import strict_json

    table = compare_runs(args.runs)
    print(format_markdown(table))
    if args.json:
        text = json.dumps(strict_json(json_ready(table)), indent=1)
        atomic_write(Path(args.json), lambda fh: fh.write(text), "w")
    if args.plot:
        png = plot(table)
        atomic_write(Path(args.plot), lambda fh: fh.write(png))
    return 0

"""``vesselfast info [--json]``."""
import json


def add_arguments(p):
    p.add_argument("--json", action="store_true", help="print as JSON")


def run(args) -> int:
    from vesselfast.info import collect, format_text

    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_text(info))
    return 0

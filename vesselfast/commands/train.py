"""``vesselfast train``: not available yet (the pipeline issue brings it)."""
from vesselfast.errors import UserError


def add_arguments(p):
    p.add_argument("rest", nargs="*")


def run(args) -> int:
    raise UserError("training is not available yet in this version: the pipeline (stages of the method) "
                    "has not landed; see README.md")

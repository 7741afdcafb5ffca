"""``python -m vesselfast`` (and so ``torchrun -m vesselfast``) runs the CLI."""
import sys

from vesselfast.cli import main

if __name__ == "__main__":
    sys.exit(main())

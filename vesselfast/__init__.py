"""vesselfast: cross-domain retinal vessel segmentation (fundus -> OCTA).

Method: "Cross-Domain Vessel Segmentation via Latent Similarity Mining and Iterative Co-Optimization".
See README.md and docs/ for usage; ``vesselfast info`` shows what this install can run.
"""
__version__ = "0.1.0"

from vesselfast.errors import UserError  # noqa: E402,F401

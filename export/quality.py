"""Per-image quality flag: is a segmented image like the images the model was trained on?

A model is trusted on images like its own training target. At export, :func:`reference_of` measures what
the model does on the run's target training images (images only; their labels are never read) and the
distribution is stored in the model's metadata (``quality_reference``). For each new image,
:func:`quality_flags` compares the same measures of its probability map with that distribution and says
``ok`` or ``check`` (with the reason), so a user knows which scans to look at by eye.

    from vesselfast.export.quality import quality_flags
    q = quality_flags(prob, seg.threshold, seg.meta.get("quality_reference"))
    q["flag"], q["reason"]      # "ok" / "check" / "n/a" (model without a reference), "" when ok

The measures of a probability map ``p`` (float [H, W] in [0, 1]) at the model's threshold ``t``:

* ``marked_share``: share of pixels with p >= t (what the mask marks);
* ``mean_confidence``: mean of max(p, 1 - p) (1: the model is sure everywhere, 0.5: it is guessing);
* ``vessel_free``: share of the image farther than a tenth of its short side from every marked pixel.
  OCTA en-face maps carry vessels everywhere but the small foveal avascular zone; a colour fundus
  photograph (dark corners outside its circular field of view, wide gaps between its few large vessels),
  a blank or cropped scan or a large artefact leaves large regions unmarked.

* ``vessel_width_px``: mean width in pixels of what the mask marks (area / skeleton length,
  vesselfast.data.calibre). Not part of the flag: it follows the scan's pixel size (on OCTA-500 3M test
  scans resized x0.67 the median fell from 2.23 to 1.74 px), so :func:`pixel_size_warning` compares a
  folder's median with the training images' band when no pixel size was given.

"Far" (docs/MODEL_CARD.md says why): for each measure, beyond the reference's 5 %-95 % band by more
than the band's own width, with a floor on that margin so a reference from very uniform images does not
flag ordinary variation: half the median for the marked share and for the doubt (1 - confidence), 0.02
of the image for the vessel-free share. The confidence is checked on its low side only and the
vessel-free share on its high side only (an image the model is surer about, or with vessels everywhere, is
not suspect); the marked share on both.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

MEASURES = ("marked_share", "mean_confidence", "vessel_free")  # the flagged ones
WIDTH = "vessel_width_px"  # measured and referenced, not flagged (pixel_size_warning)
# The CSV columns a caller writes per image (segment's summary / CSV).
COLUMNS = MEASURES + (WIDTH, "quality", "quality_reason")
VESSEL_FREE_RADIUS = 0.1  # of the image's short side
# Margin floors: relative to the median (marked share, doubt) or absolute (vessel-free share).
FLOOR = {"marked_share": 0.5, "mean_confidence": 0.5, "vessel_free": 0.02}
PERCENTILES = (5, 50, 95)
LABELS = {"marked_share": "marked share", "mean_confidence": "mean confidence", "vessel_free": "vessel-free area"}


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def measures(prob: np.ndarray, threshold: float) -> Dict[str, float]:
    """The quality measures of one probability map (module docstring)."""
    import cv2

    p = np.asarray(prob, dtype=np.float32)
    if p.ndim != 2 or p.size == 0:
        raise ValueError(f"expected a 2-D probability map, got shape {p.shape}")
    marked = p >= threshold
    if marked.any():
        dist = cv2.distanceTransform((~marked).astype(np.uint8), cv2.DIST_L2, 5)
        free = float((dist > VESSEL_FREE_RADIUS * min(p.shape)).mean())
    else:
        free = 1.0
    from vesselfast.data.calibre import mean_width

    return {"marked_share": float(marked.mean()), "mean_confidence": float(np.maximum(p, 1 - p).mean()),
            "vessel_free": free, WIDTH: mean_width(marked)}


def reference_of(per_image: Sequence[Dict[str, float]], threshold: float, described: str) -> Dict:
    """The metadata entry ``quality_reference`` from the measures of the model's training target images:
    for each measure its 5th, 50th and 95th percentiles, with the number of images and what they were."""
    if not per_image:
        raise ValueError("a quality reference needs at least one image")
    ref: Dict = {"n_images": len(per_image), "threshold": float(threshold), "images": described,
                 "vessel_free_radius": VESSEL_FREE_RADIUS}
    for m in MEASURES + ((WIDTH,) if all(WIDTH in d for d in per_image) else ()):
        values = np.array([d[m] for d in per_image], dtype=np.float64)
        values = values[~np.isnan(values)]  # an image with nothing marked has no width
        if values.size:
            ref[m] = {f"p{q}": round(float(np.percentile(values, q)), 6) for q in PERCENTILES}
    return ref


def pixel_size_warning(widths: Iterable[float], reference: Optional[Dict], model_pixel_size_um: Optional[float]):
    """One warning line when the median width of the vessels marked in a set of images (px, NaN ignored)
    lies outside the 5-95 % band of the model's training target images, else None (also without a
    reference width). Vessels marked thinner than the model saw suggest a coarser pixel size (a wider field
    of view at the same image size), wider ones a finer one; given to ``segment`` only when no
    --pixel-size / --fov-mm was."""
    band = (reference or {}).get(WIDTH)
    values = np.array([w for w in widths if w is not None], dtype=np.float64)
    values = values[~np.isnan(values)]
    if not band or values.size == 0:
        return None
    median = float(np.median(values))
    if band["p5"] <= median <= band["p95"]:
        return None
    way = "thinner" if median < band["p5"] else "wider"
    px = f" ({model_pixel_size_um:.2f} um/px)" if model_pixel_size_um else ""
    # measured (docs/MODELS.md): rescaling finer scans down to the model's pixel size helps a lot;
    # enlarging coarser scans up to it gave mixed results, so that advice is weaker
    advice = ("if these scans have a finer pixel size, give --pixel-size UM or --fov-mm MM to rescale them"
              if way == "wider" else "these scans may have a coarser pixel size, where masks are less accurate; "
              "--pixel-size UM or --fov-mm MM enlarges them to the model's, which may or may not help")
    return (f"the vessels marked are {median:.2f} px wide (median of {values.size} images), {way} than on the "
            f"model's training scans{px}: {band['p5']:.2f}-{band['p95']:.2f} px; {advice} (docs/MODELS.md)")


def limits(reference: Dict, measure: str) -> tuple:
    """(low, high) of the ok range of ``measure``; -inf / inf on the side that is not checked."""
    r = reference[measure]
    lo, med, hi = r["p5"], r["p50"], r["p95"]
    if measure == "mean_confidence":  # margin on the doubt 1 - confidence, low side only
        return lo - max(hi - lo, FLOOR[measure] * (1 - med)), np.inf
    if measure == "vessel_free":
        return -np.inf, hi + max(hi - lo, FLOOR[measure])
    margin = max(hi - lo, FLOOR[measure] * med)
    return lo - margin, hi + margin


def quality_flags(prob: np.ndarray, threshold: float, reference: Optional[Dict]) -> Dict:
    """One image's measures and flag against the model's ``quality_reference`` (its metadata entry):
    ``{"marked_share", "mean_confidence", "vessel_free", "quality": "ok" | "check" | "n/a",
    "quality_reason": "" or why}``. ``n/a``: the model carries no reference (exported from a bare
    checkpoint, or before vesselfast recorded one)."""
    out: Dict = measures(prob, threshold)
    if not reference or any(m not in reference for m in MEASURES):
        return {**out, "quality": "n/a", "quality_reason": "the model has no quality reference"}
    reasons = []
    for m in MEASURES:
        lo, hi = limits(reference, m)
        v = out[m]
        if v < lo or v > hi:
            side, bound = ("below", lo) if v < lo else ("above", hi)
            r = reference[m]
            reasons.append(f"{LABELS[m]} {_pct(v)} {side} {_pct(bound)} (training target images: "
                           f"{_pct(r['p5'])} to {_pct(r['p95'])})")
    return {**out, "quality": "check" if reasons else "ok", "quality_reason": "; ".join(reasons)}


def quality_summary(names: Iterable[str], flags: Iterable[Dict], show: int = 3) -> str:
    """One line for a command's summary, e.g. ``quality: 48 ok, 2 to check by eye (a.png, b.png)``."""
    rows: List = list(zip(names, flags))
    check = [n for n, q in rows if q["quality"] == "check"]
    if rows and all(q["quality"] == "n/a" for _, q in rows):
        return "quality: not checked (the model has no quality reference; re-export it from its run directory)"
    ok = sum(q["quality"] == "ok" for _, q in rows)
    if not check:
        return f"quality: all {ok} ok"
    named = ", ".join(check[:show]) + (f" and {len(check) - show} more" if len(check) > show else "")
    return f"quality: {ok} ok, {len(check)} to check by eye ({named})"

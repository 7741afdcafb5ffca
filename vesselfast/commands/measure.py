"""``vesselfast measure MASKS... [--pixel-size UM] --csv out.csv``: vessel biomarkers, one CSV row per mask.

The definitions live in :mod:`vesselfast.biomarkers` (and docs/BIOMARKERS.md); this module reads the masks,
writes the CSV atomically (a temp file renamed over ``--csv``: a failure leaves no half-written file) and
prints the mean and standard deviation of each column.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

CSV_NAME = "biomarkers.csv"  # the file name ``segment --measure`` writes beside its masks


PIXEL_SIZE_HINT = ("give the scans' micrometres per pixel, a positive number (e.g. 9.87 for a 3 mm scan of "
                   "304 px, 15 for 6 mm at 400 px)")


def check_pixel_size(value: Optional[float], option: str = "--pixel-size", hint: str = PIXEL_SIZE_HINT) -> None:
    """A pixel size (or another length) must be a positive, finite number (None: not given)."""
    from vesselfast.errors import UserError

    if value is not None and not (math.isfinite(value) and value > 0):
        raise UserError(f"{option} {value:g}: {hint}")


def add_pixel_size_argument(p, purpose: str) -> None:
    p.add_argument("--pixel-size", type=float, metavar="UM",
                   help=f"micrometres per pixel of the scans ({purpose}; 3 mm / 304 px = 9.87); without it "
                        "lengths are in pixels")


def add_arguments(p):
    p.add_argument("masks", nargs="+", metavar="MASKS",
                   help="binary vessel masks: files, folders or glob patterns (PNG/BMP/TIFF/..., 8 or 16 bit, "
                        "0 = background, the other level = vessel)")
    add_pixel_size_argument(p, "lengths in um and mm, densities per mm")
    p.add_argument("--csv", required=True, help="CSV file to write, one row per mask (units in the column names)")


def check_csv_writable(csv: Path, option: str = "--csv", example: str = CSV_NAME) -> None:
    """Refuses, before any work, a CSV path that is a folder or whose folder is missing or not writable
    (tried by creating and removing a temp file there, which also catches read-only file systems).
    Any other output file too (``eval --json``): ``example`` is the file name suggested for a folder."""
    from vesselfast.errors import UserError
    from vesselfast.export.files import writable_reason

    if csv.is_dir():
        raise UserError(f"{option} {csv}: is a folder; give a file name, e.g. {csv / example}")
    folder = csv.parent
    if not folder.is_dir():
        raise UserError(f"{option} {csv}: folder {folder} does not exist; create it first or choose another {option}")
    reason = writable_reason(folder)
    if reason:
        raise UserError(f"{option} {csv}: folder {folder} is not writable ({reason}); choose another {option}")


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"  # NaN (undefined) -> empty cell: NA in R and pandas
    return str(value)


def measure_files(paths: List[Path], csv: Path, pixel_size_um: Union[None, float, Sequence[Optional[float]]] = None,
                  progress: bool = True) -> List[Dict[str, float]]:
    """Biomarkers of each mask file -> ``csv`` (written atomically once all masks are measured).
    ``pixel_size_um``: one for all masks, or one per mask. Every mask is read once before the slow part,
    so an unreadable or non-binary file fails first."""
    import csv as csvmod
    import sys

    from tqdm import tqdm

    from vesselfast.biomarkers import measure
    from vesselfast.checkpoint import atomic_write
    from vesselfast.data.io import read_mask

    notes: List[str] = []
    for path in paths:
        read_mask(str(path), notes=notes)
    for note in notes:
        print(f"vesselfast: note: {note}", file=sys.stderr)
    sizes = pixel_size_um if isinstance(pixel_size_um, (list, tuple)) else [pixel_size_um] * len(paths)
    rows = []
    for path, px in tqdm(list(zip(paths, sizes)), desc="measure", disable=not progress or None):
        rows.append({"image": str(path), **measure(read_mask(str(path)), px)})

    def write(fh):
        writer = csvmod.writer(fh, lineterminator="\n")
        writer.writerow(list(rows[0]))
        for row in rows:
            writer.writerow([_cell(v) for v in row.values()])

    atomic_write(csv, write, mode="w")
    return rows


def summary_lines(rows: List[Dict[str, float]]) -> List[str]:
    """``column  mean ± std  (n)`` per numeric column, NaN cells left out (std over n - 1; 0 for n = 1)."""
    import numpy as np

    lines = []
    for key in rows[0]:
        if key in ("image", "height_px", "width_px", "pixel_size_um"):
            continue
        vals = np.array([r[key] for r in rows], dtype=float)
        vals = vals[~np.isnan(vals)]
        if vals.size == 0:
            lines.append(f"  {key:<28} undefined")
            continue
        std = float(vals.std(ddof=1)) if vals.size > 1 else 0.0
        lines.append(f"  {key:<28}{float(vals.mean()):12.5g} ± {std:<10.4g} (n={vals.size})")
    return lines


def run(args) -> int:
    from vesselfast.export.files import expand_inputs

    check_pixel_size(args.pixel_size)
    csv = Path(args.csv)
    check_csv_writable(csv)
    paths = expand_inputs(args.masks)
    rows = measure_files(paths, csv, args.pixel_size)
    units = f"{args.pixel_size:g} um/px" if args.pixel_size else "pixels (no --pixel-size)"
    print(f"vesselfast measure: {len(rows)} masks, {units}; mean ± std:")
    print("\n".join(summary_lines(rows)))
    print(f"wrote {csv}")
    return 0

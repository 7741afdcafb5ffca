"""The one integrity check of data entries, shared by loading (``load_domain``, so before any training)
and by ``vesselfast data check``. Like nnU-Net's dataset verification it goes through every entry and
collects every problem instead of stopping at the first: training refuses bad data with one line naming
the first problem and how many more there are; ``vesselfast data check`` lists them all.

Each problem is one line that names the file and what to do. Checked per entry: the image decodes and is
not a label map (two grey levels); the vessel mask and the field-of-view mask decode, are binary (or
nearly, then thresholded with a note) and have the image's size; a field-of-view mask is not empty.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import numpy as np

from vesselfast.data.io import read_image, read_mask
from vesselfast.errors import UserError


class Problems(list):
    """One-line problem messages, collected in order."""

    def catch(self, fn: Callable, *args, **kwargs):
        """``fn(*args, **kwargs)``, or None with its UserError recorded as a problem."""
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            self.append(str(exc))
            return None

    def raise_first(self, paths: Sequence[str]) -> None:
        """Nothing when there is no problem; else one UserError line: the first problem and how many more."""
        if not self:
            return
        more = ""
        if len(self) > 1:
            more = (f" (and {len(self) - 1} more problem(s) in these folders; `vesselfast data check "
                    f"{' '.join(paths)}` lists every one)")
        raise UserError(self[0] + more)


def check_target_images(entry_image: str, img: np.ndarray) -> None:
    """Refuse an image that is really a label map (two grey levels only), e.g. a label folder passed as
    the image folder."""
    vals = np.unique(img if img.ndim == 2 else img[..., 1])
    if vals.size <= 2:
        raise UserError(f"{entry_image}: has only {vals.size} grey level(s), so it looks like a vessel label, "
                        "not an image; point the target at the image folder (labels are never used for training)")


@dataclass
class EntryData:
    image: np.ndarray            # uint8 [H, W] or [H, W, 3] as decoded
    mask: Optional[np.ndarray]   # bool [H, W] vessel label, None when not read
    fov: Optional[np.ndarray]    # bool [H, W] from the dataset's FOV file, None when it has none


def read_entry(entry, read_labels: bool, problems: Problems, notes: Optional[List[str]] = None) -> Optional[EntryData]:
    """Decode and check one entry; None (with its problems recorded) when anything is wrong with it."""
    before = len(problems)
    img = problems.catch(read_image, entry.image)
    if img is None:
        return None
    problems.catch(check_target_images, entry.image, img)
    h, w = img.shape[:2]
    mask = problems.catch(read_mask, entry.mask, notes=notes) if (read_labels and entry.mask) else None
    fov = problems.catch(read_mask, entry.fov, what="field-of-view mask", notes=notes) if entry.fov else None
    for what, arr, path in (("vessel mask", mask, entry.mask), ("field-of-view mask", fov, entry.fov)):
        if arr is not None and arr.shape != (h, w):
            problems.append(f"{path}: {what} is {arr.shape[1]}x{arr.shape[0]} but image {entry.image} is {w}x{h}; "
                            "they must have the same size")
    if fov is not None and fov.shape == (h, w) and not fov.any():
        problems.append(f"{entry.fov}: field-of-view mask is empty; fix or delete it (it is then computed)")
    return None if len(problems) > before else EntryData(img, mask, fov)

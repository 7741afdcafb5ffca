"""Reading images and binary masks, with one clear :class:`UserError` line per bad file.

Every file is opened through Python's ``open`` (then decoded by Pillow, or OpenCV as a fallback), so a test
can audit exactly which files a reader touched (``sys.addaudithook`` sees the ``open`` event).
"""
from __future__ import annotations

import gzip
import io
import os
import re
import sys
import warnings
from contextlib import contextmanager
from typing import List, Optional, Tuple

import numpy as np

from vesselfast.errors import UserError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".ppm", ".pgm", ".pnm")


def is_image_file(name: str) -> bool:
    n = name.lower()
    if n.endswith(".gz"):
        n = n[:-3]
    return n.endswith(IMAGE_EXTS) and not name.startswith(".")


def stem(name: str) -> str:
    """File name without directory and image extension (``im0001.ppm.gz`` -> ``im0001``)."""
    base = os.path.basename(name)
    if base.lower().endswith(".gz"):
        base = base[:-3]
    return os.path.splitext(base)[0]


@contextmanager
def native_stderr(sink: List[str]):
    """Collects into ``sink`` the lines that native libraries (OpenCV's log, libpng, libtiff, libjpeg) write
    straight to file descriptor 2 while the block runs, so they cannot break the one-line error contract."""
    import tempfile

    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2: nothing to collect
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", "replace")
            # "[ WARN:0@2.0] global grfmt_tiff.cpp:117 TIFF_Error msg" -> "TIFF_Error msg"
            sink += [re.sub(r"^\[\s*\w+:[^\]]*\]\s*(global\s+)?\S+:\d+\s*", "", line).strip()
                     for line in text.splitlines() if line.strip()]


def _pillow_array(im) -> np.ndarray:
    """A loaded Pillow image -> uint8 array: grey, or RGB (palettes, alpha, CMYK...); 16-bit and float scaled."""
    if im.mode == "1":
        return np.asarray(im.convert("L"))
    if im.mode in ("P", "PA", "LA", "RGBA", "CMYK", "YCbCr", "HSV", "LAB"):
        # palette GIFs, alpha: to plain RGB (or L when the palette is grey)
        rgb = np.asarray(im.convert("RGB"))
        return rgb[..., 0] if _is_grey(rgb) else rgb
    if im.mode.startswith("I;16") or im.mode == "I":
        arr = np.asarray(im).astype(np.float32)
        top = 65535.0 if arr.max() > 255 else 255.0
        return np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 if hi <= 1.0 and lo >= 0.0 else 1.0
        return np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8)
    return np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB") else im)


def _decode(path: str, notes: Optional[List[str]] = None) -> np.ndarray:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise UserError(f"{path}: cannot open ({exc.strerror or exc}); check the file exists and is readable")
    if path.lower().endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise UserError(f"{path}: corrupt gzip file ({exc}); replace it or remove it")
    if not data:
        raise UserError(f"{path}: empty file; replace it with a valid image or remove it")
    err = None
    try:
        from PIL import Image

        # Pillow warns above Image.MAX_IMAGE_PIXELS (89 MP); the size limits that matter are the callers'
        # (``vesselfast segment --max-pixels``), so the warning would only break the one-line contract.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                arr = _pillow_array(im)
        return np.ascontiguousarray(arr)
    except Exception as exc:  # noqa: BLE001 - any decoder failure -> try OpenCV, then a clear error
        err = exc
    said: List[str] = []  # what OpenCV and its codecs print on odd files: one line of ours instead
    try:
        import cv2

        with native_stderr(said):
            arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if arr is not None:
            if said and notes is not None:
                notes.append(f"{path}: decoded by OpenCV, which reported: {'; '.join(said)[:200]}; "
                             "the file may be damaged, check its output by eye")
            if arr.dtype != np.uint8:
                arr = np.clip(arr.astype(np.float32) / np.iinfo(arr.dtype).max * 255 + 0.5, 0, 255).astype(np.uint8) \
                    if np.issubdtype(arr.dtype, np.integer) else np.clip(arr * 255 + 0.5, 0, 255).astype(np.uint8)
            if arr.ndim == 3:
                arr = cv2.cvtColor(arr[..., :3], cv2.COLOR_BGR2RGB)
            return np.ascontiguousarray(arr)
    except Exception:  # noqa: BLE001
        pass
    detail = f"; {'; '.join(said)[:200]}" if said else ""
    raise UserError(f"{path}: cannot decode image (corrupt or unsupported format: {type(err).__name__}{detail}); "
                    "replace it with a valid PNG/TIFF/JPEG/BMP/GIF or remove it")


def header_size(path: str) -> Optional[Tuple[int, int]]:
    """(width, height) from an image file's header, without decoding its pixels (so a size limit can refuse
    a huge scan before it fills memory); None where Pillow cannot tell (gzip, formats only OpenCV reads)."""
    from PIL import Image

    if path.lower().endswith(".gz"):
        return None
    limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None  # the caller's limit decides; Pillow's would refuse to tell the size
        with open(path, "rb") as f, Image.open(f) as im:
            return int(im.size[0]), int(im.size[1])
    except Exception:  # noqa: BLE001 - unreadable here: the full read that follows reports it
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _is_grey(rgb: np.ndarray) -> bool:
    return bool(np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]))


def read_image(path: str, notes: Optional[List[str]] = None) -> np.ndarray:
    """uint8 [H,W] (grey) or [H,W,3] (RGB). RGB images whose channels are equal come back grey. What a
    decoder reported about a file it still decoded is appended to ``notes`` (one line per file)."""
    arr = _decode(path, notes)
    if arr.ndim == 3:
        arr = arr[..., :3]
        if arr.shape[2] == 1:
            arr = arr[..., 0]
        elif _is_grey(arr):
            arr = arr[..., 0]
    if arr.ndim not in (2, 3) or arr.shape[0] < 2 or arr.shape[1] < 2:
        raise UserError(f"{path}: image has unusable shape {arr.shape}; expected a 2-D grey or RGB image")
    return np.ascontiguousarray(arr)


# A mask whose grey levels are not just {0, v}: threshold at 128 on the 8-bit scale when nearly all pixels
# are near black/white (anti-aliasing, JPEG); refuse when more than this share is mid-grey (32..223): an image.
MAX_MIDGREY_FRACTION = 0.2


def read_mask(path: str, *, what: str = "vessel mask", notes: Optional[list] = None) -> np.ndarray:
    """bool [H,W]. Binary files ({0, v}, any v > 0; 1-bit; 0/1) are taken as is. Nearly binary files
    (anti-aliased edges, JPEG) are thresholded at 128 and a note is appended to ``notes``; anything else
    is refused with a :class:`UserError`."""
    arr = _decode(path)
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=2)
    vals = np.unique(arr)
    if vals.size <= 2:
        if vals.size == 2 and vals[0] != 0:
            # e.g. {1, 255}: still two levels; the lower one is background
            return arr > vals[0]
        return arr > 0
    mid = float(np.mean((arr > 32) & (arr < 224)))
    if mid > MAX_MIDGREY_FRACTION:
        raise UserError(f"{path}: {what} is not binary ({vals.size} grey levels, {100 * mid:.1f}% mid-grey pixels); "
                        "is this an image rather than a mask? Save it as 0/255 (or 0/1)")
    if notes is not None:
        notes.append(f"{path}: {what} has {vals.size} grey levels; thresholded at 128 (>= 128 is foreground)")
    return arr >= 128


def image_size(arr: np.ndarray) -> Tuple[int, int]:
    return int(arr.shape[1]), int(arr.shape[0])

"""Checkpoints and atomic files, below both the pipeline and deployment: every file vesselfast writes goes
through :func:`atomic_write`, every checkpoint it reads through :func:`load_checkpoint`, and a trained
segmenter becomes a network through :func:`segmenter_from_state` / :func:`load_segmenter`, whichever
command asks (train, eval, segment, export).

Writes go to a temporary name, are fsynced and renamed, so a kill leaves either the old or the new file,
never half of one. Loading uses ``torch.load(weights_only=True)``: no code runs from a file.
"""
from __future__ import annotations

import errno
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from vesselfast import testhooks
from vesselfast.errors import UserError

FORMAT_VERSION = 1
_UMASK = os.umask(0o022)  # read once (os.umask can only be read by setting it), then restored
os.umask(_UMASK)


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write via ``write(fh)`` to a temp file in the same folder, fsync it, rename it over ``path``, fsync
    the folder (so the rename itself survives a power cut). A kill at any point leaves the old file or the
    new one, plus at worst a stray ``.NAME.*.tmp`` (removed when the run directory is next opened).
    An OSError (disk full, read-only, permissions) becomes a UserError naming the file; no temp file stays."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are for the group to read too
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        testhooks.kill_point(f"write:{path.name}")
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as exc:
        raise UserError(f"{path}: cannot write ({why_failed(exc)}); {what_to_do(exc)}") from exc
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


def why_failed(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def what_to_do(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full: free space, then re-run the same command to resume"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "the location is not writable: choose a writable --out"
    return "check the disk and the folder, then re-run the same command to resume"


def _fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):  # file systems without directory fsync
            raise
    finally:
        os.close(dir_fd)


def save_checkpoint(path: Path, obj: Dict[str, Any]) -> None:
    atomic_write(path, lambda fh: torch.save({"vesselfast_format": FORMAT_VERSION, **obj}, fh))


def load_checkpoint(path: Path, kind: Optional[str] = None,
                    fix: str = "use a checkpoint written by vesselfast train") -> Dict[str, Any]:
    """Load a vesselfast checkpoint safely; a missing, truncated, foreign or code-carrying file gives a
    UserError ending with ``fix`` (what to do). ``weights_only=True``: the unpickler only rebuilds tensors and plain containers, so a file
    whose pickle would call a function (``__reduce__`` payloads) is refused before anything runs."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols; the error says enough
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - garbage makes the unpickler fail in many ways (KeyError, ...)
        refused = _refused_global(exc)
        if refused:
            raise UserError(f"{path}: refused to load: the file would run code or build objects other than "
                            f"tensors ({refused}); it is not a vesselfast checkpoint, nothing from it was run")
        raise UserError(f"{path}: not a readable vesselfast checkpoint (truncated or foreign file: "
                        f"{_first_sentence(exc)}); {fix}")
    if not isinstance(obj, dict) or "vesselfast_format" not in obj:
        raise UserError(f"{path}: not a vesselfast checkpoint (no vesselfast_format key); {fix}")
    if kind is not None and obj.get("kind") != kind:
        raise UserError(f"{path}: holds a {obj.get('kind')!r} checkpoint, expected {kind!r}; {fix}")
    return obj


def _refused_global(exc: Exception) -> Optional[str]:
    """torch's weights-only unpickler names the function or class it refused ("unsupported GLOBAL ...")."""
    for line in str(exc).splitlines():
        if "GLOBAL" in line:
            return line.strip().rstrip(".")[:120]
    return None


def _first_sentence(exc: Exception) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0].split(". ")[0] if lines else type(exc).__name__)[:160]



def segmenter_from_state(state: Dict[str, Any], where: str = "checkpoint"):
    """The SegmenterUNet (eval mode) of a saved segmenter stage: its ``channels`` and ``model`` weights."""
    from vesselfast.models import SegmenterUNet

    model = SegmenterUNet(1, state["channels"])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise UserError(f"{where}: weights do not fit the segmenter architecture "
                        f"({str(exc).splitlines()[0][:150]})")
    return model.eval()


INFERENCE_KEYS = ("preprocessing", "tile", "stride", "threshold")


def final_segmenter_path(run_dir: Path, option: str = "--model") -> Path:
    """The last co-optimisation round's segmenter of a run (segmenter_K.pt with the largest K); errors name
    ``option``, the command-line option that gave the run directory."""
    from vesselfast.pipeline.keys import final_stage

    stage = final_stage(p.stem for p in (Path(run_dir) / "ckpt").glob("segmenter_*.pt"))
    if not stage:
        raise UserError(f"{option} {run_dir}: no trained segmenter in {run_dir}/ckpt; finish a vesselfast train run first")
    return Path(run_dir) / "ckpt" / f"{stage}.pt"


def load_segmenter(model_path: str, option: str = "--model") -> Tuple[Any, Dict[str, Any]]:
    """(SegmenterUNet in eval mode, its inference fields: preprocessing, tile, stride, threshold) from a
    segmenter checkpoint or a run directory (its final segmenter). Errors name ``option`` (``--model`` for
    segment, ``--run`` / ``--checkpoint`` for export)."""
    path = Path(model_path)
    if not path.exists():
        raise UserError(f"{option} {model_path}: no such file or directory")
    if path.is_dir():
        path = final_segmenter_path(path, option)
    ck = load_checkpoint(path)
    if "channels" not in ck or "model" not in ck or "preprocessing" not in ck:
        raise UserError(f"{option} {path}: not a segmenter checkpoint (kind {ck.get('kind')!r})")
    return segmenter_from_state(ck, f"{option} {path}"), {k: ck[k] for k in INFERENCE_KEYS}

"""The run directory: resolved config, checkpoints (atomic), stage markers, lock, log.

Layout::

    DIR/config.yaml            resolved config (a re-run must match it)
    DIR/train.log              log of every run into DIR
    DIR/ckpt/<stage>.pt        a finished stage's result (models, latents, images)
    DIR/ckpt/<stage>.partial.pt  an interrupted training stage's last in-stage checkpoint
    DIR/stages.json            finished stages with wall time and U-Net evaluations
    DIR/metrics.json|csv, DIR/pictures/*.png, DIR/metrics.png, DIR/report.md

Every file is written to a temporary name, fsynced and renamed, so a kill leaves either the old or the
new file, never half of one. Loading uses ``torch.load(weights_only=True)``: no code runs from a file.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from vesselfast.errors import UserError
from vesselfast.pipeline import testhooks

LOG = logging.getLogger("vesselfast")
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
        raise UserError(f"{path}: cannot write ({_why(exc)}); {_what_to_do(exc)}") from exc
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def _what_to_do(exc: OSError) -> str:
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


class RunDir:
    """A run directory. ``writer=False`` (ranks other than 0 of a distributed run) makes it read-only:
    every method that would write does nothing, so the pipeline code is the same on every rank."""

    def __init__(self, root: str | os.PathLike, writer: bool = True):
        self.root = Path(root)
        self.ckpt = self.root / "ckpt"
        self.pictures = self.root / "pictures"
        self.writer = writer
        self._lock_fh = None

    # -- lifecycle ------------------------------------------------------------------------------
    def saved_config(self) -> Optional[Dict[str, Any]]:
        """The config a run in this directory started with (None when there is none, or it is unreadable:
        :meth:`open` then says what is wrong)."""
        import yaml

        try:
            saved = yaml.safe_load((self.root / "config.yaml").read_text())
        except (OSError, yaml.YAMLError):
            return None
        return saved if isinstance(saved, dict) else None

    def open(self, config_text: str) -> bool:
        """Create or re-open the run directory for ``config_text``; returns True when resuming.
        Refuses a directory that holds a different config or is locked by another run. When it fails,
        what it created is removed again (nothing half-made is left behind)."""
        created = [d for d in (self.root, self.ckpt, self.pictures) if not d.exists()]
        try:
            try:
                for d in (self.root, self.ckpt, self.pictures):
                    d.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UserError(f"--out {self.root}: cannot create the run directory ({_why(exc)}); "
                                "choose a writable folder")
            if not os.access(self.root, os.W_OK):
                raise UserError(f"--out {self.root}: not writable; choose a writable folder")
            self._lock()
            self._remove_stray_temp_files()
            cfg_path = self.root / "config.yaml"
            resuming = cfg_path.exists()
            if resuming:
                if cfg_path.read_text() != config_text:
                    raise UserError(f"{cfg_path}: this run directory was started with a different config; "
                                    "re-run with the same options (or --resume), or choose a new --out")
            else:
                atomic_write(cfg_path, lambda fh: fh.write(config_text), "w")
        except BaseException:
            self.close()
            self._remove_created(created)
            raise
        self._setup_log()
        return resuming

    def _remove_created(self, created) -> None:
        if self.root in created:
            lock = self.root / ".lock"
            if lock.exists() and self._lock_fh is None:
                lock.unlink()
        for d in reversed(created):  # pictures, ckpt, then the root: only while still empty
            try:
                d.rmdir()
            except OSError:
                pass

    def _remove_stray_temp_files(self) -> None:
        """Temp files of writes that a kill interrupted (we hold the lock: no writer is active)."""
        for folder in (self.root, self.ckpt, self.pictures):
            for p in folder.glob(".*.tmp"):
                p.unlink()

    def _lock(self):
        fh = open(self.root / ".lock", "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise UserError(f"{self.root}: another vesselfast run is using this directory (locked); "
                            "wait for it or choose another --out")
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._lock_fh = fh

    def close(self):
        for h in list(LOG.handlers):
            if getattr(h, "_vesselfast_run", False):
                LOG.removeHandler(h)
                h.close()
        if self._lock_fh is not None:
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None

    def mute_log(self):
        """Ranks other than 0: the log and the console are rank 0's alone."""
        h = logging.NullHandler()
        h._vesselfast_run = True
        LOG.addHandler(h)

    def _setup_log(self):
        LOG.setLevel(logging.INFO)
        fh = logging.FileHandler(self.root / "train.log")
        fh.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        fh._vesselfast_run = True
        LOG.addHandler(fh)
        if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
                   for h in LOG.handlers):
            sh = logging.StreamHandler()
            sh.setFormatter(logging.Formatter("[vesselfast] %(message)s"))
            LOG.addHandler(sh)

    # -- stages ---------------------------------------------------------------------------------
    def stages(self) -> Dict[str, Dict[str, Any]]:
        p = self.root / "stages.json"
        return json.loads(p.read_text()) if p.exists() else {}

    def is_done(self, stage: str) -> bool:
        return stage in self.stages() and self.stage_path(stage).exists()

    def stage_path(self, stage: str) -> Path:
        return self.ckpt / f"{stage}.pt"

    def partial_path(self, stage: str) -> Path:
        return self.ckpt / f"{stage}.partial.pt"

    def finish(self, stage: str, result: Dict[str, Any], info: Dict[str, Any]) -> None:
        """Save a stage's result, then mark it done (in that order: a kill in between redoes the stage)."""
        if not self.writer:
            return
        save_checkpoint(self.stage_path(stage), {"kind": stage, **result})
        testhooks.kill_point(f"{stage}:saved")
        stages = self.stages()
        stages[stage] = info
        self.write_json("stages.json", stages)
        partial = self.partial_path(stage)
        if partial.exists():
            partial.unlink()

    def save_partial(self, stage: str, obj: Dict[str, Any]) -> None:
        if self.writer:
            save_checkpoint(self.partial_path(stage), obj)

    def load(self, stage: str) -> Dict[str, Any]:
        path = self.stage_path(stage)
        if not path.exists() and not self.writer:
            raise UserError(f"{path}: not visible on this node (rank 0 wrote it); the run directory of a "
                            "multi-node run must be on a file system every node sees")
        return load_checkpoint(path, kind=stage, fix="delete it to recompute that stage")

    def write_json(self, name: str, obj) -> None:
        if self.writer:
            atomic_write(self.root / name, lambda fh: fh.write(json.dumps(obj, indent=2, sort_keys=False)), "w")

    def write_text(self, name: str, text: str) -> None:
        if self.writer:
            atomic_write(self.root / name, lambda fh: fh.write(text), "w")

    def write_bytes(self, relative: str, data: bytes) -> None:
        if self.writer:
            atomic_write(self.root / relative, lambda fh: fh.write(data))

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

import fcntl
import json
import logging
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from vesselfast.errors import UserError

LOG = logging.getLogger("vesselfast")
FORMAT_VERSION = 1


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write via ``write(fh)`` to a temp file in the same folder, fsync, rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(path: Path, obj: Dict[str, Any]) -> None:
    atomic_write(path, lambda fh: torch.save({"vesselfast_format": FORMAT_VERSION, **obj}, fh))


def load_checkpoint(path: Path, kind: Optional[str] = None) -> Dict[str, Any]:
    """Load a vesselfast checkpoint safely; a missing, truncated or foreign file gives a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as exc:
        raise UserError(f"{path}: not a readable vesselfast checkpoint (truncated or foreign file: "
                        f"{str(exc).splitlines()[0][:120]}); delete it to recompute that stage")
    if not isinstance(obj, dict) or "vesselfast_format" not in obj:
        raise UserError(f"{path}: not a vesselfast checkpoint (no vesselfast_format key)")
    if kind is not None and obj.get("kind") != kind:
        raise UserError(f"{path}: holds a {obj.get('kind')!r} checkpoint, expected {kind!r}")
    return obj


class RunDir:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.ckpt = self.root / "ckpt"
        self.pictures = self.root / "pictures"
        self._lock_fh = None

    # -- lifecycle ------------------------------------------------------------------------------
    def open(self, config_text: str) -> bool:
        """Create or re-open the run directory for ``config_text``; returns True when resuming.
        Refuses a directory that holds a different config or is locked by another run."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.ckpt.mkdir(exist_ok=True)
            self.pictures.mkdir(exist_ok=True)
        except OSError as exc:
            raise UserError(f"--out {self.root}: cannot create the run directory ({exc.strerror}); choose a writable folder")
        if not os.access(self.root, os.W_OK):
            raise UserError(f"--out {self.root}: not writable; choose a writable folder")
        self._lock()
        cfg_path = self.root / "config.yaml"
        resuming = cfg_path.exists()
        if resuming:
            if cfg_path.read_text() != config_text:
                self.close()
                raise UserError(f"{cfg_path}: this run directory was started with a different config; "
                                "re-run with the same options (or --resume), or choose a new --out")
        else:
            atomic_write(cfg_path, lambda fh: fh.write(config_text), "w")
        self._setup_log()
        return resuming

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
        save_checkpoint(self.stage_path(stage), {"kind": stage, **result})
        stages = self.stages()
        stages[stage] = info
        self.write_json("stages.json", stages)
        partial = self.partial_path(stage)
        if partial.exists():
            partial.unlink()

    def load(self, stage: str) -> Dict[str, Any]:
        return load_checkpoint(self.stage_path(stage), kind=stage)

    def write_json(self, name: str, obj) -> None:
        atomic_write(self.root / name, lambda fh: fh.write(json.dumps(obj, indent=2, sort_keys=False)), "w")

    def write_text(self, name: str, text: str) -> None:
        atomic_write(self.root / name, lambda fh: fh.write(text), "w")

"""The run directory: resolved config, checkpoints (atomic), stage markers, lock, log.

Layout::

    DIR/config.yaml            resolved config (a re-run must match it)
    DIR/train.log              log of every run into DIR
    DIR/ckpt/<stage>.pt        a finished stage's result (models, latents, images)
    DIR/ckpt/<stage>.partial.pt  an interrupted training stage's last in-stage checkpoint
    DIR/stages.json            finished stages with wall time and U-Net evaluations
    DIR/metrics.json|csv, DIR/pictures/*.png, DIR/metrics.png, DIR/report.md

Files are written and checkpoints read through vesselfast.checkpoint (atomic writes, safe loading).
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional

from vesselfast import testhooks
from vesselfast.checkpoint import atomic_write, load_checkpoint, save_checkpoint, what_to_do, why_failed
from vesselfast.errors import UserError

LOG = logging.getLogger("vesselfast")

class RunDir:
    """A run directory. ``writer=False`` (ranks other than 0 of a distributed run) makes it read-only:
    every method that would write does nothing, so the pipeline code is the same on every rank."""

    def __init__(self, root: str | os.PathLike, writer: bool = True):
        self.root = Path(root)
        self.ckpt = self.root / "ckpt"
        self.pictures = self.root / "pictures"
        self.writer = writer
        self._lock_fh = None
        self._created = []  # the folders the last open() created

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
        created = self._created = [d for d in (self.root, self.ckpt, self.pictures) if not d.exists()]
        try:
            try:
                for d in (self.root, self.ckpt, self.pictures):
                    d.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UserError(f"--out {self.root}: cannot create the run directory ({why_failed(exc)}); "
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

    BOOKKEEPING = ("config.yaml", "train.log", ".lock")

    def discard_if_unused(self) -> None:
        """After a start that failed (call :meth:`close` first): removes the run directory when this start
        created it and nothing but its config, log and lock is in it, so that nothing half-made is left and
        a corrected command is not refused as "a different config". A directory with any stage output
        (kept for a resume) or one that existed before is left as it is."""
        if not self.writer or self.root not in self._created or self._lock_fh is not None:
            return
        if any(p.is_file() and p.name not in self.BOOKKEEPING for p in self.root.rglob("*")):
            return
        for name in self.BOOKKEEPING[:2]:
            (self.root / name).unlink(missing_ok=True)
        self._remove_created(self._created)

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

    def is_done(self, stage: str, identity: Optional[str] = None) -> bool:
        """Finished here, with this identity when one is given (entries without one predate identities)."""
        entry = self.stages().get(stage)
        if entry is None or not self.stage_path(stage).exists():
            return False
        return identity is None or entry.get("identity") in (None, identity)

    def find(self, identity: str) -> Optional[str]:
        """The finished stage of this directory that has ``identity``, if any."""
        for name, entry in self.stages().items():
            if entry.get("identity") == identity and self.stage_path(name).exists():
                return name
        return None

    def adopt(self, stage: str, other: "RunDir", other_stage: str) -> Dict[str, Any]:
        """Take a finished stage from another run directory instead of computing it: its checkpoint is
        hard-linked here (copied where links cannot cross file systems), then the stage is marked done
        with the other run's info and ``reused_from``. Returns that info."""
        info = dict(other.stages()[other_stage], reused_from=str(other.root))
        info.pop("computed", None)
        if not self.writer:
            return info
        src, dst = other.stage_path(other_stage), self.stage_path(stage)
        tmp = dst.with_name(f".{dst.name}.reuse.tmp")
        try:
            try:
                os.link(src, tmp)
            except OSError:
                import shutil
                shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        except OSError as exc:
            raise UserError(f"{dst}: cannot take {src} ({why_failed(exc)}); {what_to_do(exc)}") from exc
        finally:
            if tmp.exists():
                tmp.unlink()
        stages = self.stages()
        stages[stage] = info
        self.write_json("stages.json", stages)
        return info

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

    def load(self, stage: str, fix: str = "delete it to recompute that stage") -> Dict[str, Any]:
        """A finished stage's result; ``fix``: what the user can do when the file is unreadable."""
        path = self.stage_path(stage)
        if not path.exists() and not self.writer:
            raise UserError(f"{path}: not visible on this node (rank 0 wrote it); the run directory of a "
                            "multi-node run must be on a file system every node sees")
        return load_checkpoint(path, kind=stage, fix=fix)

    def write_json(self, name: str, obj) -> None:
        if self.writer:
            atomic_write(self.root / name, lambda fh: fh.write(json.dumps(obj, indent=2, sort_keys=False)), "w")

    def write_text(self, name: str, text: str) -> None:
        if self.writer:
            atomic_write(self.root / name, lambda fh: fh.write(text), "w")

    def write_bytes(self, relative: str, data: bytes) -> None:
        if self.writer:
            atomic_write(self.root / relative, lambda fh: fh.write(data))

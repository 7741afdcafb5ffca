"""Hooks that only tests switch on, through environment variables; unset, each is one dict lookup.

``VESSELFAST_TEST_KILL_AT=POINT`` makes the process send itself SIGKILL (or the signal named by
``VESSELFAST_TEST_KILL_SIGNAL``, e.g. INT for Ctrl-C) the first time it reaches ``POINT``: deterministic
crashes for the kill-and-resume tests. Points:

    <stage>:start       before a stage computes anything
    <stage>:<step>      in a training stage, before step <step> (0-based) runs
    <stage>:saved       the stage's checkpoint is written, the stage is not yet marked done
    write:<file name>   inside an atomic write: temp file complete and fsynced, not yet renamed

``VESSELFAST_TEST_STATE_HASHES=DIR``: every rank writes ``DIR/rank<r>.json`` with a SHA-256 of the tensors
of each stage result it holds, so a test can check that all ranks of a distributed run end with the same
weights (and the same ones rank 0 saved).
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path
from typing import Any, Dict

import torch

KILL_AT = "VESSELFAST_TEST_KILL_AT"
KILL_SIGNAL = "VESSELFAST_TEST_KILL_SIGNAL"
STATE_HASHES = "VESSELFAST_TEST_STATE_HASHES"

_hashes: Dict[str, str] = {}


def kill_point(point: str) -> None:
    if os.environ.get(KILL_AT) == point:
        sig = getattr(signal, "SIG" + os.environ.get(KILL_SIGNAL, "KILL").upper())
        os.environ.pop(KILL_AT)  # once per process (a SIGINT handler may let the process go on)
        if sig not in (signal.SIGKILL, signal.SIGSTOP) and signal.getsignal(sig) == signal.SIG_IGN:
            # e.g. SIGINT in a job started with `&` by a non-interactive shell: the signal would be dropped
            # and the run go on as if the kill point did not exist; say so instead of passing silently.
            raise RuntimeError(f"{KILL_AT}={point}: {signal.Signals(sig).name} is ignored in this process "
                               "(inherited SIG_IGN), so the simulated signal cannot arrive; start the process "
                               "with the signal's default disposition")
        os.kill(os.getpid(), sig)


def state_hash(obj: Any) -> str:
    """SHA-256 over every tensor in a (nested) stage result, by key path, dtype, shape and bytes;
    non-tensor entries (kind, metadata) are ignored, so a saved checkpoint hashes like the in-memory result."""
    h = hashlib.sha256()

    def walk(prefix: str, x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            h.update(f"{prefix}|{x.dtype}|{tuple(x.shape)}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                walk(f"{prefix}/{k}", x[k])
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(f"{prefix}/{i}", v)

    walk("", obj)
    return h.hexdigest()


def record_state(stage: str, result: Dict[str, Any]) -> None:
    if os.environ.get(STATE_HASHES):
        _hashes[stage] = state_hash(result)


def write_state_hashes(rank: int) -> None:
    folder = os.environ.get(STATE_HASHES)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"rank{rank}.json").write_text(json.dumps(_hashes, indent=1, sort_keys=True))

"""Memory allocator set-up for long CPU jobs.

With glibc's default malloc, large-activation inference spent ~44% of its time in page faults on the
reference machine (DESIGN.md section 3): a 128x128 generator batch took 1747 ms, 802 ms with tcmalloc
preloaded and 945 ms with the glibc tunables below. Both must be in place before Python starts, so the
heavy commands re-execute themselves once with them: tcmalloc when ``libtcmalloc_minimal.so.4`` is
installed (Debian: libtcmalloc-minimal4), else the glibc tunables. ``VESSELFAST_ALLOCATOR=system``
turns this off.

Under torchrun the re-exec is harmless: ``execve`` keeps the process id, so the elastic agent still
watches the same worker, its signals and pipes; the environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT) is passed on unchanged, and torchrun's ``python -u`` is kept as PYTHONUNBUFFERED.
"""
from __future__ import annotations

import glob
import os
import sys
from typing import List, Optional

GLIBC_TUNABLES = ("glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824:"
                  "glibc.malloc.top_pad=268435456")
_MARK = "VESSELFAST_ALLOCATOR_SET"
TCMALLOC_GLOBS = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/*/libtcmalloc_minimal.so.4",
                  "/usr/lib64/libtcmalloc_minimal.so.4", "/usr/local/lib/libtcmalloc_minimal.so.4")


def find_tcmalloc() -> Optional[str]:
    for pattern in TCMALLOC_GLOBS:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return None


def current() -> str:
    """Which allocator this process runs with: tcmalloc | glibc-tuned | system."""
    if "tcmalloc" in os.environ.get("LD_PRELOAD", ""):
        return "tcmalloc"
    if "glibc.malloc.mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        return "glibc-tuned"
    return "system"


def environment() -> Optional[dict]:
    """The environment to re-execute with, or None when nothing is to be done."""
    if os.environ.get("VESSELFAST_ALLOCATOR", "auto") == "system" or os.environ.get(_MARK) or current() != "system":
        return None
    if not sys.platform.startswith("linux"):
        return None
    env = dict(os.environ, **{_MARK: "1"})
    if getattr(sys.stdout, "write_through", False):  # python -u (torchrun's workers): keep it unbuffered
        env["PYTHONUNBUFFERED"] = "1"
    lib = find_tcmalloc()
    if lib:
        env["LD_PRELOAD"] = ":".join(filter(None, [os.environ.get("LD_PRELOAD"), lib]))
    else:
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"), GLIBC_TUNABLES]))
    return env


def reexec_with_tuned_allocator(argv: List[str]) -> None:
    """Replaces this process by ``python -m vesselfast <argv>`` under the tuned allocator (same PID, so
    torchrun and job schedulers are unaffected); returns only when nothing needs doing."""
    env = environment()
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "vesselfast", *argv], env)

"""Memory allocator set-up for long CPU jobs.

With glibc's default malloc every tensor over its mmap threshold is a fresh mapping that the kernel
page-faults in, 4 KiB at a time, on first touch. That cost large-activation inference ~44% of its time
(a 128 px generator batch: 511 ms against 303 ms tuned) and made a fused op with a fresh 64 MB output
3-4x slower than the copy floor (docs/ALLOCATOR.md has the measurements). The heavy commands therefore
re-execute themselves once, before any tensor exists, with the first of:

1. ``tcmalloc`` when ``libtcmalloc_minimal.so.4`` is installed (Debian: libtcmalloc-minimal4);
2. ``mimalloc`` when ``libmimalloc.so`` is installed (``pip install cmeel-mimalloc`` puts it in
   site-packages: the no-apt route), with ``MIMALLOC_ALLOW_LARGE_OS_PAGES=1``;
3. glibc tunables, nothing to install: a 32 MB mmap threshold (glibc's maximum) and ``mmap_max=0`` (no
   block gets its own mapping: a freed 64 MB tensor stays in the heap for reuse instead of being unmapped
   and page-faulted in again, which on a VM with free-page reporting can cost a host fault per huge page),
   trim and top-pad thresholds that keep freed memory for reuse, and ``glibc.malloc.hugetlb=1`` (glibc >=
   2.35, ignored by older ones), which backs the heap with transparent huge pages: 512x fewer page faults,
   and measured here as fast as tcmalloc and mimalloc on every workload above.

``VESSELFAST_ALLOCATOR=system`` turns this off; ``=tcmalloc|mimalloc|glibc-tuned`` picks one.

Under torchrun the re-exec is harmless: ``execve`` keeps the process id, so the elastic agent still
watches the same worker, its signals and pipes; the environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT) is passed on unchanged, and torchrun's ``python -u`` is kept as PYTHONUNBUFFERED.
"""
from __future__ import annotations

import glob
import os
import site
import sys
from typing import Dict, List, Optional

GLIBC_TUNABLES = ("glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824:"
                  "glibc.malloc.top_pad=268435456:glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0")
MIMALLOC_OPTIONS = {"MIMALLOC_ALLOW_LARGE_OS_PAGES": "1"}
CHOICES = ("auto", "tcmalloc", "mimalloc", "glibc-tuned", "system")
_MARK = "VESSELFAST_ALLOCATOR_SET"
TCMALLOC_GLOBS = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/*/libtcmalloc_minimal.so.4",
                  "/usr/lib64/libtcmalloc_minimal.so.4", "/usr/local/lib/libtcmalloc_minimal.so.4")


def _first(patterns) -> Optional[str]:
    for pattern in patterns:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return None


def find_tcmalloc() -> Optional[str]:
    return _first(TCMALLOC_GLOBS)


def find_mimalloc() -> Optional[str]:
    """libmimalloc.so from PyPI's cmeel-mimalloc (in a site-packages folder), or a system copy."""
    roots = [p for p in (site.getsitepackages() if hasattr(site, "getsitepackages") else []) + [site.getusersitepackages()]
             if p]
    return _first([os.path.join(r, "cmeel.prefix", "lib", "libmimalloc.so*") for r in roots]
                  + ["/usr/lib/*/libmimalloc.so.2", "/usr/lib/*/libmimalloc.so", "/usr/local/lib/libmimalloc.so"])


def current() -> str:
    """Which allocator this process runs with: tcmalloc | mimalloc | glibc-tuned | system."""
    preload = os.environ.get("LD_PRELOAD", "")
    if "tcmalloc" in preload:
        return "tcmalloc"
    if "mimalloc" in preload:
        return "mimalloc"
    if "glibc.malloc.mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        return "glibc-tuned"
    return "system"


def _wanted() -> str:
    want = os.environ.get("VESSELFAST_ALLOCATOR", "auto").strip() or "auto"
    return want if want in CHOICES else "auto"


def plan() -> str:
    """The allocator the heavy commands will run with (what :func:`environment` sets up)."""
    want = _wanted()
    if want == "system" or current() != "system" or not sys.platform.startswith("linux"):
        return current()
    if want in ("auto", "tcmalloc") and find_tcmalloc():
        return "tcmalloc"
    if want in ("auto", "mimalloc") and find_mimalloc():
        return "mimalloc"
    return "glibc-tuned"


def environment() -> Optional[Dict[str, str]]:
    """The environment to re-execute with, or None when nothing is to be done."""
    if os.environ.get(_MARK) or plan() == current():
        return None
    env = dict(os.environ, **{_MARK: "1"})
    if getattr(sys.stdout, "write_through", False):  # python -u (torchrun's workers): keep it unbuffered
        env["PYTHONUNBUFFERED"] = "1"
    choice = plan()
    if choice in ("tcmalloc", "mimalloc"):
        lib = find_tcmalloc() if choice == "tcmalloc" else find_mimalloc()
        env["LD_PRELOAD"] = ":".join(filter(None, [os.environ.get("LD_PRELOAD"), lib]))
        if choice == "mimalloc":
            for key, value in MIMALLOC_OPTIONS.items():
                env.setdefault(key, value)
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

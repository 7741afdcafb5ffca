import os
from pathlib import Path

# Triton decides at import time whether its kernels (and triton.language's own @jit helpers such as
# tl.sum) are interpreted. Collection imports diffusers (tests/test_diffusers_parity.py), which imports
# triton, before tests/test_ops_backends.py is reached, so the switch must be set here, first. CPU
# runs never pick Triton by themselves (the registry's auto skips the interpreter), so nothing else
# changes. On a machine with a CUDA GPU the kernels are compiled instead (tests/test_cuda.py checks
# them there); importing torch does not import triton, so asking torch first is safe.
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("VESSELFAST_SHARED_DATA", REPO.parent / "shared" / "data"))

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One uninterrupted ``vesselfast train --preset tiny`` run (in-process): the reference that the
    resume, kill and segment tests compare with. Tests must not modify it."""
    from vesselfast.cli import main

    out = tmp_path_factory.mktemp("tiny") / "run"
    assert main(["train", "--preset", "tiny", "--out", str(out)]) == 0
    return out

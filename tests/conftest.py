import os
from pathlib import Path

import pytest
import torch

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

"""Seeds of a run's random streams, derived from the run seed and each stream's name.

Every stage (and every other consumer of randomness: the crop pools, histogram matching) draws from its
own stream, ``stream_seed(run_seed, name)``: a NumPy ``SeedSequence`` of the run seed and a hash of the
name, so streams never collide, adding a stage shifts no other stage's numbers, and a stage's identity
(its name and the run seed) says which stream it used.

Sharing is deliberate and named in :data:`SHARED_STREAMS`: the Iter-0 segmenter and both baselines start
from the same initial weights and draw their batches in the same order, so their difference is the
training data alone.
"""
from __future__ import annotations

import hashlib

import numpy as np

SHARED_STREAMS = {
    "segmenter_0": "segmenter_init",
    "baseline": "segmenter_init",
    "baseline_histmatch": "segmenter_init",
}


def stream_seed(run_seed: int, name: str) -> int:
    """A 63-bit seed for the stream ``name`` (after :data:`SHARED_STREAMS`) of a run seeded ``run_seed``."""
    stream = SHARED_STREAMS.get(name, name)
    digest = int.from_bytes(hashlib.sha256(stream.encode()).digest()[:8], "little")
    state = np.random.SeedSequence([int(run_seed) & 0xFFFFFFFFFFFFFFFF, digest]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)

"""Seeds of a run's random streams by name (the run seed plus a fixed offset per stream)."""
from __future__ import annotations

import re

_FIXED = {"source_crops": 1, "target_crops": 2, "pretrain_source": 10, "pretrain_target": 20, "synthesize_0": 30,
          "segmenter_0": 40, "baseline": 40, "baseline_histmatch": 40, "histmatch": 50}
_ROUND = {"pseudo_label": 100, "target_generator": 200, "synthesize": 300, "segmenter": 400}


def stream_seed(run_seed: int, name: str) -> int:
    if name in _FIXED:
        return run_seed + _FIXED[name]
    kind, k = re.fullmatch(r"(pseudo_label|target_generator|synthesize|segmenter)_(\d+)", name).groups()
    return run_seed + _ROUND[kind] + int(k)

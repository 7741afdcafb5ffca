"""Stage identities: everything a stage's result depends on, as one short hash.

A stage's identity is the SHA-256 of its name, the run seed (each stage's random stream derives from
both, see seeds.py), the config values it reads (dotted keys, or a whole section) and the identities of
the stages it consumes. Two runs whose stage has the same identity compute the same result, so
``vesselfast train --reuse OTHER_RUN`` takes it from there instead of recomputing it (a change to the
rounds then retrains no generator). Identities are recorded in stages.json.

``STAGE_FORMAT`` is part of every identity: bump it when a change to the code alters what an existing
stage computes from the same config, so that no run reuses a result the current code would not produce.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Dict, Iterable, Mapping

STAGE_FORMAT = 2


def config_value(cfg: Mapping[str, Any], dotted: str) -> Any:
    """``cfg`` as a nested dict; ``"generator.lr"`` -> cfg["generator"]["lr"], ``"generator"`` -> the section."""
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(f"stage identity reads unknown config key {dotted!r}")
        node = node[part]
    return node


def stage_identity(name: str, cfg: Mapping[str, Any], reads: Iterable[str], inputs: Mapping[str, str]) -> str:
    payload: Dict[str, Any] = {
        "format": STAGE_FORMAT,
        "stage": name,
        "seed": cfg["seed"],
        "config": {key: config_value(cfg, key) for key in sorted(set(reads))},
        "inputs": dict(sorted(inputs.items())),
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]

"""Names of the models a run evaluates: the one place that maps a segmenter stage to its key in
metrics.json and orders those keys.

    stage               metric key
    baseline            baseline             segmenter on preprocessed source crops
    baseline_histmatch  baseline_histmatch   the same on histogram-matched source crops (the anchor)
    baseline_selftrain  baseline_selftrain   the control: the rounds on pseudo-labelled real target crops
                                             instead of synthetic pairs (its earlier rounds, selftrain_k,
                                             are not evaluated)
    segmenter_0         iter0                F^0, on the Iter-0 synthetic pairs
    segmenter_k         iterk                F^k, the k-th co-optimisation round

``source`` appears only among the diagnostics (the source crops' distance to the target).

Every stage also has a *kind of work* (:func:`stage_kind`), the rows of a run's profile (:func:`profile`).
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, Optional, Tuple

BASELINES = ("baseline", "baseline_histmatch", "baseline_selftrain")
_ROUND = re.compile(r"iter(\d+)")
# the kinds of work a run's time is reported in (report.md, metrics.json "profile", compare)
KINDS = ("survey", "generator training", "inversion and synthesis", "segmenter training", "inference")
_SEGMENTER = re.compile(r"segmenter_(\d+)")


def metric_key(stage: str) -> Optional[str]:
    """Stage name -> metrics.json key; None for a stage that is not an evaluated segmenter."""
    if stage in BASELINES:
        return stage
    m = _SEGMENTER.fullmatch(stage)
    return f"iter{m.group(1)}" if m else None


def final_stage(stages: Iterable[str]) -> str:
    """The last round's segmenter stage among ``stages`` (``segmenter_K`` with the largest K), or ""."""
    rounds = [(round_of(key), stage) for stage in stages if (key := metric_key(stage)) and round_of(key) is not None]
    return max(rounds)[1] if rounds else ""


def round_of(key: str) -> Optional[int]:
    """iterk -> k; None for the baselines and other keys."""
    m = _ROUND.fullmatch(key)
    return int(m.group(1)) if m else None


def final_key(keys: Iterable[str]) -> str:
    """The last round among ``keys`` (``iterK`` with the largest K), or "" when there is none."""
    rounds = [(round_of(k), k) for k in keys if round_of(k) is not None]
    return max(rounds)[1] if rounds else ""


def model_order(key: str) -> Tuple[int, int, str]:
    """Sort key: source, baselines, then iter0, iter1, ..."""
    fixed = {"source": -1, "baseline": 0, "baseline_histmatch": 1, "baseline_selftrain": 2}
    k = round_of(key)
    return fixed.get(key, 3), -1 if k is None else k, key


def stage_kind(stage: str) -> str:
    """The kind of work a stage does (:data:`KINDS`). Segmenter stages also infer (calibration, marked
    share): that part of their time is kept apart as their ``inference_seconds``."""
    if stage == "survey":
        return "survey"
    if stage.startswith(("pretrain_", "target_generator_")):
        return "generator training"
    if stage == "invert" or stage.startswith("synthesize_"):
        return "inversion and synthesis"
    if "pseudo_label_" in stage:
        return "inference"
    return "segmenter training"


def profile(stages: Dict[str, Dict], evaluation_seconds: float = 0.0) -> Dict[str, float]:
    """Seconds per kind of work from stages.json entries (``seconds``, segmenters' ``inference_seconds``)
    plus the evaluations on the test split (inference); every kind present, in :data:`KINDS` order."""
    out = {kind: 0.0 for kind in KINDS}
    for name, info in stages.items():
        seconds, inferred = info.get("seconds", 0.0), info.get("inference_seconds", 0.0)
        out[stage_kind(name)] += seconds - inferred
        out["inference"] += inferred
    out["inference"] += evaluation_seconds
    return {kind: round(v, 1) for kind, v in out.items()}

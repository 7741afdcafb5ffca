"""``vesselfast compare RUN_DIR...``: every run's metrics side by side, with what each run changed.

One row per run: the config keys in which it differs from the first run (so an ablation table writes
itself), DSC of every model the runs share (baselines, iter0, each round), the final round's AUC and AHD,
the diagnostics of the last round, and the stage time a run costs from scratch (stages taken with
``--reuse`` count with the time they took where they were computed), in all and per kind of work
(keys.profile), so a slower stage shows between two commits.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Dict, List, Sequence

import yaml

from vesselfast.errors import UserError
from vesselfast.pipeline.keys import KINDS, final_key, model_order, profile
from vesselfast.pipeline.report import load_metrics
from vesselfast.pipeline.rundir import RunDir


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def load_run(path: str) -> Dict[str, Any]:
    run = RunDir(path, writer=False)
    cfg_path = run.root / "config.yaml"
    if not cfg_path.is_file():
        raise UserError(f"{path}: no config.yaml there; point compare at run directories made by vesselfast train")
    metrics = load_metrics(run)
    if not metrics.get("target_test"):
        raise UserError(f"{path}: no metrics.json with evaluations yet; let the run reach its first evaluation")
    stages = run.stages()
    return {"path": str(path), "name": Path(path).name, "config": _flatten(yaml.safe_load(cfg_path.read_text())),
            "metrics": metrics["target_test"], "diagnostics": metrics.get("diagnostics", {}),
            "stage_seconds": round(sum(s.get("seconds", 0) for s in stages.values()), 1),
            "computed_seconds": round(sum(s.get("seconds", 0) for s in stages.values() if "reused_from" not in s), 1),
            "reused": sorted(n for n, s in stages.items() if "reused_from" in s),
            "profile": metrics.get("profile") or profile(stages, sum(metrics.get("evaluation_seconds", {}).values()))}


def compare_runs(paths: Sequence[str]) -> Dict[str, Any]:
    if not paths:
        raise UserError("compare: give at least one run directory")
    runs = [load_run(p) for p in paths]
    first = runs[0]["config"]
    for r in runs:
        keys = sorted(set(first) | set(r["config"]))
        r["changed"] = {k: r["config"].get(k) for k in keys if k != "preset" and r["config"].get(k) != first.get(k)}
        r["final"] = final_key(r["metrics"])
    models = sorted({k for r in runs for k in r["metrics"]}, key=model_order)
    return {"models": models, "runs": runs}


def _fmt(v, digits=4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}"


def format_markdown(table: Dict[str, Any]) -> str:
    models = table["models"]
    head = ["run", "changed vs the first run"] + [f"{m} DSC" for m in models] + [
        "final AUC", "final AHD", "pseudo-label share", "synthetic-target distance (eucl / cos)", "stage min"] + [
        f"{kind} min" for kind in KINDS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table["runs"]:
        changed = ", ".join(f"{k}={v}" for k, v in r["changed"].items()) or "(reference)"
        final = r["metrics"].get(r["final"], {})
        diag = r["diagnostics"].get(r["final"], {})
        dist = (f"{_fmt(diag.get('hist_euclidean'), 3)} / {_fmt(diag.get('hist_cosine'), 3)}"
                if diag.get("hist_euclidean") is not None else "-")
        cells = [r["name"], changed] + [_fmt(r["metrics"].get(m, {}).get("dsc")) for m in models] + [
            _fmt(final.get("auc")), _fmt(final.get("ahd"), 2), _fmt(diag.get("pseudo_label_share"), 3), dist,
            _fmt(r["stage_seconds"] / 60, 1)] + [_fmt(r["profile"].get(kind, 0.0) / 60, 1) for kind in KINDS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(table: Dict[str, Any]) -> bytes:
    """DSC per model, one line per run (baselines at the left), as PNG bytes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = table["models"]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(models)), 3.6))
    for r in table["runs"]:
        ys = [r["metrics"].get(m, {}).get("dsc") for m in models]
        ax.plot(range(len(models)), [math.nan if y is None else y for y in ys], marker="o", label=r["name"])
    ax.set_xticks(range(len(models)), models, rotation=30, ha="right")
    ax.set_ylabel("DSC (target test)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def json_ready(table: Dict[str, Any]) -> Dict[str, Any]:
    """The table without per-image metrics (compare is about summaries)."""
    runs: List[Dict[str, Any]] = []
    for r in table["runs"]:
        metrics = {k: {m: v for m, v in e.items() if m != "per_image"} for k, e in r["metrics"].items()}
        runs.append({k: v for k, v in r.items() if k not in ("metrics", "config")} | {"metrics": metrics})
    return {"models": table["models"], "runs": runs}

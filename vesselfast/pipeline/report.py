"""What a run leaves for people: metrics.json / metrics.csv, picture grids, metrics.png, report.md."""
from __future__ import annotations

import csv
import io
import json
import math
from typing import Dict, List

import numpy as np

from vesselfast.pipeline.rundir import RunDir

SUMMARY_KEYS = ("dsc", "dsc_std", "auc", "auc_std", "acc", "acc_std", "ahd", "ahd_std", "n_images")


def _clean(obj):
    """NaN -> None so metrics.json is strict JSON."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


def load_metrics(run: RunDir) -> Dict:
    p = run.root / "metrics.json"
    return json.loads(p.read_text()) if p.exists() else {}


def _order(key: str):
    fixed = {"baseline": 0, "baseline_histmatch": 1}
    return (fixed.get(key, 2), int(key[4:]) if key.startswith("iter") and key[4:].isdigit() else -1, key)


def save_metrics(run: RunDir, metrics: Dict[str, Dict]) -> None:
    stages = run.stages()
    keys = sorted(metrics, key=_order)
    run.write_json("metrics.json", _clean({
        "target_test": {k: metrics[k] for k in keys},
        "stages": stages,
        "total_seconds": round(sum(s.get("seconds", 0) for s in stages.values()), 1),
        "unet_evals": sum(s.get("unet_evals", 0) for s in stages.values()),
    }))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(("model",) + SUMMARY_KEYS)
    for k in keys:
        w.writerow((k,) + tuple(metrics[k].get(m) for m in SUMMARY_KEYS))
    run.write_text("metrics.csv", buf.getvalue())


def _u8(img: np.ndarray, lo: float = -1.0, hi: float = 1.0) -> np.ndarray:
    return (np.clip((np.asarray(img, dtype=np.float32) - lo) / (hi - lo), 0, 1) * 255).round().astype(np.uint8)


def _save_png(run: RunDir, name: str, grid: np.ndarray) -> None:
    import cv2
    ok, buf = cv2.imencode(".png", grid)
    if ok:
        run.write_bytes(f"pictures/{name}", buf.tobytes())


def save_round_grid(run: RunDir, k: int, sources, latents, synth, masks, pseudo_images=None, pseudo_masks=None,
                    n: int = 6) -> None:
    """Rows: source crop | its latent | synthetic target | source mask [| real target crop | pseudo-label]."""
    n = min(n, sources.shape[0])
    rows = []
    for i in range(n):
        cols = [_u8(sources[i, 0]), _u8(latents[i, 0], -3, 3), _u8(synth[i, 0]), _u8(masks[i, 0], 0, 1)]
        if pseudo_images is not None:
            cols += [_u8(pseudo_images[i, 0]), _u8(pseudo_masks[i, 0], 0, 1)]
        rows.append(np.concatenate([np.pad(c, 2, constant_values=128) for c in cols], axis=1))
    _save_png(run, f"round{k}.png", np.concatenate(rows, axis=0))


def save_prediction_grid(run: RunDir, key: str, test_samples, probs: List[np.ndarray], n: int = 3) -> None:
    """Rows: target test image | probability | label, for the first ``n`` test images."""
    rows = []
    for s, p in list(zip(test_samples, probs))[:n]:
        cols = [_u8(s.image), _u8(p, 0, 1), _u8(s.mask, 0, 1)]
        rows.append(np.concatenate([np.pad(c, 2, constant_values=128) for c in cols], axis=1))
    if rows:
        width = max(r.shape[1] for r in rows)
        rows = [np.pad(r, ((0, 0), (0, width - r.shape[1])), constant_values=128) for r in rows]
        _save_png(run, f"test_{key}.png", np.concatenate(rows, axis=0))


def plot_metrics(run: RunDir, metrics: Dict[str, Dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(metrics, key=_order)
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
    for ax, m in zip(axes, ("dsc", "auc", "acc", "ahd")):
        vals = [metrics[k].get(m) for k in keys]
        vals = [np.nan if v is None else v for v in vals]
        stds = [metrics[k].get(f"{m}_std") or 0 for k in keys]
        colors = ["#999999" if k.startswith("baseline") else "#1f77b4" for k in keys]
        ax.bar(range(len(keys)), vals, yerr=stds, color=colors, capsize=2)
        ax.set_xticks(range(len(keys)), [k.replace("baseline_", "b_") for k in keys], rotation=45, ha="right")
        ax.set_title(m.upper() + (" (px, lower is better)" if m == "ahd" else ""))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    run.write_bytes("metrics.png", buf.getvalue())


def write_report(run: RunDir, cfg, metrics: Dict[str, Dict]) -> None:
    stages = run.stages()
    lines = [f"# vesselfast run: preset `{cfg.preset}`", "",
             f"Source: {', '.join(cfg.data.source)}; target: {cfg.data.target} (train images, labels unread); "
             f"evaluated on {cfg.data.target_test or cfg.data.target} (test split).", "",
             "| model | DSC | AUC | ACC | AHD (px) | images |", "|---|---|---|---|---|---|"]
    fmt = lambda v, d=4: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}f}"
    for k in sorted(metrics, key=_order):
        m = metrics[k]
        lines.append(f"| {k} | {fmt(m['dsc'])} ± {fmt(m['dsc_std'], 3)} | {fmt(m['auc'])} | {fmt(m['acc'])} | "
                     f"{fmt(m['ahd'], 2)} | {m['n_images']} |")
    lines += ["", "| stage | seconds | U-Net evals/image | notes |", "|---|---|---|---|"]
    for name, info in stages.items():
        notes = ", ".join(f"{k}={v}" for k, v in info.items() if k not in ("seconds", "unet_evals_per_image"))
        lines.append(f"| {name} | {info.get('seconds', 0):.1f} | {info.get('unet_evals_per_image', '')} | {notes} |")
    total = sum(s.get("seconds", 0) for s in stages.values())
    lines += ["", f"Total stage time: {total / 60:.1f} min.", "",
              "Pictures: `metrics.png`, `pictures/round*.png` (source | latent | synthetic target | mask | "
              "real target | pseudo-label), `pictures/test_*.png` (test image | probability | label).", ""]
    run.write_text("report.md", "\n".join(lines))


def write_all(run: RunDir, cfg, metrics: Dict[str, Dict]) -> None:
    save_metrics(run, metrics)
    plot_metrics(run, metrics)
    write_report(run, cfg, metrics)

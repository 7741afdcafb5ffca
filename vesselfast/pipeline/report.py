"""What a run leaves for people: metrics.json / metrics.csv, picture grids, metrics.png, report.md."""
from __future__ import annotations

import csv
import io
import json
import math
from typing import Dict, List, Optional

import numpy as np

from vesselfast.pipeline.keys import model_order
from vesselfast.pipeline.rundir import RunDir

SUMMARY_KEYS = ("dsc", "dsc_std", "auc", "auc_std", "acc", "acc_std", "ahd", "ahd_std", "n_images")


def strict_json(obj):
    """NaN -> None so metrics.json is strict JSON."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [strict_json(v) for v in obj]
    return obj


def load_metrics(run: RunDir) -> Dict:
    p = run.root / "metrics.json"
    return json.loads(p.read_text()) if p.exists() else {}


def save_metrics(run: RunDir, metrics: Dict[str, Dict], diagnostics: Optional[Dict[str, Dict]] = None) -> None:
    """metrics.json / metrics.csv. ``total_seconds`` is what the run's stages cost from scratch (a stage
    taken with --reuse counts with the time it took where it was computed); ``computed_seconds`` is what
    was computed in this directory."""
    stages = run.stages()
    keys = sorted(metrics, key=model_order)
    run.write_json("metrics.json", strict_json({
        "target_test": {k: metrics[k] for k in keys},
        "diagnostics": dict(sorted((diagnostics or {}).items(), key=lambda kv: model_order(kv[0]))),
        "stages": stages,
        "total_seconds": round(sum(s.get("seconds", 0) for s in stages.values()), 1),
        "computed_seconds": round(sum(s.get("seconds", 0) for s in stages.values() if "reused_from" not in s), 1),
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

    keys = sorted(metrics, key=model_order)
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


def plot_diagnostics(run: RunDir, diagnostics: Dict[str, Dict]) -> None:
    """The paper's per-round diagnostics: intensity distance of the synthetic to the real target images
    (Euclidean and cosine, the source crops as the starting point) and the pseudo-labels' positive share."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(diagnostics, key=model_order)
    if not keys:
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for m, style in (("hist_euclidean", "o-"), ("hist_cosine", "s--")):
        axes[0].plot(range(len(keys)), [diagnostics[k].get(m, np.nan) for k in keys], style, label=m[5:])
    axes[0].set_xticks(range(len(keys)), keys, rotation=30, ha="right")
    axes[0].set_title("synthetic vs real target: histogram distance")
    axes[0].legend(fontsize=8)
    share = [k for k in keys if "pseudo_label_share" in diagnostics[k]]
    axes[1].bar(range(len(share)), [diagnostics[k]["pseudo_label_share"] for k in share], color="#1f77b4")
    axes[1].set_xticks(range(len(share)), share)
    axes[1].set_title("pseudo-label positive share")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    run.write_bytes("diagnostics.png", buf.getvalue())


def write_report(run: RunDir, cfg, metrics: Dict[str, Dict], diagnostics: Optional[Dict[str, Dict]] = None) -> None:
    stages = run.stages()
    lines = [f"# vesselfast run: preset `{cfg.preset}`", "",
             f"Source: {', '.join(cfg.data.source)}; target: {cfg.data.target} (train images, labels unread); "
             f"evaluated on {cfg.data.target_test or cfg.data.target} (test split).", "",
             "| model | DSC | AUC | ACC | AHD (px) | images |", "|---|---|---|---|---|---|"]
    fmt = lambda v, d=4: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}f}"
    for k in sorted(metrics, key=model_order):
        m = metrics[k]
        lines.append(f"| {k} | {fmt(m['dsc'])} ± {fmt(m['dsc_std'], 3)} | {fmt(m['auc'])} | {fmt(m['acc'])} | "
                     f"{fmt(m['ahd'], 2)} | {m['n_images']} |")
    if diagnostics:
        lines += ["", "Per round (the paper's diagnostics): intensity-histogram distance of the images the segmenter "
                  "is trained on to the real target training crops, and the positive share of the pseudo-labels "
                  "the round's target generator learned from.", "",
                  "| images | Euclidean | cosine | pseudo-label share |", "|---|---|---|---|"]
        for k in sorted(diagnostics, key=model_order):
            d = diagnostics[k]
            lines.append(f"| {k} | {fmt(d.get('hist_euclidean'))} | {fmt(d.get('hist_cosine'))} | "
                         f"{fmt(d.get('pseudo_label_share'))} |")
    lines += ["", "| stage | seconds | U-Net evals/image | notes |", "|---|---|---|---|"]
    for name, info in stages.items():
        notes = ", ".join(f"{k}={v}" for k, v in info.items() if k not in ("seconds", "unet_evals_per_image"))
        lines.append(f"| {name} | {info.get('seconds', 0):.1f} | {info.get('unet_evals_per_image', '')} | {notes} |")
    total = sum(s.get("seconds", 0) for s in stages.values())
    lines += ["", f"Total stage time: {total / 60:.1f} min.", "",
              "Pictures: `metrics.png`, `diagnostics.png`, `pictures/round*.png` (source | latent | synthetic target | mask | "
              "real target | pseudo-label), `pictures/test_*.png` (test image | probability | label).", ""]
    run.write_text("report.md", "\n".join(lines))


def write_all(run: RunDir, cfg, metrics: Dict[str, Dict], diagnostics: Optional[Dict[str, Dict]] = None) -> None:
    save_metrics(run, metrics, diagnostics)
    plot_metrics(run, metrics)
    plot_diagnostics(run, diagnostics or {})
    write_report(run, cfg, metrics, diagnostics)

"""What a run leaves for people: metrics.json / metrics.csv, picture grids, metrics.png, report.md."""
from __future__ import annotations

import csv
import io
import json
import math
from typing import Dict, List, Optional, Sequence

import numpy as np

from vesselfast.pipeline.keys import model_order, profile
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


def save_metrics(run: RunDir, metrics: Dict[str, Dict], diagnostics: Optional[Dict[str, Dict]] = None,
                 evaluation_seconds: Optional[Dict[str, float]] = None) -> None:
    """metrics.json / metrics.csv. ``total_seconds`` is what the run's stages cost from scratch (a stage
    taken with --reuse counts with the time it took where it was computed); ``computed_seconds`` is what
    was computed in this directory; ``evaluation_seconds`` what each model's test evaluation took;
    ``profile`` the seconds per kind of work (keys.profile: stages and evaluations)."""
    stages, evaluation_seconds = run.stages(), dict(evaluation_seconds or {})
    keys = sorted(metrics, key=model_order)
    run.write_json("metrics.json", strict_json({
        "target_test": {k: metrics[k] for k in keys},
        "diagnostics": dict(sorted((diagnostics or {}).items(), key=lambda kv: model_order(kv[0]))),
        "stages": stages,
        "total_seconds": round(sum(s.get("seconds", 0) for s in stages.values()), 1),
        "computed_seconds": round(sum(s.get("seconds", 0) for s in stages.values() if "reused_from" not in s), 1),
        "unet_evals": sum(s.get("unet_evals", 0) for s in stages.values()),
        "evaluation_seconds": evaluation_seconds,
        "profile": profile(stages, sum(evaluation_seconds.values())),
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


PAD = 2            # grey frame around each picture in a grid
MIN_COLUMN = 128   # px: smaller crops are enlarged (nearest neighbour, integer factor) so titles fit
FONT, FONT_SCALE, LINE = 0, 0.42, 15  # cv2.FONT_HERSHEY_SIMPLEX, its size and line height in px


def _wrap(title: str, width: int) -> List[str]:
    """Words of ``title`` in lines no wider than ``width`` px (a single long word stays whole)."""
    import cv2

    lines: List[str] = []
    for word in title.split():
        line = f"{lines[-1]} {word}" if lines else word
        if lines and cv2.getTextSize(line, FONT, FONT_SCALE, 1)[0][0] <= width:
            lines[-1] = line
        else:
            lines.append(word)
    return lines


def header_strip(titles: Sequence[str], widths: Sequence[int]) -> np.ndarray:
    """A dark strip with each title centred (wrapped) over its column of ``widths`` px."""
    import cv2

    wrapped = [_wrap(t, w - 6) for t, w in zip(titles, widths)]
    strip = np.full((LINE * max(len(w) for w in wrapped) + 8, sum(widths)), 40, np.uint8)
    x0 = 0
    for lines, w in zip(wrapped, widths):
        for i, line in enumerate(lines):
            tw = cv2.getTextSize(line, FONT, FONT_SCALE, 1)[0][0]
            cv2.putText(strip, line, (x0 + max(0, (w - tw) // 2), LINE * (i + 1)), FONT, FONT_SCALE, 255, 1,
                        cv2.LINE_AA)
        x0 += w
    return strip


def titled_grid(rows: List[List[np.ndarray]], titles: Sequence[str], gap_before: int = -1) -> np.ndarray:
    """uint8 pictures in rows x columns, each framed, small ones enlarged to ``MIN_COLUMN``, every column as
    wide as its widest picture, under a header strip of column ``titles``. ``gap_before``: a column that
    starts a separate group (a wider frame before it)."""
    import cv2

    largest = max(max(c.shape) for r in rows for c in r)
    f = max(1, -(-MIN_COLUMN // largest))
    rows = [[cv2.resize(c, (c.shape[1] * f, c.shape[0] * f), interpolation=cv2.INTER_NEAREST) for c in r]
            for r in rows]
    col_w = [max(r[j].shape[1] for r in rows if j < len(r)) + 2 * PAD for j in range(len(titles))]
    if 0 < gap_before < len(col_w):
        col_w[gap_before] += 4 * PAD
    out = []
    for r in rows:
        h = max(c.shape[0] for c in r) + 2 * PAD
        cells = []
        for c, w in zip(r, col_w):  # centred in its column
            left = (w - c.shape[1]) // 2
            cells.append(np.pad(c, ((PAD, h - c.shape[0] - PAD), (left, w - c.shape[1] - left)), constant_values=128))
        cells += [np.full((h, w), 128, np.uint8) for w in col_w[len(r):]]
        out.append(np.concatenate(cells, axis=1))
    return np.concatenate([header_strip(titles, col_w)] + out, axis=0)


ROUND_TITLES = ("source crop", "its inversion latent", "synthetic target (from the latent)", "source mask",
                "real target crop (another image)", "its pseudo-label")


def save_round_grid(run: RunDir, k: int, sources, latents, synth, masks, pseudo_images=None, pseudo_masks=None,
                    n: int = 6) -> None:
    """Rows: source crop | its latent | synthetic target | source mask [| real target crop | pseudo-label];
    the last two are a real target training crop (not the row's source) and the pseudo-label F^(k-1) gave it."""
    n = min(n, sources.shape[0])
    rows = []
    for i in range(n):
        cols = [_u8(sources[i, 0]), _u8(latents[i, 0], -3, 3), _u8(synth[i, 0]), _u8(masks[i, 0], 0, 1)]
        if pseudo_images is not None:
            cols += [_u8(pseudo_images[i, 0]), _u8(pseudo_masks[i, 0], 0, 1)]
        rows.append(cols)
    titles = ROUND_TITLES[:len(rows[0])] if rows else ()
    if rows:
        _save_png(run, f"round{k}.png", titled_grid(rows, titles, gap_before=4))


def save_prediction_grid(run: RunDir, key: str, test_samples, probs: List[np.ndarray], n: int = 3) -> None:
    """Rows: target test image | probability | label, for the first ``n`` test images."""
    rows = [[_u8(s.image), _u8(p, 0, 1), _u8(s.mask, 0, 1)] for s, p in list(zip(test_samples, probs))[:n]]
    if rows:
        titles = (f"target test image ({key})", "vessel probability (white = 1)", "label (ground truth)")
        _save_png(run, f"test_{key}.png", titled_grid(rows, titles))


def run_title(run: RunDir, cfg=None) -> str:
    """The run's name for picture titles: its directory and preset."""
    return f"run {run.root.name}" + (f" (preset {cfg.preset})" if cfg is not None else "")


def _png(run: RunDir, name: str, fig) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    run.write_bytes(name, buf.getvalue())


def plot_metrics(run: RunDir, metrics: Dict[str, Dict], title: str = "") -> None:
    """One bar per model and metric on the target test split: the baselines grey, the method's rounds blue."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    keys = sorted(metrics, key=model_order)
    n = metrics[keys[-1]].get("n_images") if keys else None
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.6))
    for ax, m in zip(axes, ("dsc", "auc", "acc", "ahd")):
        vals = [metrics[k].get(m) for k in keys]
        vals = [np.nan if v is None else v for v in vals]
        stds = [metrics[k].get(f"{m}_std") or 0 for k in keys]
        colors = [BASELINE_COLOUR if k.startswith("baseline") else METHOD_COLOUR for k in keys]
        ax.bar(range(len(keys)), vals, yerr=stds, color=colors, capsize=2)
        ax.set_xticks(range(len(keys)), [k.replace("baseline_", "b_") for k in keys], rotation=45, ha="right")
        ax.set_title(m.upper() + (" (px, lower is better)" if m == "ahd" else " (higher is better)"), fontsize=10)
    fig.legend(handles=[Patch(color=BASELINE_COLOUR, label="baselines (b_ = baseline_; b_selftrain: the rounds without a generator)"),
                        Patch(color=METHOD_COLOUR, label="the method (iter0 = Iter-0, iterK = round K)")],
               loc="upper right", fontsize=8, ncol=2, frameon=False)
    fig.suptitle(f"{title or run_title(run)}: target test split" + (f", {n} images" if n else "")
                 + " (mean ± std over images)", x=0.01, ha="left", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    _png(run, "metrics.png", fig)


BASELINE_COLOUR, METHOD_COLOUR = "#999999", "#1f77b4"


def plot_diagnostics(run: RunDir, diagnostics: Dict[str, Dict], title: str = "") -> None:
    """The paper's per-round diagnostics: intensity distance of the synthetic to the real target images
    (Euclidean and cosine, the source crops as the starting point) and the pseudo-labels' positive share."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(diagnostics, key=model_order)
    if not keys:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for m, style in (("hist_euclidean", "o-"), ("hist_cosine", "s--")):
        axes[0].plot(range(len(keys)), [diagnostics[k].get(m, np.nan) for k in keys], style, label=m[5:])
    axes[0].set_xticks(range(len(keys)), keys, rotation=30, ha="right")
    axes[0].set_xlabel("images compared (source crops, then each round's synthetic targets)", fontsize=8)
    axes[0].set_ylabel("histogram distance to real target crops\n(lower is closer to real OCTA)", fontsize=8)
    axes[0].set_title("synthetic vs real target images", fontsize=10)
    axes[0].legend(fontsize=8, title="distance", title_fontsize=8)
    share = [k for k in keys if "pseudo_label_share" in diagnostics[k]]
    axes[1].bar(range(len(share)), [diagnostics[k]["pseudo_label_share"] for k in share], color=METHOD_COLOUR,
                width=0.5)
    axes[1].set_xticks(range(len(share)), share)
    axes[1].set_xlim(-1, max(len(share), 1))
    axes[1].set_xlabel("round (pseudo-labels made by the previous round's segmenter)", fontsize=8)
    axes[1].set_ylabel("share of target pixels labelled vessel", fontsize=8)
    axes[1].set_title("pseudo-label positive share", fontsize=10)
    if not share:
        axes[1].text(0.5, 0.5, "no co-optimisation round yet", ha="center", va="center", transform=axes[1].transAxes)
    fig.suptitle(f"{title or run_title(run)}: per-round diagnostics", x=0.01, ha="left", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    _png(run, "diagnostics.png", fig)


def calibration_note(cfg, stages: Dict[str, Dict]) -> List[str]:
    """Report lines saying which vessel fraction the segmenters were calibrated to and that the share the
    final model marks (so the vessel area density measured from its masks) follows that figure; [] when no
    segmenter was calibrated."""
    priors = [info["calibration_prior"] for name, info in stages.items()
              if name.startswith("segmenter_") and info.get("calibration_prior") is not None]
    if not priors:
        return []
    prior, mode = priors[-1], str(cfg.segmenter.vessel_prior)  # the last round's: the final model's
    estimate = stages.get("vessel_fraction", {}).get("mean_probability")
    if mode == "estimate":  # both figures are stored rounded to 5 digits; they differ only where the cap applied
        where = ("the label-free estimate: baseline_histmatch's mean probability on them" if estimate is None
                 or abs(estimate - prior) < 1e-9 else
                 f"baseline_histmatch's mean probability {100 * estimate:.2f} %, capped at the source masks' "
                 "share (segmenter.estimate_cap)")
    elif mode == "source":
        where = "the source masks' vessel fraction (segmenter.vessel_prior: source)"
    else:
        where = f"the fixed fraction segmenter.vessel_prior: {mode}"
    return ["", f"Calibration: every segmenter F^k (and the self-training control, if the run has it) is calibrated to mark **{100 * prior:.2f} %** "
            f"of the target training pixels ({where}). The final model marks about that share on scans of this "
            "target, so the vessel area density measured from its masks follows this figure."
            + (" On OCTA-500 3M the label-free estimate was -4 to +7 % off the labels' share over three seeds, "
               "which moved the final DSC by at most 0.004 (docs/PIPELINE.md, \"What the estimate's error "
               "costs\")." if mode == "estimate" else "")]


def write_report(run: RunDir, cfg, metrics: Dict[str, Dict], diagnostics: Optional[Dict[str, Dict]] = None,
                 evaluation_seconds: Optional[Dict[str, float]] = None) -> None:
    stages = run.stages()
    lines = [f"# vesselfast run: preset `{cfg.preset}`", "",
             f"Source: {', '.join(cfg.data.source)}; target: {cfg.data.target} (train images, labels unread); "
             + (f"evaluated on {cfg.data.target_test or cfg.data.target} (test split)." if metrics else
                "not evaluated (no labelled test images; give --target-test DIR with labels to score a run)."), "",
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
    lines += calibration_note(cfg, stages)
    lines += ["", "| stage | seconds | U-Net evals/image | notes |", "|---|---|---|---|"]
    for name, info in stages.items():
        notes = ", ".join(f"{k}={v}" for k, v in info.items() if k not in ("seconds", "unet_evals_per_image"))
        lines.append(f"| {name} | {info.get('seconds', 0):.1f} | {info.get('unet_evals_per_image', '')} | {notes} |")
    total = sum(s.get("seconds", 0) for s in stages.values())
    evaluations = sum((evaluation_seconds or {}).values())
    lines += ["", f"Total stage time: {total / 60:.1f} min (plus {evaluations / 60:.1f} min evaluating on the test "
              "split). Per kind of work (segmenter stages' calibration and marked-share passes count as inference, "
              "as do the evaluations):", "", "| kind of work | minutes | share |", "|---|---|---|"]
    kinds = profile(stages, evaluations)
    for kind, seconds in kinds.items():
        lines.append(f"| {kind} | {seconds / 60:.1f} | {100 * seconds / max(sum(kinds.values()), 1e-9):.0f} % |")
    lines += ["",
              "Pictures: `metrics.png`, `diagnostics.png`, `pictures/round*.png` (source | latent | synthetic target | mask | "
              "real target | pseudo-label; the last two are another image, not the row's source), "
              "`pictures/test_*.png` (test image | probability | label); each grid has its column titles.", ""]
    run.write_text("report.md", "\n".join(lines))


def write_all(run: RunDir, cfg, metrics: Dict[str, Dict], diagnostics: Optional[Dict[str, Dict]] = None,
              evaluation_seconds: Optional[Dict[str, float]] = None) -> None:
    save_metrics(run, metrics, diagnostics, evaluation_seconds)
    plot_metrics(run, metrics, run_title(run, cfg))
    plot_diagnostics(run, diagnostics or {}, run_title(run, cfg))
    write_report(run, cfg, metrics, diagnostics, evaluation_seconds)

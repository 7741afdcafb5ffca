"""A run's pictures carry their titles: column headers on the grids (pictures/round*.png, test_*.png), the
run's name and a legend on metrics.png, axis labels on diagnostics.png."""
from types import SimpleNamespace

import cv2
import numpy as np
import torch

from vesselfast.pipeline import report
from vesselfast.pipeline.rundir import RunDir


def _read(path):
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img is not None, path
    return img


def test_header_strip_wraps_titles_into_their_columns():
    strip = report.header_strip(["a", "a title much longer than its column"], [40, 40])
    one = report.header_strip(["a", "b"], [40, 40])
    assert strip.shape[1] == 80 and strip.shape[0] > one.shape[0]  # wrapped onto more lines
    assert (one[:, :40] > 128).any() and (one[:, 40:] > 128).any()  # text drawn over each column


def test_grid_grows_by_the_strip_height_and_enlarges_small_crops():
    rows = [[np.full((96, 96), 10 * i, np.uint8) for i in range(3)] for _ in range(2)]
    titles = ("test image", "probability", "label")
    grid = report.titled_grid(rows, titles)
    f = 2  # 96 px crops are enlarged x2 to reach MIN_COLUMN (128)
    cell = 96 * f + 2 * report.PAD
    strip = report.header_strip(titles, [cell] * 3)
    assert grid.shape == (strip.shape[0] + 2 * cell, 3 * cell)
    assert np.array_equal(grid[:strip.shape[0]], strip)
    big = report.titled_grid([[np.zeros((304, 304), np.uint8)]], ("x",))
    assert big.shape[1] == 304 + 2 * report.PAD  # no enlargement


def test_run_pictures_write_with_titles(tmp_path):
    run = RunDir(tmp_path / "my_run")
    g = torch.Generator().manual_seed(0)
    crops = [torch.rand(4, 1, 32, 32, generator=g) * 2 - 1 for _ in range(5)]
    masks = [(torch.rand(4, 1, 32, 32, generator=g) > 0.8).float() for _ in range(2)]
    report.save_round_grid(run, 0, crops[0], crops[1], crops[2], masks[0])
    report.save_round_grid(run, 1, crops[0], crops[1], crops[2], masks[0], crops[3], masks[1])
    r0, r1 = _read(tmp_path / "my_run/pictures/round0.png"), _read(tmp_path / "my_run/pictures/round1.png")
    cell = 32 * 4 + 2 * report.PAD  # 32 px crops enlarged x4
    strip = r0.shape[0] - 4 * cell
    assert strip > 0 and r0.shape[1] == 4 * cell
    assert r1.shape == (strip + 4 * cell, 6 * cell + 4 * report.PAD)  # a wider gap before the real target pair
    assert (r0[:strip] > 128).any()  # titles drawn

    samples = [SimpleNamespace(image=np.zeros((80, 100), np.float32), mask=np.ones((80, 100), bool))] * 2
    report.save_prediction_grid(run, "iter1", samples, [np.full((80, 100), 0.5, np.float32)] * 2)
    test = _read(tmp_path / "my_run/pictures/test_iter1.png")
    assert test.shape[1] == 3 * (200 + 2 * report.PAD) and test.shape[0] > 2 * (160 + 2 * report.PAD)

    metrics = {k: {"dsc": 0.5, "dsc_std": 0.1, "auc": 0.9, "acc": 0.95, "ahd": 2.0, "n_images": 2}
               for k in ("baseline", "baseline_histmatch", "iter0", "iter1")}
    cfg = SimpleNamespace(preset="tiny")
    assert report.run_title(run, cfg) == "run my_run (preset tiny)"
    report.plot_metrics(run, metrics, report.run_title(run, cfg))
    report.plot_diagnostics(run, {"source": {"hist_euclidean": 0.3, "hist_cosine": 0.2},
                                  "iter1": {"hist_euclidean": 0.1, "hist_cosine": 0.05, "pseudo_label_share": 0.07}})
    assert _read(tmp_path / "my_run/metrics.png").shape[0] > 300
    assert _read(tmp_path / "my_run/diagnostics.png").shape[0] > 300


def test_calibration_note_names_the_prior_and_where_it_came_from():
    cfg = lambda mode: SimpleNamespace(segmenter=SimpleNamespace(vessel_prior=mode))
    stages = {"vessel_fraction": {"mean_probability": 0.07151},
              "segmenter_0": {"calibration_prior": 0.07151}, "segmenter_1": {"calibration_prior": 0.07151}}
    (line,) = [l for l in report.calibration_note(cfg("estimate"), stages) if l]
    assert "**7.15 %**" in line and "label-free estimate" in line and "capped" not in line
    capped = dict(stages, segmenter_1={"calibration_prior": 0.12})  # the estimate above the source's share
    (line,) = [l for l in report.calibration_note(cfg("estimate"), capped) if l]
    assert "**12.00 %**" in line and "7.15 %, capped" in line
    (line,) = [l for l in report.calibration_note(cfg("0.0667"), {"segmenter_0": {"calibration_prior": 0.0667}}) if l]
    assert "**6.67 %**" in line and "fixed fraction segmenter.vessel_prior: 0.0667" in line
    assert "label-free estimate" not in line
    assert report.calibration_note(cfg("none"), {"segmenter_0": {"calibration_prior": None}}) == []
    assert report.calibration_note(cfg("estimate"), {"baseline_histmatch": {}}) == []

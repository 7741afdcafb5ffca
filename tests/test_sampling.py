"""The target sample (pipeline/sampling.py): which images, its identity rule, and the sampling errors
against brute force over every possible sample."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from vesselfast.cli import main
from vesselfast.data import Sample
from vesselfast.pipeline.sampling import KEY, draw, mean_error, ratio_error, share_error


def _samples(n):
    return [Sample(f"im{i}", np.full((4, 4), i, np.float32), None, None, f"im{i}.png") for i in range(n)]


def test_draw_keeps_a_small_target_whole_and_samples_a_large_one():
    whole = draw(_samples(5), 5, seed=1)
    assert [s.name for s in whole.samples] == [f"im{i}" for i in range(5)]
    assert whole.keys == () and not whole.sampled and whole.population == 5
    part = draw(_samples(50), 8, seed=1)
    names = [s.name for s in part.samples]
    assert len(set(names)) == 8 and part.keys == (KEY,) and part.sampled and part.population == 50
    assert names == sorted(names, key=lambda n: int(n[2:]))  # in the folder's order
    assert names == [s.name for s in draw(_samples(50), 8, seed=1).samples]  # one sample per seed
    assert names != [s.name for s in draw(_samples(50), 8, seed=2).samples]
    assert "8 of the 50" in part.describe() and "all 5" in whole.describe()


def test_mean_error_is_unbiased_for_the_variance_of_the_sample_mean():
    """Over every sample of n of N (brute force), the mean of mean_error^2 equals the exact variance of
    the sample mean, and a sample that is the population has no error."""
    values = np.array([0.3, 1.7, 2.2, 0.1, 5.0, 3.3, 0.9])
    n = 3
    means, squared = [], []
    for idx in itertools.combinations(range(values.size), n):
        means.append(values[list(idx)].mean())
        squared.append(mean_error(values[list(idx)], values.size) ** 2)
    exact = np.var(means)  # every sample equally likely: the population variance of the sample means
    assert np.mean(squared) == pytest.approx(exact, rel=1e-12)
    assert mean_error(values, values.size) == 0.0


def test_ratio_error_reduces_to_the_mean_and_tracks_the_ratio_estimators_spread():
    rng = np.random.default_rng(0)
    totals = rng.random(9) * 100
    same = np.full(9, 400.0)
    assert ratio_error(totals[:4], same[:4], 9) == pytest.approx(mean_error(totals[:4] / 400.0, 9), rel=1e-12)
    assert ratio_error(totals, same, 9) == 0.0
    # images of different sizes with the same share up to noise: the linearised error against the exact
    # spread of the pooled ratio over every sample of 4 of 9
    sizes = rng.integers(300, 500, 9).astype(float)
    vessel = sizes * (0.07 + 0.01 * rng.standard_normal(9))
    ratios, squared = [], []
    for idx in itertools.combinations(range(9), 4):
        i = list(idx)
        ratios.append(vessel[i].sum() / sizes[i].sum())
        squared.append(ratio_error(vessel[i], sizes[i], 9) ** 2)
    assert np.sqrt(np.mean(squared)) == pytest.approx(np.std(ratios), rel=0.1)


def test_share_error_counts_pixels_at_the_threshold():
    probs = [np.array([[0.9, 0.2], [0.5, 0.1]]), np.array([[0.6, 0.7, 0.1]]), np.array([[0.0, 0.0]])]
    counts, sizes = [2, 2, 0], [4, 3, 2]
    assert share_error(probs, 10, 0.5) == pytest.approx(ratio_error(counts, sizes, 10), rel=1e-12)


def test_a_target_larger_than_the_sample_is_sampled_everywhere_and_only_then_named(tiny_run, tmp_path):
    """data.target_sample=2 of the tiny target's 4 training images: the survey, the vessel-fraction
    estimate, calibration and pseudo-labels see the same 2 images (the pseudo-labels' marked share
    recomputed from them), state their sampling errors, and their identities name the key; a sample as
    large as the target changes no identity (every stage reused)."""
    from vesselfast.pipeline.calibration import marked_share
    from vesselfast.pipeline.config import resolve
    from vesselfast.pipeline.inputs import load_inputs
    from vesselfast.pipeline.rundir import RunDir
    from vesselfast.pipeline.seeds import stream_seed
    from vesselfast.pipeline.stages import Context, segmenter_probs

    same = tmp_path / "same"
    assert main(["train", "--preset", "tiny", "--out", str(same), "--reuse", str(tiny_run),
                 "--set", "data.target_sample=4"]) == 0
    assert all("reused_from" in info for info in json.loads((same / "stages.json").read_text()).values())

    run = tmp_path / "sampled"
    assert main(["train", "--preset", "tiny", "--out", str(run), "--set", "data.target_sample=2"]) == 0
    stages = json.loads((run / "stages.json").read_text())
    for name in ("survey", "vessel_fraction", "pseudo_label_1", "selftrain_pseudo_label_1"):
        assert stages[name]["target_images_used"] == 2, name
    assert stages["vessel_fraction"]["mean_probability_error"] >= 0
    assert stages["segmenter_0"]["marked_share_error"] >= 0 and stages["survey"]["marked_share_error"] >= 0
    assert "target_calibre_error" in stages["survey"]  # NaN when fewer than two sampled maps mark a vessel
    original = json.loads((tiny_run / "stages.json").read_text())
    assert all(stages[s]["identity"] != original[s]["identity"] for s in ("survey", "pseudo_label_1"))

    cfg = resolve("tiny")
    sample = draw(load_inputs(cfg).target_train, 2, stream_seed(0, "target_sample"))
    ctx = Context(None, RunDir(run, writer=False), 0, "cpu", 1)
    probs = segmenter_probs(ctx, RunDir(run, writer=False).load("segmenter_0"), sample.images, "fp32", "check")
    assert stages["pseudo_label_1"]["marked_share"] == pytest.approx(marked_share(probs, 0.5), abs=0.01)


def test_stage_growth_script_compares_stage_seconds(tiny_run, tmp_path, capsys):
    """scripts/stage_growth.py: a run against itself is 1.00 on every stage and passes any limit >= 1;
    stage seconds doubled by hand give 2.00 and fail --limit 1.5; a missing run is one line, exit 2."""
    import importlib.util
    import shutil
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("stage_growth", Path(__file__).parents[1] / "scripts" / "stage_growth.py")
    growth = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(growth)
    assert growth.main([str(tiny_run), str(tiny_run), "--limit", "1.0"]) == 0
    assert "largest stage ratio: 1.00" in capsys.readouterr().out
    slow = tmp_path / "slow"
    slow.mkdir()
    shutil.copy(tiny_run / "metrics.json", slow / "metrics.json")
    stages = json.loads((tiny_run / "stages.json").read_text())
    (slow / "stages.json").write_text(json.dumps({k: dict(v, seconds=2 * v["seconds"]) for k, v in stages.items()}))
    assert growth.main([str(tiny_run), str(slow), "--limit", "1.5"]) == 1
    assert "largest stage ratio: 2.00" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        growth.main([str(tmp_path / "none"), str(tiny_run)])
    assert exc.value.code == 2 and "not found" in capsys.readouterr().err

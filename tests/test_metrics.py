"""Metrics against brute force and hand-worked cases."""
import itertools
import math

import numpy as np
import pytest

from vesselfast.metrics import acc, ahd, auc, dsc, evaluate_images, image_metrics


def brute_mean_distance(a, b):
    pa, pb = np.argwhere(a), np.argwhere(b)
    return np.mean([min(math.dist(p, q) for q in pb) for p in pa])


def brute_auc(scores, label):
    pos, neg = scores[label.astype(bool)], scores[~label.astype(bool)]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_hand_worked_case():
    label = np.zeros((4, 4), bool); label[1, :] = True             # 4 pixels
    pred = np.zeros((4, 4), bool); pred[1, :2] = True; pred[2, 3] = True  # 2 hits + 1 false
    assert dsc(pred, label) == pytest.approx(2 * 2 / (3 + 4))
    assert acc(pred, label) == pytest.approx(13 / 16)
    # d(P->G): 0, 0, 1 ((2,3)->(1,3)) -> 1/3; d(G->P): 0, 0, 1 ((1,2)->(1,1)), 1 ((1,3)->(2,3)) -> 1/2
    assert ahd(pred, label) == pytest.approx(0.5 * (1 / 3 + 1 / 2))


@pytest.mark.parametrize("seed", range(5))
def test_ahd_and_auc_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    label = rng.random((13, 17)) > 0.8
    prob = np.clip(label * 0.3 + rng.random((13, 17)) * 0.8, 0, 1).round(2)  # rounding creates ties
    pred = prob >= 0.5
    want = 0.5 * (brute_mean_distance(pred, label) + brute_mean_distance(label, pred))
    assert ahd(pred, label) == pytest.approx(want, rel=1e-12)
    assert auc(prob, label) == pytest.approx(brute_auc(prob.ravel(), label.ravel()), rel=1e-12)


def test_auc_known_values():
    assert auc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert auc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1])) == 0.0
    assert auc(np.full(4, 0.5), np.array([0, 1, 0, 1])) == 0.5


def test_empty_cases_are_defined():
    z = np.zeros((6, 8), bool)
    one = z.copy(); one[2, 3] = True
    assert dsc(z, z) == 1.0 and ahd(z, z) == 0.0
    assert dsc(z, one) == 0.0 and dsc(one, z) == 0.0
    assert ahd(z, one) == pytest.approx(10.0) and ahd(one, z) == pytest.approx(10.0)  # diagonal of 6x8
    assert math.isnan(auc(np.random.rand(6, 8), z))
    res = evaluate_images([np.zeros((6, 8)), one * 0.9], [z, one])
    assert res["n_auc_undefined"] == 1 and res["auc"] == 1.0  # NaN skipped, counted
    assert res["dsc"] == 1.0 and res["n_images"] == 2


def test_fov_restricts_every_metric():
    label = np.zeros((8, 8), bool); label[4, 2:6] = True
    prob = label * 0.9
    prob[0, 0] = 0.95  # a false positive outside the FOV
    fov = np.ones((8, 8), bool); fov[0, :] = False
    with_fov = image_metrics(prob, label, fov)
    assert with_fov["dsc"] == 1.0 and with_fov["ahd"] == 0.0 and with_fov["auc"] == 1.0 and with_fov["acc"] == 1.0
    without = image_metrics(prob, label)
    assert without["dsc"] < 1.0 and without["ahd"] > 0.0


def test_summary_mean_and_std():
    rng = np.random.default_rng(0)
    labels = [rng.random((10, 10)) > 0.7 for _ in range(3)]
    probs = [rng.random((10, 10)) for _ in range(3)]
    res = evaluate_images(probs, labels)
    per = [dsc(p >= 0.5, g) for p, g in zip(probs, labels)]
    assert res["dsc"] == pytest.approx(np.mean(per)) and res["dsc_std"] == pytest.approx(np.std(per))
    with pytest.raises(ValueError):
        image_metrics(np.zeros((3, 3)), np.zeros((3, 4)))


def test_histogram_distance_known_values():
    from vesselfast.metrics import histogram_distance

    a = np.full((4, 4), -1.0)          # all mass in the first bin
    b = np.full((4, 4), 1.0)           # all mass in the last bin
    d = histogram_distance(a, b)
    assert d["hist_euclidean"] == pytest.approx(math.sqrt(2)) and d["hist_cosine"] == pytest.approx(1.0)
    same = histogram_distance(a, a.copy())
    assert same["hist_euclidean"] == 0 and same["hist_cosine"] == pytest.approx(0.0, abs=1e-12)
    half = np.concatenate([a, b])      # half and half against all-first-bin
    d = histogram_distance(half, a)
    assert d["hist_euclidean"] == pytest.approx(math.sqrt(0.5)) and d["hist_cosine"] == pytest.approx(1 - 0.5 / math.sqrt(0.5))

"""The per-image quality flag (export/quality.py) on synthetic probability maps with known answers."""
import cv2
import numpy as np
import pytest

from vesselfast.export.quality import measures, quality_flags, quality_summary, reference_of

THRESHOLD = 0.5


def vessel_map(seed: int, size: int = 128) -> np.ndarray:
    """A probability map like an OCTA segmentation: a jittered mesh of vessels 8 to 16 px apart over the
    whole image (no large vessel-free region), random widths, blurred edges."""
    rng = np.random.default_rng(seed)
    canvas = np.zeros((size, size), np.float32)
    for horizontal in (True, False):
        pos = 0
        while pos < size:
            pos += int(rng.integers(8, 17))
            a, b = pos + rng.integers(-4, 5, 2)
            ends = ((0, int(a)), (size - 1, int(b))) if horizontal else ((int(a), 0), (int(b), size - 1))
            cv2.line(canvas, *ends, 1.0, int(rng.integers(1, 3)))
    return np.clip(cv2.GaussianBlur(canvas, (5, 5), 1.0) * rng.uniform(0.9, 1.0), 0, 1)


@pytest.fixture(scope="module")
def maps():
    return [vessel_map(s) for s in range(24)]


@pytest.fixture(scope="module")
def reference(maps):
    return reference_of([measures(p, THRESHOLD) for p in maps], THRESHOLD, "24 synthetic maps")


def test_measures_known_answers():
    half = np.zeros((100, 100), np.float32)
    half[:, :50] = 0.9
    m = measures(half, THRESHOLD)
    assert m["marked_share"] == 0.5
    assert m["mean_confidence"] == pytest.approx(0.95)  # max(p, 1 - p): 0.9 on one half, 1 on the other
    corner = np.zeros((100, 100), np.float32)
    corner[0, 0] = 1.0
    # farther than 10 px (a tenth of the side) from one corner pixel: all but a quarter disc of radius 10
    assert measures(corner, THRESHOLD)["vessel_free"] == pytest.approx(1 - np.pi * 100 / 4 / 1e4, abs=0.01)
    assert measures(np.zeros((50, 60)), THRESHOLD)["vessel_free"] == 1.0
    with pytest.raises(ValueError):
        measures(np.zeros((2, 3, 4)), THRESHOLD)


def test_reference_percentiles(reference):
    ref = reference_of([{"marked_share": v, "mean_confidence": 1 - v, "vessel_free": v} for v in np.linspace(0, 1, 101)],
                       0.4, "linear")
    assert ref["n_images"] == 101 and ref["threshold"] == 0.4
    assert ref["marked_share"] == {"p5": 0.05, "p50": 0.5, "p95": 0.95}
    assert set(reference) >= {"marked_share", "mean_confidence", "vessel_free", "n_images", "images"}
    with pytest.raises(ValueError):
        reference_of([], 0.5, "none")


def test_image_at_the_reference_median_is_ok(maps, reference):
    shares = [measures(p, THRESHOLD)["marked_share"] for p in maps]
    median = maps[int(np.argsort(shares)[len(shares) // 2])]
    q = quality_flags(median, THRESHOLD, reference)
    assert q["quality"] == "ok" and q["quality_reason"] == ""
    assert q["marked_share"] == pytest.approx(reference["marked_share"]["p50"], rel=0.1)
    # a new map of the same kind is ok too
    assert quality_flags(vessel_map(1000), THRESHOLD, reference)["quality"] == "ok"


def test_all_vessel_and_empty_maps_are_flagged_with_the_reason(reference):
    full = quality_flags(np.ones((128, 128), np.float32), THRESHOLD, reference)
    assert full["quality"] == "check" and full["marked_share"] == 1.0
    assert "marked share 100.0 % above" in full["quality_reason"]
    empty = quality_flags(np.zeros((128, 128), np.float32), THRESHOLD, reference)
    assert empty["quality"] == "check"
    assert "marked share 0.0 % below" in empty["quality_reason"]
    assert "vessel-free area 100.0 % above" in empty["quality_reason"]
    guessing = quality_flags(np.full((128, 128), 0.45, np.float32), THRESHOLD, reference)
    assert "mean confidence 55.0 % below" in guessing["quality_reason"]


def test_a_fundus_like_map_is_flagged_for_its_vessel_free_area(maps, reference):
    """A circular field of view in a frame (dark corners) with the same vessels inside."""
    yy, xx = np.mgrid[:128, :128]
    fov = np.hypot(yy - 63.5, xx - 63.5) < 52
    q = quality_flags(maps[0] * fov, THRESHOLD, reference)
    assert q["quality"] == "check" and "vessel-free area" in q["quality_reason"]


def test_margin_floor_tolerates_ordinary_variation():
    """A reference from identical images (p5 == p95) still accepts a marked share between half and 1.5x
    its median (the margin's floor) and flags what lies beyond."""
    ref = reference_of([{"marked_share": 0.1, "mean_confidence": 0.95, "vessel_free": 1.0}] * 5, 0.5, "same")
    for rows, expect in ((6, "ok"), (14, "ok"), (4, "check"), (16, "check")):
        p = np.zeros((100, 100), np.float32)
        p[:rows] = 0.97  # ``rows`` of 100 rows marked: a marked share of rows %
        q = quality_flags(p, 0.5, ref)
        assert q["quality"] == expect, (rows, q)
        assert expect == "ok" or q["quality_reason"].startswith("marked share")


def test_without_reference_and_summary():
    q = quality_flags(np.zeros((10, 10)), 0.5, None)
    assert q["quality"] == "n/a" and "no quality reference" in q["quality_reason"]
    assert quality_summary(["a"], [q]).startswith("quality: not checked")
    ok, check = {"quality": "ok"}, {"quality": "check"}
    assert quality_summary(["a", "b", "c"], [ok, check, check]) == "quality: 1 ok, 2 to check by eye (b, c)"
    assert quality_summary(["a"], [ok]) == "quality: all 1 ok"
    assert quality_summary(list("abcde"), [check] * 5, show=2) == ("quality: 0 ok, 5 to check by eye (a, b and 3 more)")


def test_pixel_size_warning_follows_the_marked_vessel_width(maps, reference):
    """The same vessel maps shrunk x0.5 (a coarser pixel size) have thinner marked vessels: one warning
    naming the way; the maps at their own size, or a model without a width reference: none."""
    from vesselfast.export.quality import WIDTH, pixel_size_warning

    stripe = np.zeros((600, 60), np.float32)
    stripe[:, 20:26] = 1.0  # a straight vessel 6 px wide: area / skeleton length = 6 (ends shorten it ~1 %)
    assert measures(stripe, THRESHOLD)[WIDTH] == pytest.approx(6, rel=0.05)
    assert np.isnan(measures(np.zeros((20, 20)), THRESHOLD)[WIDTH])
    assert reference[WIDTH]["p5"] <= reference[WIDTH]["p50"] <= reference[WIDTH]["p95"]
    same = [measures(p, THRESHOLD)[WIDTH] for p in maps]
    assert pixel_size_warning(same, reference, 9.87) is None
    wide = [measures(cv2.resize(p, None, fx=2, fy=2), THRESHOLD)[WIDTH] for p in maps[:6]]
    thin = [measures(cv2.resize(p, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA), THRESHOLD)[WIDTH]
            for p in maps[:6]]
    warning = pixel_size_warning(thin, reference, 9.87)
    assert "thinner than on the model's training scans (9.87 um/px)" in warning and "coarser pixel size" in warning
    warning = pixel_size_warning(wide + [float("nan")], reference, None)
    assert "wider" in warning and "finer pixel size, give --pixel-size" in warning
    no_width = {k: v for k, v in reference.items() if k != WIDTH}
    assert pixel_size_warning(thin, no_width, 9.87) is None and pixel_size_warning([], reference, 9.87) is None

"""Preprocessing invariants, the preprocessing spec, calibre measure, random crops and the thick mask."""
import json

import numpy as np
import pytest
import torch
from scipy.ndimage import distance_transform_edt

from vesselfast.data import (Sample, apply_spec, preprocess_source, preprocess_target,
                             preprocessing_spec, random_crops, thick_mask)
from vesselfast.data.calibre import mean_width
from vesselfast.data.preprocess import fov_from_image


def _fundus(h=64, w=80):
    rgb = np.zeros((h, w, 3), np.uint8)
    yy, xx = np.mgrid[:h, :w]
    fov = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (0.45 * min(h, w)) ** 2
    rgb[fov] = (200, 120, 60)
    mask = np.zeros((h, w), np.uint8)
    mask[h // 2 - 1:h // 2 + 2, 10:w - 10] = 1
    mask &= fov
    rgb[mask > 0] = (170, 60, 40)            # dark vessel, darkest in green
    return rgb, mask, fov


@pytest.mark.parametrize("channel", ["green", "luminance"])
@pytest.mark.parametrize("clahe", [False, True])
def test_source_invariants(channel, clahe):
    rgb, mask, fov = _fundus()
    im, m, f = preprocess_source(rgb, mask, fov, channel=channel, clahe=clahe)
    assert im.dtype == np.float32 and im.shape == mask.shape and m.dtype == np.uint8 and f.dtype == bool
    assert im.min() >= -1.0 and im.max() <= 1.0
    assert (im[~f] == -1.0).all()                                 # outside FOV = background
    assert im[m > 0].mean() > im[(m == 0) & f].mean() + 0.1      # inverted: vessels bright
    assert np.array_equal(m, mask & f)
    assert not (f & ~fov).any() and f.sum() < fov.sum()           # FOV eroded by 3 px (its rim)
    _, m0, f0 = preprocess_source(rgb, mask, fov, channel=channel, clahe=clahe, fov_erode=0)
    assert np.array_equal(f0, fov) and np.array_equal(m0, mask)


def test_fov_rim_removed():
    rgb, mask, fov = _fundus(80, 80)
    from scipy.ndimage import distance_transform_edt as edt

    d = edt(fov)
    rgb[(d <= 2) & fov] = (90, 30, 10)                           # dark, blurred rim as in DRIVE
    im, _, f = preprocess_source(rgb, mask, fov, clahe=False)
    assert (im[(d <= 3) & fov] == -1).all() and f[d > 4].all()


def test_source_exact_map_without_clahe():
    rgb, mask, fov = _fundus()
    im, _, f = preprocess_source(rgb, mask, fov, channel="green", clahe=False)
    assert np.allclose(im[f], (255 - rgb[..., 1][f].astype(np.float32)) / 127.5 - 1, atol=1e-6)
    im, _, f = preprocess_source(rgb, mask, fov, channel="luminance", clahe=False)
    lum = np.clip(rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114 + 0.5, 0, 255).astype(np.uint8)
    assert np.allclose(im[f], (255 - lum[f].astype(np.float32)) / 127.5 - 1, atol=1e-6)


def test_target_invariants():
    g = (np.arange(50 * 60) % 256).astype(np.uint8).reshape(50, 60)
    im, m, f = preprocess_target(g, None, clahe=False)
    assert m is None and f.all() and f.shape == g.shape
    assert np.allclose(im, g / 127.5 - 1, atol=1e-6) and im.dtype == np.float32
    assert im.min() == -1.0 and im.max() == 1.0
    im2, _, _ = preprocess_target(g, None, clahe=True)
    assert im2.min() >= -1 and im2.max() <= 1 and not np.allclose(im2, im)
    rgb = np.dstack([g] * 3)
    assert np.array_equal(preprocess_target(rgb, clahe=False)[0], im)   # RGB OCTA -> luminance


def test_rescale_keeps_masks_binary_and_aligned():
    rgb, mask, fov = _fundus(100, 120)
    im, m, f = preprocess_source(rgb, mask, fov, scale=0.5, clahe=False)
    assert im.shape == m.shape == f.shape == (50, 60)
    assert set(np.unique(m)) <= {0, 1} and m.any()
    assert (im[~f] == -1).all()
    im, m, f = preprocess_target(np.full((30, 30), 7, np.uint8), np.eye(30, dtype=np.uint8), scale=1.5)
    assert im.shape == m.shape == (45, 45)


def test_spec_roundtrip_json():
    rgb, mask, fov = _fundus()
    spec = preprocessing_spec("fundus", channel="luminance", clahe=True, scale=0.5)
    spec2 = json.loads(json.dumps(spec))
    im, f = apply_spec(spec2, rgb, fov)
    ref, _, _ = preprocess_source(rgb, None, fov, channel="luminance", clahe=True, scale=0.5)
    assert np.array_equal(im, ref)
    assert preprocessing_spec("octa")["invert"] is False and preprocessing_spec("fundus")["invert"] is True
    with pytest.raises(ValueError):
        preprocessing_spec("xray")


def test_fov_from_image():
    rgb, _, fov = _fundus(80, 80)
    est = fov_from_image(rgb)
    assert (est & ~fov).sum() == 0 and est.sum() > 0.85 * fov.sum()


def test_mean_width_of_bars_and_calibre():
    from vesselfast.data.calibre import mean_calibre

    for w in (1, 3, 6):
        m = np.zeros((100, 100), bool)
        m[50:50 + w, 10:90] = True
        assert abs(mean_width(m) - w) < 0.15 * w + 0.1
    assert np.isnan(mean_width(np.zeros((5, 5), bool)))
    bars = [np.zeros((60, 60), bool) for _ in range(3)]
    bars[0][20:22, 5:55] = True
    bars[1][20:24, 5:55] = True  # widths 2 and 4; the empty map is skipped
    assert mean_calibre(bars) == pytest.approx(3.0, abs=0.35)
    assert np.isnan(mean_calibre([np.zeros((4, 4), bool)]))


# ------------------------------------------------------------------------------------------ thick mask

@pytest.mark.parametrize("radius", [1, 1.5, 2, 3])
def test_thick_mask_matches_distance_transform(radius):
    g = torch.Generator().manual_seed(0)
    m = (torch.rand(3, 1, 37, 41, generator=g) < 0.02).float()
    m[2] = 0                                            # empty sample
    w = thick_mask(m, radius)
    assert w.shape == m.shape and w.dtype == m.dtype
    for b in range(3):
        mb = m[b, 0].numpy() > 0
        ref = distance_transform_edt(~mb) <= radius if mb.any() else np.zeros_like(mb)
        assert np.array_equal(w[b, 0].numpy() > 0, ref)
    assert thick_mask(m.double(), 2).dtype == torch.float64
    assert torch.equal(thick_mask(m, 0), m)
    with pytest.raises(ValueError):
        thick_mask(m[:, 0])


def test_thick_mask_default_radius_is_two():
    m = torch.zeros(1, 1, 9, 9)
    m[0, 0, 4, 4] = 1
    w = thick_mask(m)
    assert int(w.sum()) == 13          # integer offsets with dy^2 + dx^2 <= 4


# ---------------------------------------------------------------------------------------------- crops

def _samples(n=3, h=70, w=90, labelled=True):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        img = rng.uniform(-1, 1, (h, w)).astype(np.float32)
        m = np.zeros((h, w), np.uint8)
        m[rng.integers(0, h, 5), rng.integers(0, w, 5)] = 1
        out.append(Sample(f"s{i}", img, m if labelled else None, np.ones((h, w), bool), "x"))
    return out


def test_random_crops_shapes_and_vessel_centring():
    s = _samples()
    imgs, masks, fovs = random_crops(s, 40, 16, np.random.default_rng(1), vessel_centred=0.5)
    assert imgs.shape == masks.shape == fovs.shape == (40, 1, 16, 16)
    assert imgs.dtype == np.float32 and masks.dtype == np.float32 and fovs.dtype == bool
    # vessel-centred crops hold at least one vessel pixel (sparse masks: random crops mostly do not)
    with_vessel = (masks.reshape(40, -1).max(1) > 0).sum()
    assert with_vessel >= 20
    imgs0, masks0, _ = random_crops(s, 40, 16, np.random.default_rng(1), vessel_centred=0.0)
    assert (masks0.reshape(40, -1).max(1) > 0).sum() < with_vessel
    again = random_crops(s, 40, 16, np.random.default_rng(1), vessel_centred=0.5)
    assert np.array_equal(again[0], imgs) and np.array_equal(again[1], masks)


def test_random_crops_content_matches_source():
    s = _samples(1)
    imgs, masks, _ = random_crops(s, 10, 20, np.random.default_rng(2))
    img = s[0].image
    for k in range(10):
        hits = [(y, x) for y in range(img.shape[0] - 19) for x in range(img.shape[1] - 19)
                if img[y, x] == imgs[k, 0, 0, 0] and np.array_equal(img[y:y + 20, x:x + 20], imgs[k, 0])]
        assert hits


def test_random_crops_pad_small_images_and_unlabelled():
    s = _samples(2, h=10, w=12, labelled=False)
    imgs, masks, fovs = random_crops(s, 4, 16, np.random.default_rng(0))
    assert masks is None
    assert (imgs[:, :, 10:, :] == -1).all() and (imgs[:, :, :, 12:] == -1).all()
    assert not fovs[:, :, 10:, :].any() and fovs[:, :, :10, :12].all()

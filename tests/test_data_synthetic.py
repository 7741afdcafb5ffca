"""Built-in synthetic domains: determinism, label properties, preprocessing like real fundus."""

import numpy as np
import pytest
from scipy.ndimage import binary_dilation

from vesselfast.data import builtin_domain, preprocess_source, preprocess_target
from vesselfast.data.calibre import mean_width
from vesselfast.data.synthetic import raw_pair


def test_deterministic_by_seed_and_independent_of_n():
    a = builtin_domain("source", "train", 3, 96, seed=5)
    b = builtin_domain("source", "train", 2, 96, seed=5)
    for x, y in zip(a, b):
        assert x.name == y.name
        assert np.array_equal(x.image, y.image) and np.array_equal(x.mask, y.mask)
    c = builtin_domain("source", "train", 1, 96, seed=6)
    assert not np.array_equal(a[0].image, c[0].image)
    t = builtin_domain("target", "test", 2, 96, seed=5)
    assert np.array_equal(t[0].image, builtin_domain("target", "test", 1, 96, seed=5)[0].image)
    # splits are different streams
    assert not np.array_equal(builtin_domain("target", "val", 1, 96, 5)[0].image, t[0].image)


def test_label_properties_and_comparable_calibre():
    widths = {"source": [], "target": []}
    for i in range(4):
        rgb, m, fov = raw_pair("source", "test", i, 256)
        assert rgb.dtype == np.uint8 and rgb.shape == (256, 256, 3)
        assert m.dtype == np.uint8 and set(np.unique(m)) == {0, 1}
        assert not m[~fov].any()                       # no label outside the field of view
        assert (rgb[~fov] == 0).all() and rgb[fov].mean() > 40
        assert 0.02 < m[fov].mean() < 0.2
        widths["source"].append(mean_width(m))
        # vessels are darker than their surroundings in green
        ring = binary_dilation(m > 0, iterations=3) & ~(m > 0) & fov
        assert rgb[..., 1][m > 0].mean() < rgb[..., 1][ring].mean()

        g, mo, _ = raw_pair("target", "test", i, 256)
        assert g.dtype == np.uint8 and g.shape == (256, 256)
        assert set(np.unique(mo)) == {0, 1} and 0.02 < mo.mean() < 0.25
        widths["target"].append(mean_width(mo))
        # bright vessels; a bright capillary mesh away from the labelled vessels (NOT labelled)
        far = ~binary_dilation(mo > 0, iterations=3)
        assert g[mo > 0].mean() > g[far].mean() + 60
        bright_far = (g[far] > np.percentile(g[mo > 0], 25)).mean()
        assert bright_far > 0.03, bright_far
    ws, wt = np.mean(widths["source"]), np.mean(widths["target"])
    assert 1.4 < ws < 2.4 and 1.4 < wt < 2.4 and abs(ws - wt) < 0.4, (ws, wt)


def test_builtin_domain_preprocessed_exactly_like_real_data():
    s = builtin_domain("source", "val", 2, 128, seed=3)
    for i, x in enumerate(s):
        rgb, m, fov = raw_pair("source", "val", i, 128, seed=3)
        im, mm, f = preprocess_source(rgb, m, fov)
        assert np.array_equal(x.image, im) and np.array_equal(x.mask, mm) and np.array_equal(x.fov, f)
        assert x.image.dtype == np.float32 and x.image.min() >= -1 and x.image.max() <= 1
        assert (x.image[~x.fov] == -1).all()
        assert x.modality == "fundus" and x.layout == "synthetic"
    t = builtin_domain("target", "test", 1, 128, seed=3)[0]
    g, m, _ = raw_pair("target", "test", 0, 128, seed=3)
    im, mm, f = preprocess_target(g, m)
    assert np.array_equal(t.image, im) and np.array_equal(t.mask, mm) and f.all() and t.fov.all()
    # vessels bright in both domains after preprocessing
    assert x.image[x.mask > 0].mean() > x.image[(x.mask == 0) & x.fov].mean()
    assert t.image[t.mask > 0].mean() > t.image[t.mask == 0].mean()


def test_builtin_target_train_is_unlabelled():
    tr = builtin_domain("target", "train", 2, 64, 0)
    assert all(s.mask is None for s in tr)
    assert all(s.mask is not None for s in builtin_domain("target", "test", 1, 64, 0))
    assert all(s.mask is not None for s in builtin_domain("source", "train", 1, 64, 0))


@pytest.mark.parametrize("size", [64, 200, 257])
def test_sizes(size):
    s = builtin_domain("source", "test", 1, size, 0)[0]
    t = builtin_domain("target", "test", 1, size, 0)[0]
    assert s.image.shape == t.image.shape == (size, size)
    assert s.mask.any() and t.mask.any()

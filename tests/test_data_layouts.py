"""Layout detection and reading on small fabricated trees (FIVES, HRF, STARE, ROSE-1, OCTA-500 released and
split folders, DRIVE, CHASE_DB1 split and flat, generic), and the structural guarantee that target
training labels are never listed nor opened."""
import gzip
import os
import sys

import cv2
import numpy as np
import pytest

from vesselfast.data import builtin_domain, detect_layout, load_domain
from vesselfast.data.synthetic import raw_pair
from vesselfast.errors import UserError

S = 48  # fabricated images are tiny: readers are what is tested


def _fundus(i):
    rgb, mask, fov = raw_pair("source", "train", i, 64)
    return cv2.resize(rgb, (S, S)), cv2.resize(mask, (S, S), interpolation=cv2.INTER_NEAREST), \
        cv2.resize(fov.astype(np.uint8), (S, S), interpolation=cv2.INTER_NEAREST)


def _octa(i):
    g, m, _ = raw_pair("target", "test", i, 64)
    return cv2.resize(g, (S, S)), cv2.resize(m, (S, S), interpolation=cv2.INTER_NEAREST)


def write(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if path.endswith(".gz"):
        arr = arr if arr.ndim == 3 else np.dstack([arr] * 3)   # STARE ships colour PPMs, labels too
        ok, buf = cv2.imencode(".ppm", arr[..., ::-1].copy())
        with open(path, "wb") as f:
            f.write(gzip.compress(buf.tobytes()))
        return
    if path.lower().endswith(".gif"):
        from PIL import Image

        Image.fromarray(arr).save(path)
        return
    assert cv2.imwrite(path, arr[..., ::-1] if arr.ndim == 3 else arr), path


def make_drive(root, n=2):
    for split, off in (("training", 21), ("test", 1)):
        for i in range(n):
            rgb, m, f = _fundus(i + off)
            nn = f"{i + off:02d}"
            write(f"{root}/{split}/images/{nn}_{split}.tif", rgb)
            write(f"{root}/{split}/1st_manual/{nn}_manual1.gif", m * 255)
            write(f"{root}/{split}/mask/{nn}_{split}_mask.gif", f * 255)


def make_chase(root, flat=False):
    for k in (1, 8):
        for eye in "LR":
            rgb, m, f = _fundus(k * 2 + (eye == "R"))
            name = f"Image_{k:02d}{eye}"
            if flat:
                write(f"{root}/{name}.jpg", rgb)
                write(f"{root}/{name}_1stHO.png", m * 255)
                write(f"{root}/{name}_2ndHO.png", m * 255)
            else:
                split = "training" if k <= 7 else "test"
                write(f"{root}/{split}/images/{name}.jpg", rgb)
                write(f"{root}/{split}/1st_manual/{name}_1stHO.png", m * 255)
                write(f"{root}/{split}/mask/{name}.png", f * 255)


def make_hrf(root):
    for name in ("01_dr", "01_g", "01_h"):
        rgb, m, f = _fundus(len(name))
        write(f"{root}/images/{name}.JPG", rgb)
        write(f"{root}/manual1/{name}.tif", m * 255)
        write(f"{root}/mask/{name}_mask.tif", f * 255)


def make_stare(root):
    for i in (1, 2, 3):
        rgb, m, _ = _fundus(i)
        write(f"{root}/stare-images/im{i:04d}.ppm.gz", rgb)
        if i < 3:  # STARE: not every image is labelled
            write(f"{root}/labels-ah/im{i:04d}.ah.ppm.gz", m * 255)
            write(f"{root}/labels-vk/im{i:04d}.vk.ppm.gz", m * 255)


def make_fives(root):
    for split, names in (("train", ("1_A", "2_D")), ("test", ("1_G", "2_N"))):
        for j, name in enumerate(names):
            rgb, m, _ = _fundus(j)
            write(f"{root}/{split}/Original/{name}.png", rgb)
            write(f"{root}/{split}/Ground truth/{name}.png", m * 255)


def make_octa500_split(root):
    for split, ids in (("train", (10301, 10302)), ("val", (10441,)), ("test", (10451, 10452))):
        for i in ids:
            g, m = _octa(i)
            write(f"{root}/{split}/image/{i}.bmp", g)
            write(f"{root}/{split}/label/{i}.bmp", m * 255)


def make_octa500_released(root, subset="OCTA_3mm", ids=(10301, 10302, 10441, 10451, 10452)):
    for i in ids:
        g, m = _octa(i)
        write(f"{root}/{subset}/Projection Maps/OCTA(ILM_OPL)/{i}.bmp", g)
        write(f"{root}/{subset}/Projection Maps/OCTA(FULL)/{i}.bmp", g)
        write(f"{root}/{subset}/GroundTruth/GT_LargeVessel/{i}.bmp", m * 255)


def make_rose(root):
    for split, n in (("train", 2), ("test", 1)):
        for i in range(n):
            g, m = _octa(i)
            write(f"{root}/{split}/img/{i + 1:02d}.tif", g)
            write(f"{root}/{split}/gt/{i + 1:02d}.tif", m * 255)


def make_generic(root, fundus=True, original=False, fov=True):
    imd, mkd = ("Original", "Ground_truth") if original else ("images", "masks")
    for i in range(3):
        if fundus:
            img, m, f = _fundus(i)
        else:
            (img, m), f = _octa(i), None
        write(f"{root}/{imd}/case{i}.png", img)
        write(f"{root}/{mkd}/case{i}.png", m * 255)
        if fov and f is not None and not original:
            write(f"{root}/fov/case{i}.png", f * 255)


CASES = [
    # maker, layout name, role, {split: count}
    (make_drive, "DRIVE", "source", {"train": 2, "test": 2}),
    (make_chase, "CHASE_DB1", "source", {"train": 2, "test": 2}),
    (lambda r: make_chase(r, flat=True), "CHASE_DB1 (flat original)", "source", {"train": 2, "test": 2}),
    (make_hrf, "HRF", "source", {"all": 3}),
    (make_stare, "STARE", "source", {"all": 2}),
    (make_fives, "FIVES", "source", {"train": 2, "test": 2}),
    (make_generic, "generic", "source", {"all": 3}),
    (lambda r: make_generic(r, original=True), "generic Original/Ground_truth", "source", {"all": 3}),
    (make_octa500_split, "OCTA-500 (split folders)", "target", {"train": 2, "val": 1, "test": 2}),
    (make_octa500_released, "OCTA-500 (released)", "target", {"train": 2, "val": 1, "test": 2}),
    (make_rose, "ROSE-1", "target", {"train": 2, "test": 1}),
    (lambda r: make_generic(r, fundus=False), "generic", "target", {"all": 3}),
]


@pytest.mark.parametrize("maker,name,role,counts", CASES, ids=[c[1] + "-" + c[2] for c in CASES])
def test_layout_detect_and_load(tmp_path, maker, name, role, counts):
    root = str(tmp_path / "ds")
    maker(root)
    lay = detect_layout(root)
    assert lay.name == name
    assert lay.modality == ("fundus" if role == "source" else "octa") or lay.modality is None
    for split, n in counts.items():
        labels = not (role == "target" and split in ("train", "all"))
        samples = load_domain([root], role, split, labels)
        assert len(samples) == n, (split, [s.name for s in samples])
        for s in samples:
            assert s.image.dtype == np.float32 and s.image.shape == (S, S)
            assert -1.0 <= s.image.min() and s.image.max() <= 1.0
            assert s.fov.dtype == bool and s.fov.shape == (S, S)
            if labels:
                assert s.mask is not None and s.mask.dtype == np.uint8 and set(np.unique(s.mask)) <= {0, 1}
            else:
                assert s.mask is None
            if role == "target":
                assert s.fov.all()
            else:
                assert np.all(s.image[~s.fov] == -1.0)
            if split != "all" and lay.splits:
                assert s.split == split


def test_octa500_released_official_id_splits(tmp_path):
    make_octa500_released(str(tmp_path), ids=(10301, 10440, 10441, 10450, 10451, 10500))
    lay = detect_layout(str(tmp_path))          # the OCTA-500 root holding OCTA_3mm
    assert lay.key == "OCTA-500_3M"
    got = {sp: [e.name for e in lay.entries(sp, False)] for sp in ("train", "val", "test")}
    assert got == {"train": ["10301", "10440"], "val": ["10441", "10450"], "test": ["10451", "10500"]}
    assert all(e.mask is None for e in lay.entries("all", False))
    assert all(e.mask and "GT_LargeVessel" in e.mask for e in lay.entries("test", True))


def test_octa500_root_with_both_subsets_asks_to_choose(tmp_path):
    make_octa500_released(str(tmp_path), "OCTA_3mm", ids=(10301,))
    make_octa500_released(str(tmp_path), "OCTA_6mm", ids=(10001,))
    with pytest.raises(UserError, match="OCTA_3mm, OCTA_6mm"):
        detect_layout(str(tmp_path))
    assert detect_layout(str(tmp_path / "OCTA_6mm")).key == "OCTA-500_6M"


def test_rose_root_asks_for_subset(tmp_path):
    make_rose(str(tmp_path / "SVC"))
    make_rose(str(tmp_path / "DVC"))
    with pytest.raises(UserError, match="SVC"):
        detect_layout(str(tmp_path))


def test_several_paths_make_one_domain(tmp_path):
    make_drive(str(tmp_path / "DRIVE"))
    make_chase(str(tmp_path / "CHASE_DB1"))
    s = load_domain([str(tmp_path / "DRIVE"), str(tmp_path / "CHASE_DB1")], "source", "train", True,
                    scale=[0.86, 0.40])  # one factor per folder
    assert [x.name.split("/")[0] for x in s] == ["DRIVE"] * 2 + ["CHASE_DB1"] * 2
    assert {x.layout for x in s} == {"DRIVE", "CHASE_DB1"}
    assert s[0].scale == 0.86 and s[-1].scale == 0.40
    assert s[0].image.shape == (round(S * 0.86),) * 2 and s[-1].image.shape == (round(S * 0.4),) * 2
    every = load_domain([str(tmp_path / "DRIVE")], "source", "all", True)
    assert [x.name for x in every] == ["train/21_training", "train/22_training", "test/01_test", "test/02_test"]


def test_flat_folder_is_unlabelled_target(tmp_path):
    for i in range(2):
        write(str(tmp_path / f"{i}.png"), _octa(i)[0])
    s = load_domain([str(tmp_path)], "target", "train", False)
    assert len(s) == 2 and s[0].mask is None
    with pytest.raises(UserError, match="no vessel masks"):
        load_domain([str(tmp_path)], "source", "train", True)


# -------------------------------------------------------------- target training labels are never touched

_AUDIT = {"on": False, "events": []}


def _hook(event, args):
    if _AUDIT["on"] and event in ("open", "os.listdir", "os.scandir", "os.stat"):
        _AUDIT["events"].append((event, str(args[0]) if args else ""))


sys.addaudithook(_hook)


@pytest.mark.parametrize("maker,label_dir", [
    (make_octa500_split, "label"),
    (make_octa500_released, "GroundTruth"),
    (make_rose, "gt"),
    (lambda r: make_generic(r, fundus=False), "masks"),
], ids=["OCTA-500 split", "OCTA-500 released", "ROSE-1", "generic"])
def test_target_train_labels_never_listed_nor_opened(tmp_path, maker, label_dir):
    root = str(tmp_path / "t")
    maker(root)
    _AUDIT["events"].clear()
    _AUDIT["on"] = True
    try:
        samples = load_domain([root], "target", "train", False)
        from vesselfast.data import check_paths

        check_paths([root], "target", split="train")
    finally:
        _AUDIT["on"] = False
    assert samples and all(s.mask is None for s in samples)
    touched = [p for _, p in _AUDIT["events"]]
    assert any(os.sep + "im" in p or "image" in p.lower() or "img" in p or "Projection" in p for p in touched)
    bad = [p for p in touched if (os.sep + label_dir) in p]
    assert not bad, bad


def test_target_train_refuses_read_labels(tmp_path):
    make_octa500_split(str(tmp_path))
    with pytest.raises(UserError, match="read_labels=False"):
        load_domain([str(tmp_path)], "target", "train", True)
    with pytest.raises(UserError, match="read_labels=False"):
        builtin_domain("target", "train", 1, 64, 0, read_labels=True)

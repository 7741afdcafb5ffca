"""Vessel biomarkers (vesselfast/biomarkers.py, ``vesselfast measure``, ``segment --measure``) against shapes
whose answers are known without the code under test: a straight vessel, a disc, a square and lines for the
fractal dimension, a Y and an H for branches and junctions, the unit conversion, an empty mask; then the
command end to end and its refusals (one line, exit 2, no CSV)."""
import csv
import math
import os

import cv2
import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.draw import line

from vesselfast import biomarkers as bm
from vesselfast.cli import main

from helpers import read_only_folder


def straight_vessel(width, length, shape=(64, 256), col0=28):
    """A horizontal bar ``width`` px thick and ``length`` px long."""
    m = np.zeros(shape, bool)
    top = shape[0] // 2 - width // 2
    m[top:top + width, col0:col0 + length] = True
    return m


def drawn(shape, segments, width=5):
    """Straight one-pixel lines (r0, c0, r1, c1), thickened by a width x width square."""
    m = np.zeros(shape, bool)
    for r0, c0, r1, c1 in segments:
        rr, cc = line(r0, c0, r1, c1)
        m[rr, cc] = True
    return ndi.binary_dilation(m, structure=np.ones((width, width), bool))


@pytest.mark.parametrize("width", [1, 3, 5, 9])
def test_straight_vessel(width):
    length = 200
    r = bm.measure(straight_vessel(width, length))
    assert r["vessel_area_density"] == pytest.approx(width * length / (64 * 256))
    assert r["vessel_area_px2"] == width * length
    # thinning eats about (width - 1) / 2 px at each end of the bar: the centre line is L - (w - 1) long
    assert abs(r["skeleton_length_px"] - (length - (width - 1))) <= 1.5
    if width <= 3:
        assert abs(r["skeleton_length_px"] - length) <= 2
    assert r["skeleton_density_per_px"] == pytest.approx(r["skeleton_length_px"] / (64 * 256))
    assert r["vessel_diameter_index_px"] == pytest.approx(width, rel=0.05)
    assert (r["branches"], r["junctions"]) == (1, 0)
    assert r["mean_branch_length_px"] == pytest.approx(r["skeleton_length_px"])
    assert r["mean_tortuosity"] == pytest.approx(1.0, abs=0.01)


def test_disc():
    radius, n = 60, 200
    yy, xx = np.mgrid[:n, :n]
    disc = (yy - 100) ** 2 + (xx - 100) ** 2 <= radius ** 2
    r = bm.measure(disc)
    assert r["vessel_area_density"] == pytest.approx(math.pi * radius ** 2 / n ** 2, rel=0.01)
    # a round blob thins to a single pixel: no length, no branch, so no diameter index
    assert r["skeleton_length_px"] == 0 and r["branches"] == 0
    assert math.isnan(r["vessel_diameter_index_px"])


def test_fractal_dimension_of_known_sets():
    square = np.zeros((256, 256), bool)
    square[8:248, 8:248] = True  # not aligned to the box grid
    assert bm.fractal_dimension(square) == pytest.approx(2.0, abs=0.1)
    assert bm.fractal_dimension(np.ones((256, 256), bool)) == pytest.approx(2.0, abs=1e-9)
    row = np.zeros((256, 256), bool)
    row[100, 10:250] = True
    assert bm.fractal_dimension(row) == pytest.approx(1.0, abs=0.1)
    assert bm.fractal_dimension(np.eye(256, dtype=bool)) == pytest.approx(1.0, abs=0.1)
    dot = np.zeros((64, 64), bool)
    dot[5, 7] = True
    assert bm.fractal_dimension(dot) == pytest.approx(0.0, abs=1e-9)
    assert bm.box_sizes((304, 304)) == [1, 2, 4, 8, 16, 32, 64]
    assert list(bm.box_counts(np.ones((10, 10), bool), [1, 4])) == [100, 9]  # partial edge boxes count


def test_y_junction():
    y = drawn((160, 160), [(80, 80, 10, 80), (80, 80, 140, 20), (80, 80, 140, 140)])
    r = bm.measure(y)
    assert (r["branches"], r["junctions"]) == (3, 1)
    assert r["mean_tortuosity"] == pytest.approx(1.0, abs=0.05)  # three straight arms
    # arms of ~70, ~85, ~85 px from the centre, less the few px thinning takes at the free ends
    assert 70 <= r["mean_branch_length_px"] <= 82


def test_h_has_two_junctions_and_five_branches():
    h = drawn((160, 200), [(20, 40, 140, 40), (20, 160, 140, 160), (80, 40, 80, 160)])
    r = bm.measure(h)
    assert (r["branches"], r["junctions"]) == (5, 2)


def test_tortuous_vessel():
    """A half circle of radius R. Its true tortuosity is pi R / 2 R = pi / 2 = 1.571, but skan measures
    the 8-connected pixel path (steps of 1 and sqrt 2), which over each octant of a digital circle is
    2 (sqrt 2 - 1) R long: the half circle measures 8 (sqrt 2 - 1) R, tortuosity 4 (sqrt 2 - 1) = 1.657."""
    m = np.zeros((120, 240), bool)
    t = np.linspace(0, math.pi, 2000)
    m[np.round(100 - 80 * np.sin(t)).astype(int), np.round(120 + 80 * np.cos(t)).astype(int)] = True
    r = bm.measure(ndi.binary_dilation(m, iterations=1))
    assert r["branches"] == 1
    assert r["mean_tortuosity"] == pytest.approx(4 * (math.sqrt(2) - 1), rel=0.02)


def test_oblique_straight_vessel_reads_the_pixel_path_length():
    """A straight line of slope 1/2: each 2-px run is one diagonal and one axial step, 1 + sqrt 2 long
    against sqrt 5, so skan's length (and the tortuosity) reads (1 + sqrt 2) / sqrt 5 = 1.080."""
    m = np.zeros((120, 240), bool)
    rr, cc = line(10, 10, 110, 210)
    m[rr, cc] = True
    r = bm.measure(m)
    assert r["branches"] == 1
    assert r["mean_tortuosity"] == pytest.approx((1 + math.sqrt(2)) / math.sqrt(5), rel=0.01)


def test_units_with_pixel_size():
    mask = drawn((160, 160), [(80, 80, 10, 80), (80, 80, 140, 20), (80, 80, 140, 140)])
    px, um = bm.measure(mask), bm.measure(mask, pixel_size_um=10.0)
    assert um["pixel_size_um"] == 10.0
    assert um["skeleton_length_mm"] == pytest.approx(px["skeleton_length_px"] * 0.01)
    assert um["mean_branch_length_um"] == pytest.approx(px["mean_branch_length_px"] * 10)
    assert um["vessel_diameter_index_um"] == pytest.approx(px["vessel_diameter_index_px"] * 10)
    assert um["vessel_area_mm2"] == pytest.approx(px["vessel_area_px2"] * 1e-4)
    # mm of skeleton per mm^2 of image: (L * 0.01) / (A * 1e-4) = 100 x (L / A)
    assert um["skeleton_density_per_mm"] == pytest.approx(px["skeleton_density_per_px"] * 100)
    for key in ("vessel_area_density", "fractal_dimension", "branches", "junctions", "mean_tortuosity"):
        assert um[key] == px[key]
    assert not any(k.endswith("_px") and k not in ("height_px", "width_px") for k in um)
    with pytest.raises(ValueError):
        bm.measure(mask, pixel_size_um=0.0)


def test_empty_mask():
    r = bm.measure(np.zeros((50, 60), bool), pixel_size_um=10.0)
    zeros = ("vessel_area_density", "vessel_area_mm2", "skeleton_length_mm", "skeleton_density_per_mm",
             "branches", "junctions")
    assert all(r[k] == 0 for k in zeros)
    undefined = ("vessel_diameter_index_um", "fractal_dimension", "mean_branch_length_um", "mean_tortuosity")
    assert all(math.isnan(r[k]) for k in undefined)


# ---- the command ------------------------------------------------------------------------------------------

@pytest.fixture
def mask_folder(tmp_path):
    """Five masks: 8-bit PNG 0/255, BMP 0/255, 16-bit PNGs 0/1 (one empty), a 16-bit TIFF 0/65535, and a
    file that is not an image (skipped)."""
    folder = tmp_path / "masks"
    folder.mkdir()
    y = drawn((96, 96), [(48, 48, 5, 48), (48, 48, 90, 10), (48, 48, 90, 86)], width=3)
    bar = straight_vessel(3, 60, shape=(40, 80), col0=10)
    cv2.imwrite(str(folder / "a_y.png"), y.astype(np.uint8) * 255)
    cv2.imwrite(str(folder / "b_bar.bmp"), bar.astype(np.uint8) * 255)
    cv2.imwrite(str(folder / "c_empty16.png"), np.zeros((32, 32), np.uint16))
    cv2.imwrite(str(folder / "d_bar16.png"), bar.astype(np.uint16))
    cv2.imwrite(str(folder / "e_y16.tif"), y.astype(np.uint16) * 65535)
    (folder / "notes.txt").write_text("not an image")
    return folder, {"a_y.png": y, "b_bar.bmp": bar, "c_empty16.png": np.zeros((32, 32), bool),
                    "d_bar16.png": bar, "e_y16.tif": y}


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_measure_command_writes_one_row_per_mask(mask_folder, tmp_path, capsys):
    folder, masks = mask_folder
    out = tmp_path / "bio.csv"
    assert main(["measure", str(folder), "--pixel-size", "10", "--csv", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "5 masks" in printed and "skeleton_density_per_mm" in printed
    rows = _read_csv(out)
    assert list(rows[0]) == ["image", "height_px", "width_px", "pixel_size_um", "vessel_area_density",
                             "vessel_area_mm2", "skeleton_length_mm", "skeleton_density_per_mm",
                             "vessel_diameter_index_um", "fractal_dimension", "branches", "junctions",
                             "mean_branch_length_um", "mean_tortuosity"]
    assert [os.path.basename(r["image"]) for r in rows] == sorted(masks)
    for row in rows:
        want = bm.measure(masks[os.path.basename(row["image"])], 10.0)
        for key, value in want.items():
            if isinstance(value, float) and math.isnan(value):
                assert row[key] == ""  # undefined -> empty cell
            else:
                assert float(row[key]) == pytest.approx(value, rel=1e-5)
    assert rows[1]["branches"] == "1" and rows[0]["junctions"] == "1"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    px = tmp_path / "px.csv"
    assert main(["measure", str(folder / "a_y.png"), "--csv", str(px)]) == 0
    header = list(_read_csv(px)[0])
    assert "skeleton_density_per_px" in header and "mean_branch_length_px" in header
    assert "pixel_size_um" not in header


@pytest.mark.parametrize("case", ["missing", "unreadable", "not_binary", "pixel_size_zero", "pixel_size_negative",
                                  "pixel_size_nan", "csv_is_folder", "csv_folder_missing", "csv_read_only"])
def test_measure_refusals(case, mask_folder, tmp_path, capsys, monkeypatch):
    folder, _ = mask_folder
    out = tmp_path / "bio.csv"
    inputs, extra = [str(folder)], []
    if case == "missing":
        inputs, expect = [str(folder / "a_y.png"), str(tmp_path / "gone.png")], "gone.png: no such file"
    elif case == "unreadable":
        (folder / "z_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        expect = "z_broken.png: cannot decode image"
    elif case == "not_binary":
        rng = np.random.default_rng(0)
        cv2.imwrite(str(folder / "z_scan.png"), rng.integers(0, 256, (64, 64), dtype=np.uint8))
        expect = "z_scan.png: vessel mask is not binary"
    elif case.startswith("pixel_size"):
        value = {"pixel_size_zero": "0", "pixel_size_negative": "-9.87", "pixel_size_nan": "nan"}[case]
        extra, expect = ["--pixel-size", value], "--pixel-size"
    elif case == "csv_is_folder":
        out, expect = tmp_path, "is a folder; give a file name"
    elif case == "csv_folder_missing":
        out, expect = tmp_path / "no" / "bio.csv", "does not exist; create it"
    else:
        out, expect = read_only_folder(tmp_path / "ro", monkeypatch) / "bio.csv", "is not writable"
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(["measure", *inputs, *extra, "--csv", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("vesselfast: error: ") and expect in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no CSV, no temp file


def test_failed_measure_keeps_the_previous_csv(mask_folder, tmp_path):
    folder, _ = mask_folder
    out = tmp_path / "bio.csv"
    out.write_text("previous\n")
    (folder / "z_broken.bmp").write_bytes(b"BM garbage")
    assert main(["measure", str(folder), "--csv", str(out)]) == 2
    assert out.read_text() == "previous\n"


def test_segment_measure_writes_the_csv_beside_the_masks(tmp_path, capsys):
    """An untrained segmenter checkpoint (random weights: no training) is enough to check the wiring."""
    import torch

    from vesselfast.checkpoint import save_checkpoint
    from vesselfast.data import preprocessing_spec
    from vesselfast.models import SegmenterUNet

    torch.manual_seed(0)
    ck = tmp_path / "segmenter_1.pt"
    save_checkpoint(ck, {"kind": "segmenter_1", "channels": [4, 8], "model": SegmenterUNet(1, (4, 8)).state_dict(),
                         "preprocessing": preprocessing_spec("octa"), "tile": 32, "stride": 16, "threshold": 0.5})
    scans = tmp_path / "scans"
    scans.mkdir()
    rng = np.random.default_rng(1)
    for name in ("s1.png", "s2.bmp"):
        cv2.imwrite(str(scans / name), rng.integers(0, 256, (48, 40), dtype=np.uint8))
    out = tmp_path / "out"
    assert main(["segment", "--model", str(ck), str(scans), "--out", str(out), "--measure",
                 "--pixel-size", "9.87", "--precision", "fp32"]) == 0
    rows = _read_csv(out / "biomarkers.csv")
    assert [os.path.basename(r["image"]) for r in rows] == ["s1_mask.png", "s2_mask.png"]
    mask = cv2.imread(str(out / "s1_mask.png"), cv2.IMREAD_GRAYSCALE) > 0
    assert float(rows[0]["vessel_area_density"]) == pytest.approx(mask.mean(), rel=1e-5)
    assert rows[0]["pixel_size_um"] == "9.87"
    capsys.readouterr()
    assert main(["segment", "--model", str(ck), str(scans), "--out", str(tmp_path / "o2"), "--measure",
                 "--pixel-size", "-1"]) == 2
    assert "--pixel-size -1" in capsys.readouterr().err and not (tmp_path / "o2").exists()

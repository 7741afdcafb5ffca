"""Readers on the real copies in ../shared/data (skipped when absent): DRIVE, CHASE_DB1, OCTA-500 3M."""
import numpy as np
import pytest

from vesselfast.data import check_paths, detect_layout, load_domain

pytestmark = pytest.mark.real_data


def test_drive(shared_data):
    root = str(shared_data / "fundus" / "DRIVE")
    lay = detect_layout(root)
    assert (lay.name, lay.key, lay.modality, lay.splits) == ("DRIVE", "DRIVE", "fundus", ("train", "test"))
    ents = lay.entries("all", True)
    assert len(ents) == 40 and all(e.mask and e.fov for e in ents)
    assert ents[0].mask.endswith("21_manual1.gif") and ents[0].fov.endswith("21_training_mask.gif")
    s = load_domain([root], "source", "train", True)[:2]
    assert s[0].image.shape == (584, 565) and s[0].mask.shape == (584, 565)
    assert set(np.unique(s[0].mask)) == {0, 1} and (s[0].image[~s[0].fov] == -1).all()
    assert s[0].image[s[0].mask > 0].mean() > s[0].image[(s[0].mask == 0) & s[0].fov].mean()  # inverted


def test_chase_db1_scaled(shared_data):
    root = str(shared_data / "fundus" / "CHASE_DB1")
    lay = detect_layout(root)
    assert lay.name == "CHASE_DB1" and lay.splits == ("train", "test")
    assert len(lay.entries("train", True)) == 14 and len(lay.entries("test", True)) == 14
    e = lay.entries("train", True)[0]
    assert e.mask.endswith("Image_01L_1stHO.png") and e.fov.endswith("mask/Image_01L.png")


def test_octa500_split_folders(shared_data):
    root = str(shared_data / "octa" / "OCTA-500_3M")
    lay = detect_layout(root)
    assert lay.name == "OCTA-500 (split folders)" and lay.key == "OCTA-500_3M" and lay.modality == "octa"
    assert [len(lay.entries(sp, False)) for sp in ("train", "val", "test")] == [140, 10, 50]
    names = [e.name for e in lay.entries("train", False)]
    assert names[0] == "10301" and names[-1] == "10440"
    t = load_domain([root], "target", "val", True)
    assert len(t) == 10 and t[0].image.shape == (304, 304) and t[0].fov.all() and t[0].mask.any()


def test_combined_source_and_checks(shared_data):
    drive, chase = str(shared_data / "fundus" / "DRIVE"), str(shared_data / "fundus" / "CHASE_DB1")
    rep = check_paths([drive, chase], "source", split="test")
    assert rep["total_images"] == 34
    assert [p["layout"] for p in rep["paths"]] == ["DRIVE", "CHASE_DB1"]
    d = rep["paths"][0]["splits"]["test"]
    assert d["sizes"] == {"565x584": 20} and 0.05 < d["vessel_fraction"]["mean"] < 0.2
    # calibre (area / skeleton length, first labelled images): CHASE_DB1's vessels about twice as wide as DRIVE's
    drive_px, chase_px = rep["paths"][0]["calibre_px"], rep["paths"][1]["calibre_px"]
    assert 2.2 < drive_px < 3.3 and 1.6 < chase_px / drive_px < 2.5
    octa = str(shared_data / "octa" / "OCTA-500_3M")
    rep = check_paths([octa], "target", split="train")
    assert rep["total_images"] == 140 and rep["paths"][0]["splits"]["train"]["labels_read"] is False

"""Validation: each class of bad input gives one clear line (UserError; exit code 2 from the CLI), and
``vesselfast data synth|check`` end to end."""
import json
import os

import cv2
import numpy as np
import pytest
from helpers import generic, octa_split, write_image

from vesselfast.cli import main
from vesselfast.data import check_paths, load_domain
from vesselfast.data.io import read_mask
from vesselfast.data.synthetic import raw_pair
from vesselfast.errors import UserError


def _cli_error(capsys, argv, match):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("vesselfast: error: "), err
    assert match in err, err
    return err


def test_good_generic_report(tmp_path):
    root = generic(tmp_path / "g", fov=True)
    rep = check_paths([str(root)], "source")
    p = rep["paths"][0]
    assert rep["total_images"] == 2 and p["layout"] == "generic" and p["modality"] == "fundus"
    d = p["splits"]["all"]
    assert d["images"] == 2 and d["labels"] == 2 and d["sizes"] == {"40x40": 2}
    assert 0.0 < d["vessel_fraction"]["mean"] < 0.5
    assert p["calibre_px"] > 0
    json.dumps(rep)


def test_missing_path(tmp_path, capsys):
    with pytest.raises(UserError, match="no such folder"):
        check_paths([str(tmp_path / "nope")], "source")
    _cli_error(capsys, ["data", "check", str(tmp_path / "nope")], "no such folder")


def test_empty_folder(tmp_path, capsys):
    (tmp_path / "e").mkdir()
    _cli_error(capsys, ["data", "check", str(tmp_path / "e"), "--role", "source"], "folder is empty")
    (tmp_path / "e2" / "images").mkdir(parents=True)
    (tmp_path / "e2" / "masks").mkdir()
    with pytest.raises(UserError, match="no images"):
        check_paths([str(tmp_path / "e2")], "source")


def test_unknown_layout_lists_layouts_tried(tmp_path, capsys):
    (tmp_path / "u" / "stuff").mkdir(parents=True)
    (tmp_path / "u" / "notes.txt").write_text("hello")
    err = _cli_error(capsys, ["data", "check", str(tmp_path / "u"), "--role", "source"], "unknown layout")
    for name in ("DRIVE", "CHASE_DB1", "HRF", "STARE", "FIVES", "OCTA-500", "ROSE-1", "generic"):
        assert name in err


def test_corrupt_image(tmp_path, capsys):
    root = generic(tmp_path / "g")
    (root / "images" / "c1.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    _cli_error(capsys, ["data", "check", str(root), "--role", "source"], "c1.png: cannot decode image")
    with pytest.raises(UserError, match="c1.png"):
        load_domain([str(root)], "source", "train", True)
    (root / "images" / "c1.png").write_bytes(b"")
    rep = check_paths([str(root)], "source")  # the report lists the problem; the CLI turns it into exit 2
    assert len(rep["problems"]) == 1 and "c1.png: empty file" in rep["problems"][0]


def test_every_problem_is_reported(tmp_path, capsys):
    """One checker for loading and for `data check`: it goes through every entry; training names the
    first problem and how many more there are, `data check` lists them all (nnU-Net style)."""
    root = generic(tmp_path / "g", n=4)
    (root / "images" / "c1.png").write_bytes(b"")
    write_image(root / "masks" / "c2.png", np.zeros((30, 40), np.uint8))
    (root / "images" / "c3.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    assert main(["data", "check", str(root), "--role", "source"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "vesselfast: error: 3 problems; fix each and check again:"
    assert "c1.png: empty file" in err[1] and "same size" in err[2] and "c3.png: cannot decode" in err[3]
    with pytest.raises(UserError) as exc:
        load_domain([str(root)], "source", "train", True)
    msg = str(exc.value)
    assert "\n" not in msg and "c1.png: empty file" in msg and "and 2 more problem(s)" in msg
    assert f"vesselfast data check {root}" in msg


def test_mask_missing(tmp_path, capsys):
    root = generic(tmp_path / "g")
    os.remove(root / "masks" / "c1.png")
    _cli_error(capsys, ["data", "check", str(root), "--role", "source"], "c1.png: no vessel mask found")


def test_size_mismatch(tmp_path, capsys):
    root = generic(tmp_path / "g")
    write_image(root / "masks" / "c0.png", np.zeros((30, 40), np.uint8))
    err = _cli_error(capsys, ["data", "check", str(root), "--role", "source"], "40x30")
    assert "c0.png" in err and "same size" in err
    with pytest.raises(UserError, match="same size"):
        load_domain([str(root)], "source", "train", True)


def test_non_binary_masks(tmp_path, capsys):
    root = generic(tmp_path / "g")
    m = cv2.imread(str(root / "masks" / "c0.png"), 0)
    soft = cv2.GaussianBlur(m, (3, 3), 0.5)              # anti-aliased edges: thresholded, with a note
    soft[soft == 0] = 3                                  # and a background that is not quite black (JPEG)
    write_image(root / "masks" / "c0.png", soft)
    rep = check_paths([str(root)], "source")
    assert any("thresholded at 128" in n for n in rep["paths"][0]["notes"])
    # thresholded at 128, not at 0: the near-black background stays background, the vessels come back whole
    assert np.array_equal(read_mask(str(root / "masks" / "c0.png")), m > 0)
    grey = (np.arange(40 * 40).reshape(40, 40) % 256).astype(np.uint8)   # an image, not a mask: refused
    write_image(root / "masks" / "c1.png", grey)
    _cli_error(capsys, ["data", "check", str(root), "--role", "source"], "is not binary")


def test_duplicate_stems(tmp_path, capsys):
    root = generic(tmp_path / "g")
    rgb = cv2.imread(str(root / "images" / "c0.png"))
    write_image(root / "images" / "c0.jpg", rgb)
    _cli_error(capsys, ["data", "check", str(root), "--role", "source"], "duplicate image stem 'c0'")


def test_same_folder_twice(tmp_path, capsys):
    root = generic(tmp_path / "g")
    _cli_error(capsys, ["data", "check", str(root), str(root) + "/", "--role", "source"], "passed twice")


def test_target_folder_containing_labels(tmp_path, capsys):
    # labels mixed into the target image folder
    root = octa_split(tmp_path / "o")
    g, m, _ = raw_pair("target", "test", 0, 48)
    write_image(root / "train" / "image" / "train0_label.png", m * 255)
    _cli_error(capsys, ["data", "check", str(root), "--role", "target"], "looks like a label file")
    with pytest.raises(UserError, match="looks like a label"):
        load_domain([str(root)], "target", "train", False)
    # the label folder passed as the target image folder: every file is named
    assert main(["data", "check", str(root / "test" / "label"), "--role", "target"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "vesselfast: error: 2 problems; fix each and check again:"
    assert all("looks like a vessel label" in line for line in err[1:]) and len(err) == 3
    with pytest.raises(UserError, match="looks like a vessel label"):
        load_domain([str(root / "test" / "label")], "target", "train", False)


def test_target_check_reads_only_test_labels(tmp_path):
    root = octa_split(tmp_path / "o")
    os.remove(root / "train" / "label" / "train0.png")   # a missing train label must not matter
    rep = check_paths([str(root)], "target")
    sp = rep["paths"][0]["splits"]
    assert sp["train"]["labels_read"] is False and sp["train"]["labels"] is None
    assert sp["test"]["labels_read"] is True and sp["test"]["labels"] == 2
    os.remove(root / "test" / "label" / "test0.png")
    with pytest.raises(UserError, match="no vessel mask found"):
        check_paths([str(root)], "target")
    check_paths([str(root)], "target", split="train")


def test_cli_check_json_and_role_inference(tmp_path, capsys):
    root = octa_split(tmp_path / "o")
    assert main(["data", "check", str(root), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["role"] == "target" and rep["paths"][0]["layout"] == "OCTA-500 (split folders)"


def test_cli_synth_then_check(tmp_path, capsys):
    out = tmp_path / "syn"
    assert main(["data", "synth", "--out", str(out), "--n", "4", "--size", "64", "--seed", "1"]) == 0
    capsys.readouterr()
    assert sorted(os.listdir(out / "source" / "train")) == ["fov", "images", "masks"]
    assert sorted(os.listdir(out / "target" / "train")) == ["images"]          # unlabelled, as real target data
    assert sorted(os.listdir(out / "target" / "test")) == ["images", "masks"]
    assert len(os.listdir(out / "source" / "train" / "images")) == 4
    assert len(os.listdir(out / "target" / "val" / "images")) == 1
    assert main(["data", "check", str(out / "source")]) == 0
    assert "generic (fundus, role source)" in capsys.readouterr().out
    assert main(["data", "check", str(out / "target")]) == 0
    assert "generic (octa, role target)" in capsys.readouterr().out
    # refuses to overwrite
    _cli_error(capsys, ["data", "synth", "--out", str(out), "--n", "1", "--size", "64"], "already exists")
    # deterministic: a second run with the same seed writes identical files
    out2 = tmp_path / "syn2"
    assert main(["data", "synth", "--out", str(out2), "--n", "4", "--size", "64", "--seed", "1"]) == 0
    a = cv2.imread(str(out / "target" / "test" / "images" / "0000.png"), cv2.IMREAD_UNCHANGED)
    b = cv2.imread(str(out2 / "target" / "test" / "images" / "0000.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(a, b)


def test_cli_synth_nothing_half_written(tmp_path, capsys, monkeypatch):
    import vesselfast.commands.data as cmd

    real = cmd._write
    calls = {"n": 0}

    def failing(path, arr):
        calls["n"] += 1
        if calls["n"] == 5:
            raise UserError(f"{path}: could not write the file; check the disk and permissions")
        real(path, arr)

    monkeypatch.setattr(cmd, "_write", failing)
    _cli_error(capsys, ["data", "synth", "--out", str(tmp_path / "syn"), "--n", "2", "--size", "64"], "could not write")
    assert os.listdir(tmp_path) == []   # neither the output nor a temporary folder is left
    _cli_error(capsys, ["data", "synth", "--out", str(tmp_path / "x"), "--size", "8"], "--size 8")
    _cli_error(capsys, ["data", "synth", "--out", str(tmp_path / "no" / "x")], "does not exist")

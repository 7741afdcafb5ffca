"""``vesselfast segment``: overlays, unique output names, the refusals that run before any work (output
folder, tile/stride, image size, pixel size), one line for what OpenCV and Pillow say, and rescaling to
the model's pixel size (``--pixel-size`` / ``--fov-mm``). The model is the session's tiny run."""
import csv
import os
import warnings

import cv2
import numpy as np
import pytest

from vesselfast.cli import main
from vesselfast.data.synthetic import raw_pair
from vesselfast.export import Segmenter
from vesselfast.export import files as F

from helpers import read_only_folder

MODEL_PX = 10.0  # the pixel size given to the tiny model where a test needs one


def scan(h=64, w=96, i=0):
    """A synthetic OCTA scan, uint8 [h, w] (not square: width and height must not be swapped)."""
    g, _, _ = raw_pair("target", "test", i, max(h, w))
    return np.ascontiguousarray(g[:h, :w])


def write(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), arr)
    return path


def segment(*argv):
    return main(["segment", *map(str, argv)])


def one_error_line(err, expect):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vesselfast: error: ") and expect in lines[0], err
    return lines[0]


@pytest.fixture
def model_px(monkeypatch):
    """Segmenter.load gives models the pixel size ``MODEL_PX`` (``set(None)``: none), as if their metadata had it."""
    state = {"px": MODEL_PX}
    load = Segmenter.load.__func__

    def with_px(cls, *a, **k):
        seg = load(cls, *a, **k)
        seg.meta.pop("pixel_size_um", None)
        if state["px"]:
            seg.meta["pixel_size_um"] = state["px"]
        return seg

    monkeypatch.setattr(Segmenter, "load", classmethod(with_px))
    return lambda px: state.update(px=px)


# -- overlay ---------------------------------------------------------------------------------------------

def test_overlay_is_the_scan_with_the_mask_in_red(tiny_run, tmp_path, capsys):
    grey = scan()
    rgb = np.dstack([grey, grey // 2, 255 - grey])  # a colour scan stays in colour
    write(tmp_path / "in" / "g.png", grey)
    write(tmp_path / "in" / "c.png", rgb[..., ::-1])  # OpenCV writes BGR
    out = tmp_path / "out"
    assert segment("--model", tiny_run, tmp_path / "in", "--out", out, "--overlay", "--precision", "fp32") == 0
    assert "wrote 2 probability maps, masks and overlays" in capsys.readouterr().out
    for name, want in (("g", np.dstack([grey] * 3)), ("c", rgb)):
        over = cv2.imread(str(out / f"{name}_overlay.png"), cv2.IMREAD_COLOR)[..., ::-1]
        mask = cv2.imread(str(out / f"{name}_mask.png"), cv2.IMREAD_GRAYSCALE) > 0
        assert over.shape == want.shape and 0 < mask.mean() < 1
        assert np.array_equal(over[~mask], want[~mask])  # the scan as given where there is no vessel
        expect = np.round(0.4 * want[mask] + 0.6 * np.array(F.OVERLAY_RGB, np.float32))
        assert np.abs(over[mask].astype(int) - expect).max() <= 1  # blended towards red where there is
    assert not (tmp_path / "o2").exists()
    assert segment("--model", tiny_run, tmp_path / "in", "--out", tmp_path / "o2") == 0
    assert not list((tmp_path / "o2").glob("*_overlay.png"))  # only with --overlay


# -- output names ----------------------------------------------------------------------------------------

def test_output_names_are_unique():
    P = [F.Path(p) for p in ("/d/a/x.png", "/d/b/x.png", "/d/a/y.bmp", "/d/a/y.jpg", "/d/z.png", "/d/a_x.png",
                             "/d/a/Z.tif", "/d/a/im.ppm.gz")]
    names = F.output_names(P)
    assert names == ["a_x_2", "b_x", "y_bmp", "y_jpg", "z", "a_x", "a_Z", "im"]
    assert len({n.casefold() for n in names}) == len(names)
    assert F.output_names([F.Path("/d/a/x.png"), F.Path("/d/b/y.png")]) == ["x", "y"]  # no clash: stems


def test_same_stem_inputs_get_their_own_outputs_and_the_true_count(tiny_run, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    write(a / "x.bmp", scan(i=0))
    write(a / "x.png", scan(i=1))
    write(b / "x.png", scan(i=2))
    out = tmp_path / "out"
    assert segment("--model", tiny_run, a, b, a / "x.bmp", "--out", out) == 0  # a/x.bmp twice
    captured = capsys.readouterr()
    assert "; 3 images" in captured.out and "wrote 3 probability maps and masks" in captured.out
    assert "1 input(s) repeat a file" in captured.err and "3 inputs share a file name" in captured.err
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{n}_{k}.png" for n in ("a_x_bmp", "a_x_png", "b_x")
                                                           for k in ("prob", "mask")] + [F.SUMMARY_NAME])
    # one row per input in segment.csv, each naming its input and its output name
    import csv
    rows = list(csv.DictReader((out / F.SUMMARY_NAME).open()))
    assert sorted((r["name"], F.Path(r["image"]).name) for r in rows) == [("a_x_bmp", "x.bmp"), ("a_x_png", "x.png"),
                                                                           ("b_x", "x.png")]
    assert all(r["width_px"] == "96" and r["height_px"] == "64" and r["rescale"] == "1" for r in rows)
    # a run directory's checkpoint carries no quality reference: measures written, the flag says n/a
    assert all(r["quality"] == "n/a" and 0 <= float(r["marked_share"]) <= 1 for r in rows)
    assert "quality: not checked (the model has no quality reference" in captured.out


# -- refusals before any work ----------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["out_is_file", "out_under_file", "out_read_only"])
def test_unwritable_out_is_refused_before_the_model_loads(case, tmp_path, capsys, monkeypatch):
    img = write(tmp_path / "in" / "s.png", scan())
    out = tmp_path / "out"
    if case == "out_is_file":
        out.write_text("x")
        expect = "is a file, not a folder"
    elif case == "out_under_file":
        (tmp_path / "f").write_text("x")
        out, expect = tmp_path / "f" / "masks", "is a file, so the folder cannot be created"
    else:
        read_only_folder(out, monkeypatch)
        expect = "is not writable"
    before = sorted(p.name for p in tmp_path.rglob("*"))
    # the model does not exist: the refusal must come first
    assert segment("--model", tmp_path / "none.onnx", img, "--out", out / "sub" if case == "out_read_only" else out) == 2
    one_error_line(capsys.readouterr().err, expect)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("extra,expect", [  # all but the last are refused before the model loads
    (["--tile", "0"], "--tile 0: the sliding window needs at least 16 px"),
    (["--tile", "-64"], "--tile -64: the sliding window needs at least 16"),
    (["--tile", "8"], "--tile 8: the sliding window needs at least 16"),
    (["--stride", "0"], "--stride 0: use 1..tile"),
    (["--stride", "-3"], "--stride -3: use 1..tile"),
    (["--max-pixels", "0"], "--max-pixels 0"),
    (["--pixel-size", "0"], "--pixel-size 0"),
    (["--pixel-size", "-9.87"], "--pixel-size -9.87"),
    (["--pixel-size", "nan"], "--pixel-size nan"),
    (["--fov-mm", "0"], "--fov-mm 0: give the scans' field of view width in millimetres"),
    (["--fov-mm", "-3"], "--fov-mm -3"),
    (["--fov-mm", "3", "--pixel-size", "9.87"], "--pixel-size and --fov-mm both given"),
    (["--tile", "32", "--stride", "33"], "--stride 33: use 1..tile (32)"),
])
def test_bad_options_are_one_line(extra, expect, tmp_path, capsys, request):
    model = request.getfixturevalue("tiny_run") if "33" in extra else tmp_path / "none.onnx"
    img = write(tmp_path / "s.png", scan())
    out = tmp_path / "out"
    assert segment("--model", model, img, "--out", out, *extra) == 2
    one_error_line(capsys.readouterr().err, expect)
    assert not out.exists()


def test_first_line_names_the_window_used(tiny_run, tmp_path, capsys):
    img = write(tmp_path / "s.png", scan())
    assert segment("--model", tiny_run, img, "--out", tmp_path / "a") == 0
    assert "tile 64, stride 32;" in capsys.readouterr().out  # the model's
    assert segment("--model", tiny_run, img, "--out", tmp_path / "b", "--tile", "32", "--stride", "8") == 0
    assert "tile 32, stride 8;" in capsys.readouterr().out
    assert segment("--model", tiny_run, img, "--out", tmp_path / "c", "--tile", "128") == 0
    assert "tile 128, stride 64;" in capsys.readouterr().out  # the model's overlap, half a tile


def test_image_above_max_pixels_is_refused_before_it_is_decoded(tiny_run, tmp_path, capsys, monkeypatch):
    from vesselfast.data import io

    small, big = write(tmp_path / "in" / "a.png", scan(40, 40)), write(tmp_path / "in" / "b.png", scan(64, 96))
    read = io.read_image
    monkeypatch.setattr(io, "read_image", lambda p, *a: read(p, *a) if p != str(big) else pytest.fail("decoded"))
    out = tmp_path / "out"
    assert segment("--model", tiny_run, small, big, "--out", out, "--max-pixels", "5000") == 2
    line = one_error_line(capsys.readouterr().err, "b.png: 96 x 64 px is more than --max-pixels 5000")
    assert "--max-pixels 6144" in line and not out.exists()
    monkeypatch.setattr(io, "read_image", read)
    assert segment("--model", tiny_run, big, "--out", out, "--max-pixels", "6144") == 0


def test_opencv_messages_become_one_line(tiny_run, tmp_path, capfd):
    """libpng / OpenCV write to file descriptor 2 themselves; capfd sees what a terminal would."""
    good = write(tmp_path / "in" / "ok.png", scan())
    ok, buf = cv2.imencode(".png", scan())
    data = bytearray(buf.tobytes())
    data[60] ^= 0xFF  # a CRC error in the image data: Pillow refuses, OpenCV's libpng prints and refuses
    bad = tmp_path / "in" / "crc.png"
    bad.write_bytes(bytes(data))
    out = tmp_path / "out"
    assert segment("--model", tiny_run, good, bad, "--out", out) == 2
    one_error_line(capfd.readouterr().err, "crc.png: cannot decode image")
    assert not out.exists()


def test_a_file_opencv_decodes_with_complaints_gives_one_warning(tiny_run, tmp_path, capfd, monkeypatch):
    odd = tmp_path / "odd.png"
    odd.write_bytes(b"\x89PNG\r\n\x1a\n not really")  # Pillow refuses it; the stand-in OpenCV decodes it
    image = scan()

    def imdecode(buf, flags):
        os.write(2, b"[ WARN:0@1.5] global loadsave.cpp:1000 imdecode_ odd chunk\nlibpng warning: iCCP: bad\n")
        return image

    monkeypatch.setattr(cv2, "imdecode", imdecode)
    assert segment("--model", tiny_run, odd, "--out", tmp_path / "out") == 0
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vesselfast: warning: ") and "imdecode_ odd chunk" in err[0], err
    assert "WARN:0" not in err[0] and (tmp_path / "out" / "odd_mask.png").exists()


def test_no_decompression_bomb_warning(tiny_run, tmp_path, capsys, monkeypatch):
    from PIL import Image

    img = write(tmp_path / "s.png", scan())  # 6144 px: above Pillow's limit below, under its error level
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert segment("--model", tiny_run, img, "--out", tmp_path / "out") == 0
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]
    assert capsys.readouterr().err == ""


# -- rescaling to the model's pixel size -----------------------------------------------------------------

def test_pixel_size_equal_to_the_models_is_a_no_op(tiny_run, tmp_path, capsys, model_px):
    img = write(tmp_path / "s.png", scan())
    assert segment("--model", tiny_run, img, "--out", tmp_path / "plain") == 0
    assert "model's pixel size 10 um/px, images not rescaled" in capsys.readouterr().out
    assert segment("--model", tiny_run, img, "--out", tmp_path / "same", "--pixel-size", MODEL_PX) == 0
    assert "pixel size 10 um/px -> model's 10: images rescaled x1" in capsys.readouterr().out
    for kind in ("prob", "mask"):
        assert (tmp_path / "plain" / f"s_{kind}.png").read_bytes() == (tmp_path / "same" / f"s_{kind}.png").read_bytes()


def test_resized_scan_segments_at_its_own_size(tiny_run, tmp_path, capsys, model_px, monkeypatch):
    """A scan at twice the model's pixel size (half the pixels) is enlarged x2 for the model and its maps
    come back at its own size; with --fov-mm the same follows from the width."""
    from vesselfast import inference

    full = scan(128, 192)
    half = cv2.resize(full, (96, 64), interpolation=cv2.INTER_AREA)
    img = write(tmp_path / "half.png", half)
    seen = []
    windows = inference.sliding_window_probs
    monkeypatch.setattr(inference, "sliding_window_probs", lambda fn, im, *a: seen.append(im.shape) or windows(fn, im, *a))
    for opt, value in (("--pixel-size", 2 * MODEL_PX), ("--fov-mm", 2 * MODEL_PX * 96 / 1000)):
        out = tmp_path / opt.strip("-")
        assert segment("--model", tiny_run, img, "--out", out, opt, value, "--measure") == 0
        assert "-> model's 10: images rescaled x2" in capsys.readouterr().out
        assert seen.pop() == (128, 192)  # the model saw the scan at its own pixel size
        for kind in ("prob", "mask"):
            assert cv2.imread(str(out / f"half_{kind}.png"), cv2.IMREAD_GRAYSCALE).shape == (64, 96)
        with open(out / "biomarkers.csv", newline="") as fh:
            row = next(csv.DictReader(fh))
        assert float(row["pixel_size_um"]) == pytest.approx(2 * MODEL_PX) and row["width_px"] == "96"


def test_rescaled_probabilities_line_up_with_the_scan():
    """With a pointwise stand-in model (logits = 4 x), the maps of a half-size scan given its pixel size
    are the full-size scan's maps halved, within what resampling blurs (0.08 measured; a 2 px shift or a
    flip gives 0.3); factor 1 is bit-identical to no pixel size."""
    from vesselfast.data import preprocessing_spec

    meta = {"preprocessing": preprocessing_spec("octa"), "tile": 64, "stride": 32, "threshold": 0.5,
            "size_multiple": 1, "pixel_size_um": MODEL_PX}
    seg = Segmenter(lambda x: 4 * x, meta, "numpy", "pointwise")
    full = scan(128, 192)
    half = cv2.resize(full, (96, 64), interpolation=cv2.INTER_AREA)
    want = cv2.resize(seg.predict(full), (96, 64), interpolation=cv2.INTER_AREA)
    got = seg.predict(half, pixel_size_um=2 * MODEL_PX)
    assert got.shape == (64, 96)
    assert np.abs(got - want).mean() < 0.12 and np.abs(got - np.roll(want, 2, axis=1)).mean() > 0.25
    assert np.array_equal(seg.predict(half, pixel_size_um=MODEL_PX), seg.predict(half))


def test_pixel_size_far_from_the_models_is_refused(tiny_run, tmp_path, capsys, model_px):
    img = write(tmp_path / "s.png", scan())
    out = tmp_path / "out"
    assert segment("--model", tiny_run, img, "--out", out, "--pixel-size", "0.00987") == 2  # mm, not um
    one_error_line(capsys.readouterr().err, "are the units right")
    assert segment("--model", tiny_run, img, "--out", out, "--pixel-size", "40", "--max-pixels", "50000") == 2
    one_error_line(capsys.readouterr().err, "after rescaling x4 to the model's pixel size")
    assert not out.exists()


def test_model_without_pixel_size_does_not_rescale(tiny_run, tmp_path, capsys, model_px):
    model_px(None)
    img = write(tmp_path / "s.png", scan())
    assert segment("--model", tiny_run, img, "--out", tmp_path / "a") == 0
    assert segment("--model", tiny_run, img, "--out", tmp_path / "b", "--pixel-size", "20") == 0
    captured = capsys.readouterr()
    assert "images not rescaled (the model has no pixel size)" in captured.out
    assert "does not record the pixel size" in captured.err
    assert (tmp_path / "a" / "s_prob.png").read_bytes() == (tmp_path / "b" / "s_prob.png").read_bytes()

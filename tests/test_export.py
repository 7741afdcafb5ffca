"""ONNX export, its metadata, ONNX Runtime parity, ``vesselfast segment`` through ORT and torch, and the
errors of the deployment path. A tiny segmenter is trained once per module (a few seconds)."""
import json

import cv2
import numpy as np
import onnx
import pytest
import torch

from vesselfast.cli import main
from vesselfast.data import builtin_domain, preprocessing_spec
from vesselfast.export import Segmenter, read_onnx_metadata
from vesselfast.models import SegmenterUNet
from vesselfast.checkpoint import save_checkpoint
from vesselfast.errors import UserError
from vesselfast.pipeline.segmentation import train_segmenter

OCTA_TEST = "octa/OCTA-500_3M/test/image"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A (8, 16, 32)-channel segmenter trained for 40 steps on built-in fundus images, saved as the
    pipeline saves F^k (so it has non-trivial weights and BatchNorm statistics)."""
    samples = builtin_domain("source", "train", n=4, size=96, seed=3)
    images = torch.from_numpy(np.stack([s.image for s in samples]))[:, None]
    masks = torch.from_numpy(np.stack([s.mask for s in samples]).astype(np.float32))[:, None]
    model = train_segmenter(images, masks, steps=40, batch_size=4, channels=(8, 16, 32), precision="fp32",
                            channels_last=False, seed=1)
    path = tmp_path_factory.mktemp("ck") / "segmenter_1.pt"
    save_checkpoint(path, {"kind": "segmenter_1", "channels": [8, 16, 32], "model": model.state_dict(),
                           "preprocessing": preprocessing_spec("octa"), "tile": 64, "stride": 32,
                           "threshold": 0.5})
    return path


@pytest.fixture(scope="module")
def onnx_file(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "seg.onnx"
    assert main(["export", "--onnx", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    return out


def _torch_model(checkpoint):
    ck = torch.load(checkpoint, weights_only=True)
    model = SegmenterUNet(1, ck["channels"])
    model.load_state_dict(ck["model"])
    return model.eval(), ck


def test_onnx_file_passes_checker_and_carries_metadata(onnx_file, checkpoint):
    model = onnx.load(str(onnx_file))
    onnx.checker.check_model(model, full_check=True)
    meta = read_onnx_metadata(onnx_file)
    _, ck = _torch_model(checkpoint)
    assert meta["preprocessing"] == ck["preprocessing"]
    assert (meta["tile"], meta["stride"], meta["threshold"]) == (ck["tile"], ck["stride"], ck["threshold"])
    assert meta["channels"] == [8, 16, 32] and meta["size_multiple"] == 4 and meta["precision"] == "fp32"
    # batch, height and width are symbolic in the graph
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param != "" for d in dims] == [True, False, True, True]


def test_onnx_runtime_matches_float64_torch(onnx_file, checkpoint):
    """Dynamic batch and non-square sizes; the reference is the same network in float64."""
    import onnxruntime as ort

    model, _ = _torch_model(checkpoint)
    model64 = model.double()
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for shape in [(1, 1, 64, 64), (3, 1, 36, 100), (2, 1, 128, 64)]:
        x = rng.uniform(-1, 1, shape).astype(np.float32)
        got = session.run(None, {"x": x})[0]
        with torch.no_grad():
            ref = model64(torch.from_numpy(x).double()).numpy()
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() < 1e-4, shape


def test_fixed_upsample_equals_resize_to_skip(checkpoint):
    """The exported graph's constant-factor upsampling is the same function on multiples of 2**levels."""
    model, _ = _torch_model(checkpoint)
    x = torch.randn(2, 1, 48, 72, dtype=torch.float64)
    model = model.double()
    with torch.no_grad():
        ref = model(x)
        model.fixed_upsample = True
        got = model(x)
    assert torch.equal(ref, got)


def test_fp16_export_within_tolerance(checkpoint, tmp_path):
    out = tmp_path / "seg16.onnx"
    assert main(["export", "--onnx", "--fp16", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    assert read_onnx_metadata(out)["precision"] == "fp16"
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in onnx.load(str(out)).graph.initializer)


def test_failed_parity_writes_nothing(checkpoint, tmp_path, monkeypatch, capsys):
    from vesselfast.export import onnx_export

    monkeypatch.setitem(onnx_export.PARITY, "fp32", ("logits", -1.0))  # no difference can meet it
    out = tmp_path / "seg.onnx"
    assert main(["export", "--onnx", "--checkpoint", str(checkpoint), "--out", str(out)]) == 2
    assert "parity check failed" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_segment_ort_and_torch_agree_on_octa(onnx_file, checkpoint, tmp_path, shared_data, capsys):
    images = sorted((shared_data / OCTA_TEST).iterdir())[:3]
    outs = {}
    for backend, model in (("ort", onnx_file), ("torch", checkpoint)):
        outs[backend] = tmp_path / backend
        argv = ["segment", "--model", str(model), "--backend", backend, "--out", str(outs[backend]),
                "--precision", "fp32"]  # ORT runs the fp32 graph: compare with fp32 torch
        assert main(argv + [str(p) for p in images]) == 0
    assert "CPUExecutionProvider" in capsys.readouterr().out
    for img in images:
        for kind in ("prob", "mask"):
            a = cv2.imread(str(outs["ort"] / f"{img.stem}_{kind}.png"), cv2.IMREAD_UNCHANGED).astype(int)
            b = cv2.imread(str(outs["torch"] / f"{img.stem}_{kind}.png"), cv2.IMREAD_UNCHANGED).astype(int)
            assert a.shape == (304, 304)
            if kind == "prob":
                assert np.abs(a - b).max() <= 1
            else:  # masks may differ only where the probability sits at the threshold
                assert np.mean(a != b) < 1e-3


def test_segmenter_api_ort_equals_torch(onnx_file, checkpoint):
    raw = (np.random.default_rng(1).uniform(0, 255, (100, 90))).astype(np.uint8)
    p_ort = Segmenter.load(str(onnx_file)).predict(raw)
    p_torch = Segmenter.load(str(checkpoint), precision="fp32").predict(raw)
    assert p_ort.shape == (100, 90)
    assert np.abs(p_ort - p_torch).max() < 1e-5
    # a checkpoint given to the ort backend is exported in memory
    seg = Segmenter.load(str(checkpoint), backend="ort")
    assert seg.backend == "ort" and np.abs(seg.predict(raw) - p_torch).max() < 1e-5


def _plain_onnx(path):
    """A valid ONNX model (identity) that is not ours."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, "h", "w"])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 1, "h", "w"])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["logits"])], "plain", [x], [y])
    onnx.save(helper.make_model(graph), str(path))
    return path


@pytest.mark.parametrize("case", ["missing", "no_metadata", "truncated_onnx", "unreadable_image", "bad_tile",
                                  "onnx_with_torch", "tensorrt_unavailable", "cuda_without_gpu"])
def test_segment_errors(case, onnx_file, tmp_path, capsys):
    good = tmp_path / "ok.png"
    cv2.imwrite(str(good), np.full((80, 80), 100, np.uint8))
    model, inputs, extra, expect = str(onnx_file), [str(good)], [], ""
    if case == "missing":
        model, expect = str(tmp_path / "nope.onnx"), "nope.onnx: no such file"
    elif case == "no_metadata":
        model, expect = str(_plain_onnx(tmp_path / "plain.onnx")), "without vesselfast metadata"
    elif case == "truncated_onnx":
        cut = tmp_path / "cut.onnx"
        cut.write_bytes(onnx_file.read_bytes()[:5000])
        model, expect = str(cut), "cut.onnx: not a readable ONNX file"
    elif case == "unreadable_image":
        bad = tmp_path / "broken.png"
        bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        inputs, expect = [str(good), str(bad)], "broken.png"
    elif case == "bad_tile":
        extra, expect = ["--tile", "66"], "--tile 66: this ort model needs a multiple of 4"
    elif case == "onnx_with_torch":
        extra, expect = ["--backend", "torch"], "--backend torch needs a run directory or checkpoint"
    elif case == "tensorrt_unavailable":
        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
        extra, expect = ["--backend", "tensorrt"], "--backend tensorrt: "
    elif case == "cuda_without_gpu":
        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
        extra, expect = ["--device", "cuda"], "--device cuda"
    out = tmp_path / "out"
    assert main(["segment", "--model", model, "--out", str(out), *extra, *inputs]) == 2
    err = capsys.readouterr().err.strip()
    assert expect in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_export_errors(checkpoint, tmp_path, capsys):
    ck, out = ["--onnx", "--checkpoint", str(checkpoint)], ["--out", str(tmp_path / "a.onnx")]
    cases = [
        (["--onnx", "--checkpoint", str(tmp_path / "none.pt"), *out], f"--checkpoint {tmp_path / 'none.pt'}: no such"),
        ([*ck, "--out", str(tmp_path / "no_dir" / "a.onnx")], "does not exist"),
        ([*ck, *out, "--opset", "7"], "--opset 7"),
        (["--onnx", "--run", str(tmp_path), *out], f"--run {tmp_path}: no trained segmenter"),
        (["--onnx", "--run", str(tmp_path / "gone"), *out], f"--run {tmp_path / 'gone'}: no such"),
        # segment tells the formats apart by the suffix: refused, the fix named
        ([*ck, "--out", str(tmp_path / "seg")], f"needs the .onnx suffix (vesselfast segment tells the formats apart "
                                                f"by it); use --out {tmp_path / 'seg.onnx'}"),
        (["--tensorrt", "--checkpoint", str(checkpoint), *out], "a TensorRT engine needs the .engine / .plan / .trt"),
        ([*ck, *out, "--fov-mm", "3"], "--fov-mm and --image-px go together"),
        ([*ck, *out, "--pixel-size", "9.87", "--fov-mm", "3", "--image-px", "304"], "not both"),
        ([*ck, *out, "--pixel-size", "0.00987"], "give micrometres per pixel"),
        ([*ck, *out, "--quality-images", "-1"], "--quality-images -1"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--tensorrt", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "a.engine")], "--tensorrt"))
    for argv, expect in cases:
        assert main(["export", *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert expect in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_metadata_is_plain_json(onnx_file):
    raw = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}["vesselfast"]
    assert json.loads(raw)["format"] == "vesselfast-segmenter/1"


def _rewrite_metadata(src, dst, change):
    from vesselfast.export import metadata as M

    model = onnx.load(str(src))
    meta = json.loads({p.key: p.value for p in model.metadata_props}["vesselfast"])
    M.attach_onnx(model, change(meta))
    onnx.save(model, str(dst))
    return dst


def test_model_card_round_trip_from_a_bare_checkpoint(checkpoint, tmp_path, capsys):
    """A checkpoint outside any run directory: the card has what export was told, the rest null."""
    out = tmp_path / "named.onnx"
    assert main(["export", "--onnx", "--checkpoint", str(checkpoint), "--out", str(out), "--name", "my model",
                 "--fov-mm", "3", "--image-px", "304", "--terms", "CC BY-NC 4.0"]) == 0
    assert "model card: my model (segmenter_1)" in capsys.readouterr().out
    meta = read_onnx_metadata(out)
    assert meta["pixel_size_um"] == pytest.approx(9.8684)
    card = meta["model_card"]
    assert card["name"] == "my model" and card["terms"] == "CC BY-NC 4.0" and card["stage"] == "segmenter_1"
    assert card["not_for"].startswith("Not a medical device")
    assert card["training_data"] is None and card["recreate"] is None and card["target_test"] is None
    assert meta["quality_reference"] is None
    assert Segmenter.load(str(out)).meta["model_card"] == card


def test_metadata_without_the_new_keys_stays_readable(onnx_file, tmp_path):
    from vesselfast.export.quality import quality_flags

    old = _rewrite_metadata(onnx_file, tmp_path / "old.onnx", lambda m: {
        k: v for k, v in m.items() if k not in ("pixel_size_um", "model_card", "quality_reference")})
    meta = read_onnx_metadata(old)
    assert "model_card" not in meta and "pixel_size_um" not in meta
    seg = Segmenter.load(str(old))
    prob = seg.predict(np.full((64, 64), 100, np.uint8))
    assert quality_flags(prob, seg.threshold, seg.meta.get("quality_reference"))["quality"] == "n/a"
    bad = _rewrite_metadata(onnx_file, tmp_path / "bad.onnx", lambda m: {**m, "pixel_size_um": "9.87 um"})
    with pytest.raises(UserError, match="unusable pixel_size_um"):
        read_onnx_metadata(bad)


def test_export_from_run_directory_uses_final_segmenter(tiny_run, tmp_path, capsys):
    """--run DIR exports the last round's segmenter with the run's window and threshold."""
    from vesselfast.pipeline.config import resolve

    out = tmp_path / "run.onnx"
    assert main(["export", "--onnx", "--run", str(tiny_run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "parity ONNX Runtime" in printed and "wrote" in printed
    meta = read_onnx_metadata(out)
    tiny = resolve("tiny").segmenter
    assert (meta["tile"], meta["stride"], meta["threshold"]) == (tiny.tile, tiny.stride, tiny.threshold)
    assert meta["channels"] == list(tiny.channels)
    final = Segmenter.load(str(tiny_run), precision="fp32")  # torch, from segmenter_1.pt
    exported = Segmenter.load(str(out))
    raw = (np.random.default_rng(2).uniform(0, 255, (70, 70))).astype(np.uint8)
    assert np.abs(final.predict(raw) - exported.predict(raw)).max() < 1e-5


def test_model_card_from_a_run_directory(tiny_run, tmp_path, capsys):
    """The card names the run, re-creates its config, and scores the final round as metrics.json does;
    the quality reference measures the run's (built-in) target training images."""
    import shlex

    import yaml

    from vesselfast.pipeline.config import resolve, to_dict

    out = tmp_path / "card.onnx"
    assert main(["export", "--onnx", "--run", str(tiny_run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "model card: run (segmenter_1)" in printed and "quality reference: 4 target training images" in printed
    meta = read_onnx_metadata(out)
    card = meta["model_card"]
    assert meta["pixel_size_um"] is None
    final = json.loads((tiny_run / "metrics.json").read_text())["target_test"]["iter1"]
    scores = card["target_test"]
    assert scores["model"] == "iter1" and scores["n_images"] == final["n_images"]
    assert (scores["dsc"], scores["auc"], scores["ahd"]) == (final["dsc"], final["auc"], final["ahd"])
    assert "built-in synthetic fundus" in card["training_data"] and "labels never read" in card["training_data"]
    assert card["commit"] is None or len(card["commit"].split("-")[0]) == 40
    # the command re-creates the run's config
    argv = shlex.split(card["recreate"]["command"])
    assert argv[:2] == ["vesselfast", "train"] and card["recreate"]["seed"] == 0 and "seed=0" in argv
    opts = {"source": argv[argv.index("--source") + 1:argv.index("--target")], "target": argv[argv.index("--target") + 1]}
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    again = resolve(argv[argv.index("--preset") + 1], sets=sets, overrides={"data": opts})
    assert to_dict(again) == yaml.safe_load((tiny_run / "config.yaml").read_text())
    ref = meta["quality_reference"]
    assert ref["n_images"] == 4 and ref["threshold"] == meta["threshold"]
    assert ref["marked_share"]["p5"] <= ref["marked_share"]["p50"] <= ref["marked_share"]["p95"]


def test_parity_uses_the_runs_real_target_images(tiny_run, tmp_path, shared_data, capsys):
    """A run trained on real OCTA: the parity check takes its first target training images (images only)."""
    import shutil

    import yaml

    run = tmp_path / "run"
    shutil.copytree(tiny_run / "ckpt", run / "ckpt")
    config = yaml.safe_load((tiny_run / "config.yaml").read_text())
    config["data"]["target"] = str(shared_data / "octa" / "OCTA-500_3M")
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "seg.onnx"
    assert main(["export", "--onnx", "--run", str(run), "--out", str(out), "--quality-images", "3"]) == 0
    printed = capsys.readouterr().out
    assert "2 of the run's target images" in printed
    # the quality reference: 3 of its target training images, spread over the folder, labels unread
    assert "quality reference: 3 target training images (OCTA-500_3M train split, labels unread)" in printed
    assert read_onnx_metadata(out)["quality_reference"]["n_images"] == 3

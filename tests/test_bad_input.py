"""The bad-input catalogue (docs/ERRORS.md): one case per class of bad data, config, model file and
environment. Each must give exactly one line ``vesselfast: error: ...`` on stderr that names the file
or option, exit code 2, and leave nothing half-written: the output / run directory is unchanged
(``.lock`` aside, and ``train.log``, which records the attempt, when an existing run is re-opened).

Data classes are checked here through ``vesselfast train`` (the run directory must stay untouched);
``tests/test_data_check.py`` checks the same classes through ``vesselfast data check`` and the loaders.
"""
import errno
import os
import shutil

import cv2
import numpy as np
import pytest
import torch
from helpers import generic, octa_split

from vesselfast.cli import main
from vesselfast.pipeline.rundir import RunDir

TRAIN = ["train", "--preset", "tiny"]
GPU = torch.cuda.is_available()


def snapshot(folder):
    """Every file under ``folder`` with size and mtime; None when the folder does not exist."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in (".lock", "train.log")}


def copy_run(tiny_run, tmp_path):
    """A private copy of the reference run (tests must not touch the shared one)."""
    dst = tmp_path / "run"
    shutil.copytree(tiny_run, dst)
    return dst


# Each case: tmp_path, tiny_run -> (argv, substrings the one line must contain, folder that must not change).
def data_case(make_source, *expect, target=None):
    def case(tmp, tiny_run):
        out = tmp / "out"
        src = make_source(tmp)
        argv = TRAIN + ["--source", str(src), "--out", str(out)]
        if target is not None:
            argv += ["--target", str(target(tmp))]
        return argv, list(expect), out
    return case


def _missing(tmp):
    return tmp / "nope"


def _empty(tmp):
    (tmp / "empty").mkdir()
    return tmp / "empty"


def _no_images(tmp):
    (tmp / "e" / "images").mkdir(parents=True)
    (tmp / "e" / "masks").mkdir()
    return tmp / "e"


def _corrupt_image(tmp):
    root = generic(tmp / "g")
    (root / "images" / "c1.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    return root


def _mask_missing(tmp):
    root = generic(tmp / "g")
    os.remove(root / "masks" / "c1.png")
    return root


def _mask_size(tmp):
    root = generic(tmp / "g")
    cv2.imwrite(str(root / "masks" / "c0.png"), np.zeros((30, 40), np.uint8))
    return root


def _unknown_layout(tmp):
    (tmp / "u" / "stuff").mkdir(parents=True)
    (tmp / "u" / "notes.txt").write_text("hello")
    return tmp / "u"


def _label_as_target(tmp):
    root = octa_split(tmp / "octa")
    for p in (root / "train" / "image").iterdir():  # the labels copied over the images
        shutil.copy(root / "train" / "label" / p.name, p)
    return root


def _good_source(tmp):
    return generic(tmp / "g", n=2, size=64)


def config_case(extra, *expect, config_text=None):
    def case(tmp, tiny_run):
        out = tmp / "out"
        argv = TRAIN + list(extra) + ["--out", str(out)]
        if config_text is not None:
            (tmp / "c.yaml").write_text(config_text)
            argv = ["train", "--config", str(tmp / "c.yaml"), "--out", str(out)]
        return argv, list(expect), out
    return case


def _different_config(tmp, tiny_run):
    run = copy_run(tiny_run, tmp)
    return TRAIN + ["--set", "rounds=2", "--out", str(run)], [str(run / "config.yaml"), "different config"], run


def _resume_without_run(tmp, tiny_run):
    return ["train", "--resume", "--out", str(tmp / "none")], ["--resume", "config.yaml not found"], tmp / "none"


def _truncated_stage_checkpoint(tmp, tiny_run):
    run = copy_run(tiny_run, tmp)
    ck = run / "ckpt" / "segmenter_0.pt"
    ck.write_bytes(ck.read_bytes()[:2000])
    return TRAIN + ["--out", str(run)], ["segmenter_0.pt", "truncated or foreign", "delete it"], run


def segment_case(make_model, *expect):
    def case(tmp, tiny_run):
        image = tmp / "scan.png"
        cv2.imwrite(str(image), np.full((64, 64), 100, np.uint8))
        out = tmp / "seg_out"
        return (["segment", "--model", str(make_model(tmp, tiny_run)), str(image), "--out", str(out),
                 "--backend", "torch", "--device", "cpu"], list(expect), out)
    return case


def _truncated_model(tmp, tiny_run):
    bad = tmp / "truncated.pt"
    bad.write_bytes((tiny_run / "ckpt" / "segmenter_1.pt").read_bytes()[:5000])
    return bad


def _other_architecture(tmp, tiny_run):
    ck = torch.load(tiny_run / "ckpt" / "segmenter_1.pt", weights_only=True)
    ck["channels"] = [16, 32, 64]  # claims a wider network than its weights
    torch.save(ck, tmp / "wider.pt")
    return tmp / "wider.pt"


class CodePayload:
    """Pickles as a call to os.system: loading the file with plain pickle would create the marker."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _code_pickle(tmp, tiny_run):
    ck = torch.load(tiny_run / "ckpt" / "segmenter_1.pt", weights_only=True)
    ck["extra"] = CodePayload(tmp / "PAYLOAD_RAN")
    torch.save(ck, tmp / "evil.pt")
    return tmp / "evil.pt"


def _eval_without_config(tmp, tiny_run):
    (tmp / "empty_run").mkdir()
    return ["eval", "--run", str(tmp / "empty_run")], ["--run", "no config.yaml"], tmp / "empty_run"


def _out_under_a_file(tmp, tiny_run):
    (tmp / "a_file").write_text("x")
    out = tmp / "a_file" / "run"
    return TRAIN + ["--out", str(out)], [f"--out {out}", "cannot create the run directory"], tmp / "a_file"


def _out_read_only(tmp, tiny_run):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    (tmp / "ro").mkdir()
    (tmp / "ro").chmod(0o555)
    out = tmp / "ro" / "run"
    return TRAIN + ["--out", str(out)], [f"--out {out}", "cannot create the run directory"], tmp / "ro"


def _cuda(flag):
    def case(tmp, tiny_run):
        if GPU:
            pytest.skip("a GPU is present")
        argv = TRAIN + (["--device", "cuda"] if flag else ["--set", "device=cuda"]) + ["--out", str(tmp / "out")]
        return argv, ["--device cuda" if flag else "device=cuda", "no CUDA GPU"], tmp / "out"
    return case


def _locked(tmp, tiny_run):
    run = copy_run(tiny_run, tmp)
    holder = RunDir(run)  # another run holding the directory (flock is per open file, so this works in-process)
    holder.open((run / "config.yaml").read_text())
    _HOLDERS.append(holder)  # closed by the test after the command ran
    return TRAIN + ["--out", str(run)], [str(run), "another vesselfast run"], run


_HOLDERS = []

CASES = {
    # data (vesselfast/data; the same classes via `data check` in tests/test_data_check.py)
    "data_missing_folder": data_case(_missing, "nope: no such folder"),
    "data_empty_folder": data_case(_empty, "empty: folder is empty"),
    "data_no_images": data_case(_no_images, "no images"),
    "data_corrupt_image": data_case(_corrupt_image, "c1.png: cannot decode image"),
    "data_mask_missing": data_case(_mask_missing, "c1.png: no vessel mask found"),
    "data_mask_size_mismatch": data_case(_mask_size, "c0.png", "same size"),
    "data_unknown_layout": data_case(_unknown_layout, "unknown layout"),
    "data_label_as_target_image": data_case(_good_source, "train0.png", "looks like a vessel label",
                                            target=_label_as_target),
    # config
    "config_unknown_key": config_case(["--set", "generator.nonsense=1"], "unknown config key 'generator.nonsense'"),
    "config_wrong_type": config_case(["--set", "generator.lr=fast"], "'generator.lr' expects float"),
    "config_t0_ratio_zero": config_case(["--set", "diffusion.t0_ratio=0"], "diffusion.t0_ratio=0", "(0, 1]"),
    "config_t0_ratio_above_one": config_case(["--set", "diffusion.t0_ratio=1.5"], "diffusion.t0_ratio=1.5"),
    "config_crop_larger_than_images": config_case(["--set", "data.crop=128"], "data.crop=128",
                                                  "larger than every source", "data.crop=96"),
    "config_set_syntax": config_case(["--set", "rounds"], "--set 'rounds'", "key=value"),
    "config_unknown_preset": config_case(["--preset", "huge"], "--preset 'huge'"),
    "config_file_missing": config_case(["--config", "/nonexistent/c.yaml"], "--config /nonexistent/c.yaml"),
    "config_file_not_yaml": config_case([], "c.yaml: not valid YAML", config_text="rounds: [1\n"),
    "config_differs_from_run": _different_config,
    "config_resume_without_run": _resume_without_run,
    # model files and run directories
    "model_missing": segment_case(lambda tmp, run: tmp / "missing.pt", "missing.pt", "no such file"),
    "model_truncated": segment_case(_truncated_model, "truncated.pt", "truncated or foreign"),
    "model_generator_not_segmenter": segment_case(lambda tmp, run: run / "ckpt" / "pretrain_source.pt",
                                                  "pretrain_source.pt", "not a segmenter"),
    "model_other_architecture": segment_case(_other_architecture, "wider.pt", "do not fit"),
    "model_code_in_pickle": segment_case(_code_pickle, "evil.pt", "refused to load", "posix.system"),
    "run_truncated_stage_checkpoint": _truncated_stage_checkpoint,
    "run_without_config": _eval_without_config,
    # environment
    "env_out_under_a_file": _out_under_a_file,
    "env_out_read_only": _out_read_only,
    "env_cuda_flag_without_gpu": _cuda(True),
    "env_cuda_config_without_gpu": _cuda(False),
    "env_run_dir_locked": _locked,
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, tmp_path, tiny_run, capsys):
    argv, expect, watched = CASES[name](tmp_path, tiny_run)
    before = snapshot(watched)
    try:
        rc = main(argv)
    finally:
        while _HOLDERS:
            _HOLDERS.pop().close()
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vesselfast: error: "), err
    for text in expect:
        assert text in lines[0], (text, lines[0])
    assert snapshot(watched) == before, "the command wrote into " + str(watched)
    assert not (tmp_path / "PAYLOAD_RAN").exists()


def test_disk_full_leaves_nothing(tmp_path, capsys, monkeypatch):
    """ENOSPC when the first file (config.yaml) is flushed: one line naming the file, no temp file, and
    the run directory this command created is gone again."""
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "out"
    rc = main(TRAIN + ["--out", str(out)])
    monkeypatch.undo()
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err == (f"vesselfast: error: {out / 'config.yaml'}: cannot write (No space left on device); "
                   "the disk is full: free space, then re-run the same command to resume")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_catalogue_is_documented():
    """docs/ERRORS.md lists every case of this file (and at least 15 classes)."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "ERRORS.md").read_text()
    missing = [name for name in CASES if f"[{name}]" not in doc]
    assert not missing, missing
    assert len(CASES) >= 15


def test_global_batch_must_split_over_the_processes(tmp_path, capsys, monkeypatch):
    """Under torchrun the configured batch is split over the ranks; a batch that does not divide is
    refused before anything is written (simulated: three processes, tiny's batch of 4)."""
    from vesselfast.pipeline import dist

    monkeypatch.setattr(dist, "world", lambda: 3)
    out = tmp_path / "out"
    assert main(TRAIN + ["--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        "vesselfast: error: generator.batch_size=4 is the global batch and must divide evenly over the 3 "
        "processes; use a multiple of 3")
    assert not out.exists()

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
def data_case(make_source, *expect, target=None, twice=False):
    """``target``: tmp -> the --target folder, or the string "source" for the source folder itself;
    ``twice``: the source folder given twice (the second time with a trailing slash)."""
    def case(tmp, tiny_run):
        out = tmp / "out"
        src = make_source(tmp)
        argv = TRAIN + ["--source", str(src)] + ([f"{src}/"] if twice else []) + ["--out", str(out)]
        if target is not None:
            argv += ["--target", str(src if target == "source" else target(tmp))]
        return argv, [e.replace("TMP", str(tmp)) for e in expect], out
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


def _five_px(tmp):
    return generic(tmp / "g5", n=2, size=5)


def _source_twice(tmp):
    return generic(tmp / "g", n=2, size=64)


def _target_with_a_source_image(tmp):
    """An OCTA-like target folder whose first training image is a copy of a source image."""
    root = octa_split(tmp / "octa")
    shutil.copy(generic(tmp / "g", n=2, size=48) / "images" / "c0.png", root / "train" / "image" / "train0.png")
    return root


def _test_split_with_a_source_image(tmp):
    root = octa_split(tmp / "octa")
    shutil.copy(generic(tmp / "g", n=2, size=48) / "images" / "c1.png", root / "test" / "image" / "test1.png")
    return root


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


def _eval_before_a_segmenter(tmp, tiny_run):
    run = tmp / "started"
    run.mkdir()
    shutil.copy(tiny_run / "config.yaml", run / "config.yaml")  # a run that has not finished a segmenter yet
    return ["eval", "--run", str(run)], [f"--run {run}", "no finished segmenter"], run


def _eval_json_to_a_folder(tmp, tiny_run):
    (tmp / "results").mkdir()
    return (["eval", "--run", str(tiny_run), "--json", str(tmp / "results")],
            [f"--json {tmp / 'results'}: is a folder", "metrics.json"], tmp)


def _eval_json_read_only(tmp, tiny_run):
    return ["eval", "--run", str(tiny_run), "--json", "/proc/metrics.json"], ["--json /proc/metrics.json"], tmp


def _eval_truncated_checkpoint(tmp, tiny_run):
    run = copy_run(tiny_run, tmp)
    ck = run / "ckpt" / "baseline_histmatch.pt"  # the first one eval reads
    ck.write_bytes(ck.read_bytes()[:2000])
    return (["eval", "--run", str(run)], ["baseline_histmatch.pt", "truncated or foreign", "eval only reads it",
                                          f"vesselfast train --out {run}"], run)


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
    "data_source_twice": data_case(_source_twice, "--source TMP/g/: passed twice (also as TMP/g)", twice=True),
    "data_source_as_target": data_case(_good_source, "--target TMP/g: is the --source folder TMP/g",
                                       "must never reach training", target="source"),
    "data_target_holds_a_source_image": data_case(_good_source, "train0.png: the same image as the source",
                                                  "--target folder", target=_target_with_a_source_image),
    "data_target_test_holds_a_source_image": data_case(_good_source, "test1.png: the same image as the source",
                                                       "target test images", target=_test_split_with_a_source_image),
    "data_images_too_small": data_case(_five_px, "data.crop=32 is larger than every source", "5 px",
                                       "too small for any crop"),
    # config
    "config_unknown_key": config_case(["--set", "generator.nonsense=1"], "unknown config key 'generator.nonsense'"),
    "config_wrong_type": config_case(["--set", "generator.lr=fast"], "'generator.lr' expects float"),
    "config_t0_ratio_zero": config_case(["--set", "diffusion.t0_ratio=0"], "diffusion.t0_ratio=0", "(0, 1]"),
    "config_t0_ratio_above_one": config_case(["--set", "diffusion.t0_ratio=1.5"], "diffusion.t0_ratio=1.5"),
    "config_crop_larger_than_images": config_case(["--set", "data.crop=128"], "data.crop=128",
                                                  "larger than every source", "data.crop=96"),
    "config_set_syntax": config_case(["--set", "rounds"], "--set 'rounds'", "key=value"),
    "config_unknown_preset": config_case(["--preset", "huge"], "--preset 'huge'"),
    # config values, checked before anything is read or written (the whole schema: test_config_schema.py)
    "config_lr_negative": config_case(["--set", "generator.lr=-1"], "generator.lr=-1.0 must be > 0"),
    "config_lr_nan": config_case(["--set", "generator.lr=nan"], "generator.lr=nan must be a finite number"),
    "config_channels_empty": config_case(["--set", "segmenter.channels=[]"], "segmenter.channels=[]: give a non-empty"),
    "config_threshold_above_one": config_case(["--set", "segmenter.threshold=2"], "segmenter.threshold=2.0", "(0, 1)"),
    "config_ema_decay_above_one": config_case(["--set", "generator.ema_decay=2"], "generator.ema_decay=2.0", "[0, 1)"),
    "config_eta_negative": config_case(["--set", "synthesis.eta=-1"], "synthesis.eta=-1.0", "[0, 1]"),
    "config_tile_too_small": config_case(["--set", "segmenter.tile=7"], "segmenter.tile=7 must be >= 16"),
    "config_T_zero": config_case(["--set", "diffusion.T=0"], "diffusion.T=0 must be >= 10"),
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
    "run_eval_before_a_segmenter": _eval_before_a_segmenter,
    "run_eval_truncated_checkpoint": _eval_truncated_checkpoint,
    # environment
    "env_out_under_a_file": _out_under_a_file,
    "env_out_read_only": _out_read_only,
    "env_eval_json_is_a_folder": _eval_json_to_a_folder,
    "env_eval_json_not_writable": _eval_json_read_only,
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


def test_a_start_that_fails_after_opening_removes_what_it_created(tmp_path, capsys, monkeypatch):
    """A start refused after the run directory was opened (here: a stand-in for the method that refuses
    at once) leaves no config.yaml or lock, so the corrected command is not refused as "a different
    config"; a directory with stage output is kept for a resume."""
    from vesselfast.errors import UserError
    from vesselfast.pipeline import launch

    def refuse(cfg, ctx, inputs):
        raise UserError("refused in the first stage")

    monkeypatch.setattr(launch, "run_method", refuse)
    out = tmp_path / "out"
    assert main(TRAIN + ["--set", "rounds=2", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "vesselfast: error: refused in the first stage"
    assert not out.exists() and list(tmp_path.iterdir()) == []

    def finish(cfg, ctx, inputs):
        return {}

    monkeypatch.setattr(launch, "run_method", finish)  # the corrected command (another config) starts
    assert launch.run_pipeline(launch.RunConfig(), str(out)) == {}
    assert (out / "config.yaml").exists()

    def write_then_refuse(cfg, ctx, inputs):
        ctx.run.write_json("stages.json", {})
        raise UserError("refused after a stage wrote")

    fresh = tmp_path / "fresh"
    monkeypatch.setattr(launch, "run_method", write_then_refuse)
    assert main(TRAIN + ["--out", str(fresh)]) == 2
    assert (fresh / "stages.json").exists() and (fresh / "config.yaml").exists()


def _start_only(monkeypatch):
    """The method replaced by a stand-in: what run_pipeline checks and logs at the start, no training."""
    from vesselfast.pipeline import launch

    monkeypatch.setattr(launch, "run_method", lambda cfg, ctx, inputs: {})


@pytest.mark.parametrize("swap", ["fundus_as_target", "octa_as_source"])
def test_a_domain_that_looks_like_the_other_is_one_warning_line(swap, tmp_path, monkeypatch, caplog):
    """A target folder of colour fundus photographs, or an OCTA source folder, starts with one warning
    naming the option (the user may mean it: fundus -> fundus adaptation); the right way round, none."""
    _start_only(monkeypatch)
    fundus, octa = generic(tmp_path / "fundus", n=2, size=64), octa_split(tmp_path / "octa")
    argv = {"fundus_as_target": ["--source", "builtin", "--target", str(fundus)],
            "octa_as_source": ["--source", str(octa), "--set", "data.source_scale=1"]}[swap]
    caplog.set_level("WARNING", logger="vesselfast")
    assert main(TRAIN + argv + ["--set", "data.crop=32", "--out", str(tmp_path / "out")]) == 0
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "look like" in r.getMessage()]
    option = "--target" if swap == "fundus_as_target" else "--source"
    assert len(lines) == 1 and lines[0].startswith(f"{option} "), lines
    assert ("colour fundus photographs (a dark circular" in lines[0]) == (swap == "fundus_as_target")

    caplog.clear()
    assert main(TRAIN + ["--source", str(fundus), "--target", str(octa), "--set", "data.crop=32",
                         "--out", str(tmp_path / "right")]) == 0
    assert not [r for r in caplog.records if "look like" in r.getMessage()]


def test_frame_contrast_separates_fundus_from_octa_on_builtin_data(tmp_path):
    """The detector on the built-in domains, each read in the role it was made for and in the other."""
    from vesselfast.data import builtin_domain, load_domain
    from vesselfast.pipeline.inputs import FUNDUS_FRAME, frame_contrast

    assert frame_contrast(builtin_domain("source", "train", 4, 96)) < 0.1
    assert frame_contrast(builtin_domain("target", "train", 4, 96)) > 0.8
    fundus, octa = generic(tmp_path / "fundus", n=3, size=96), octa_split(tmp_path / "octa", n=3)
    assert frame_contrast(load_domain(fundus, "target", "train", False)) < FUNDUS_FRAME
    assert frame_contrast(load_domain(octa, "source", "train", True, modality="fundus")) > FUNDUS_FRAME


@pytest.mark.real_data
def test_frame_contrast_on_real_data(shared_data):
    """DRIVE and CHASE_DB1 read as OCTA targets, OCTA-500 read as a fundus source (docs/ERRORS.md has the
    measured values: fundus <= 0.24, OCTA >= 0.93 per image)."""
    from vesselfast.data import load_domain
    from vesselfast.pipeline.inputs import FUNDUS_FRAME, frame_contrast

    for name in ("DRIVE", "CHASE_DB1"):
        assert frame_contrast(load_domain(shared_data / "fundus" / name, "target", "test", False, modality="octa")) \
            < FUNDUS_FRAME
    octa = shared_data / "octa" / "OCTA-500_3M"
    assert frame_contrast(load_domain(octa, "source", "val", False, modality="fundus")) > FUNDUS_FRAME
    assert frame_contrast(load_domain(octa, "target", "val", False)) > FUNDUS_FRAME


def test_crop_advice_never_below_the_smallest_crop():
    from vesselfast.data import Sample
    from vesselfast.errors import UserError
    from vesselfast.pipeline.inputs import check_crop

    def sample(side):
        return Sample("x", np.zeros((side, side), np.float32), None, np.ones((side, side), bool), "x")

    with pytest.raises(UserError, match=r"use --set data\.crop=16 or less$"):
        check_crop([sample(20)], 32, "source")
    for side in (5, 15):
        with pytest.raises(UserError, match="too small for any crop") as exc:
            check_crop([sample(side)], 32, "source")
        assert "data.crop=0" not in str(exc.value)


def test_help_texts():
    """Top-level help lists every command without raw reST markup; every option of every command has a
    help text."""
    import argparse
    import io
    from contextlib import redirect_stdout

    from vesselfast.cli import COMMANDS, build_parser

    buf = io.StringIO()
    with redirect_stdout(buf), pytest.raises(SystemExit):
        main(["--help"])
    text = buf.getvalue()
    assert "`" not in text and all(name in text for name in COMMANDS)

    def undocumented(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from undocumented(sub, path + [name])
            elif action.help is None:
                yield " ".join(path + [action.option_strings[0] if action.option_strings else action.dest])
        if "`" in parser.format_help():
            yield " ".join(path) + ": backticks"

    for name in COMMANDS:
        sub = next(a for a in build_parser([name])._actions if isinstance(a, argparse._SubParsersAction))
        assert not list(undocumented(sub.choices[name], [name]))


def test_errors_doc_lists_the_presets_of_the_code():
    from pathlib import Path

    from vesselfast.pipeline.config import PRESETS

    doc = (Path(__file__).resolve().parents[1] / "docs" / "ERRORS.md").read_text()
    assert f"--preset 'huge': choose one of {', '.join(PRESETS)}`" in doc

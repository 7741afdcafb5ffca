"""The method end to end on the tiny preset: run directory contents, resume after an interrupted stage
with identical final metrics, and the config / run-directory errors."""
import json
import os
import sys

import numpy as np
import pytest
import yaml

from vesselfast.cli import main
from vesselfast.errors import UserError
from vesselfast.pipeline import generative, segmentation
from vesselfast.pipeline.config import resolve
from vesselfast.checkpoint import load_checkpoint
from vesselfast.pipeline.launch import run_pipeline
from vesselfast.pipeline.rundir import RunDir

SUMMARY = ("dsc", "dsc_std", "auc", "acc", "ahd", "n_images")


def test_run_directory_holds_everything(tiny_run):
    m = json.loads((tiny_run / "metrics.json").read_text())
    assert set(m["target_test"]) == {"baseline", "baseline_histmatch", "baseline_selftrain", "iter0", "iter1"}
    for entry in m["target_test"].values():
        assert set(SUMMARY) <= set(entry)
        assert 0 <= entry["dsc"] <= 1 and 0 <= entry["auc"] <= 1 and 0 <= entry["acc"] <= 1 and entry["ahd"] >= 0
        assert entry["n_images"] == 2
    stages = m["stages"]
    for s in ("pretrain_source", "pretrain_target", "invert", "synthesize_0", "segmenter_0", "pseudo_label_1",
              "target_generator_1", "synthesize_1", "segmenter_1"):
        assert stages[s]["seconds"] >= 0
    # inversion: t0 = round(0.3 * 10) = 3 evaluations per image; DDIM from the latent: t0 + 1
    assert stages["invert"]["unet_evals_per_image"] == 3
    assert stages["synthesize_0"]["unet_evals_per_image"] == 4
    cfg = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert cfg["preset"] == "tiny" and cfg["rounds"] == 1
    for name in ("metrics.csv", "metrics.png", "report.md", "train.log", "pictures/round0.png", "pictures/round1.png",
                 "pictures/test_iter1.png"):
        assert (tiny_run / name).stat().st_size > 0, name
    assert "iter1" in (tiny_run / "report.md").read_text()
    # the profile: every second of the stages and evaluations in one kind of work, nothing counted twice
    assert set(m["evaluation_seconds"]) == set(m["target_test"])
    assert stages["segmenter_0"]["inference_seconds"] > 0 and "inference_seconds" not in stages["baseline"]
    assert sum(m["profile"].values()) == pytest.approx(m["total_seconds"] + sum(m["evaluation_seconds"].values()),
                                                       abs=0.5)
    assert "| generator training |" in (tiny_run / "report.md").read_text()
    assert not list(tiny_run.glob("ckpt/*.partial.pt")) and not list(tiny_run.rglob("*.tmp"))
    latents = load_checkpoint(tiny_run / "ckpt" / "invert.pt", kind="invert")["latents"]
    assert latents.dtype == __import__("torch").float32  # latents are never stored as 8-bit images


def test_rerun_skips_finished_stages(tiny_run, tmp_path, monkeypatch):
    """A re-run into a finished directory trains, infers and evaluates nothing again (on a copy: the
    session's tiny_run must not change)."""
    import shutil

    from vesselfast.pipeline import evaluation

    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    before = {name: (run / name).read_text() for name in ("metrics.json", "stages.json")}
    fail = lambda *a, **k: pytest.fail("a finished stage or evaluation was computed again")  # noqa: E731
    for module, name in ((generative, "run_training"), (segmentation, "run_training"),
                         (segmentation, "predict_probs"), (evaluation, "evaluate_on")):
        monkeypatch.setattr(module, name, fail)
    assert main(["train", "--preset", "tiny", "--out", str(run)]) == 0
    assert json.loads((run / "stages.json").read_text()) == json.loads(before["stages.json"])
    assert json.loads((run / "metrics.json").read_text())["target_test"] == \
        json.loads(before["metrics.json"])["target_test"]


class Interrupt(Exception):
    pass


def _interrupt_at(module, monkeypatch, stage_name, at_step):
    """Make the training loop of ``stage_name`` raise after ``at_step`` steps (simulated kill)."""
    real = module.run_training

    def wrapped(step_fn, steps, state, rng, desc, run=None, stage=None, *a, **k):
        if stage == stage_name:
            def killing(step):
                if step == at_step:
                    raise Interrupt(f"killed in {stage} at step {step}")
                return step_fn(step)
            return real(killing, steps, state, rng, desc, run, stage, *a, **k)
        return real(step_fn, steps, state, rng, desc, run, stage, *a, **k)

    monkeypatch.setattr(module, "run_training", wrapped)


@pytest.mark.parametrize("module,stage,step", [(generative, "pretrain_source", 11), (segmentation, "segmenter_1", 3)])
def test_resume_after_interrupt_gives_identical_metrics(tiny_run, tmp_path, monkeypatch, module, stage, step):
    out = tmp_path / "run"
    cfg = resolve("tiny")
    with monkeypatch.context() as mp:
        _interrupt_at(module, mp, stage, step)
        with pytest.raises(Interrupt):
            run_pipeline(cfg, str(out))
    if step > cfg.ckpt_every:  # an in-stage checkpoint was written before the kill
        assert load_checkpoint(out / "ckpt" / f"{stage}.partial.pt")["step"] == cfg.ckpt_every
    resumed = run_pipeline(cfg, str(out))
    want = json.loads((tiny_run / "metrics.json").read_text())["target_test"]
    got = json.loads((out / "metrics.json").read_text())["target_test"]
    for key in want:
        for m in SUMMARY:
            assert got[key][m] == want[key][m], (key, m)
    assert resumed.keys() == want.keys()


def test_run_directory_errors(tmp_path, tiny_run):
    # a different config for an existing run directory is refused
    with pytest.raises(UserError, match="different config"):
        run_pipeline(resolve("tiny", sets=["rounds=2"]), str(tiny_run))
    # a second concurrent run is refused
    run = RunDir(tmp_path / "locked")
    run.open("x: 1\n")
    try:
        with pytest.raises(UserError, match="another vesselfast run"):
            RunDir(tmp_path / "locked").open("x: 1\n")
    finally:
        run.close()
    # truncated and foreign checkpoints
    ck = tiny_run / "ckpt" / "segmenter_0.pt"
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(ck.read_bytes()[:1000])
    with pytest.raises(UserError, match="truncated or foreign"):
        load_checkpoint(bad)
    with pytest.raises(UserError, match="expected 'invert'"):
        load_checkpoint(ck, kind="invert")


@pytest.mark.parametrize("argv,msg", [
    (["--set", "diffusion.t0_ratio=0"], "t0_ratio"),
    (["--set", "nonsense.key=1"], "unknown config key"),
    (["--set", "generator.lr=fast"], "expects float"),
    (["--preset", "huge"], "--preset"),
    (["--config", "/nonexistent.yaml"], "--config"),
    (["--device", "cuda"], "--device cuda"),
])
def test_train_option_errors_exit_2(tmp_path, capsys, argv, msg):
    out = tmp_path / "never"
    assert main(["train", "--out", str(out)] + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vesselfast: error:") and msg in err[0]
    assert not out.exists()


def test_eval_reproduces_run_metrics(tiny_run, capsys, tmp_path):
    out_json = tmp_path / "eval.json"
    assert main(["eval", "--run", str(tiny_run), "--json", str(out_json)]) == 0
    again = json.loads(out_json.read_text())
    want = json.loads((tiny_run / "metrics.json").read_text())["target_test"]
    assert again.keys() == want.keys()
    for key in want:
        assert again[key]["dsc"] == pytest.approx(want[key]["dsc"], abs=1e-12)
    assert main(["eval", "--run", str(tmp_path)]) == 2
    assert "no config.yaml" in capsys.readouterr().err


def test_segment_command_writes_pngs(tiny_run, tmp_path, capsys):
    import cv2
    import numpy as np

    from vesselfast.data import builtin_domain

    # raw 8-bit OCTA-like inputs, two with the same stem in different folders
    samples = builtin_domain("target", "test", 2, 96, 0)
    for i, s in enumerate(samples):
        d = tmp_path / "in" / f"eye{i}"
        d.mkdir(parents=True)
        cv2.imwrite(str(d / "scan.png"), ((s.image + 1) * 127.5).round().astype(np.uint8))
    out = tmp_path / "out"
    assert main(["segment", "--model", str(tiny_run), str(tmp_path / "in" / "*" / "scan.png"), "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["eye0_scan_mask.png", "eye0_scan_prob.png", "eye1_scan_mask.png", "eye1_scan_prob.png",
                     "segment.csv"]
    prob = cv2.imread(str(out / "eye0_scan_prob.png"), cv2.IMREAD_UNCHANGED)
    mask = cv2.imread(str(out / "eye0_scan_mask.png"), cv2.IMREAD_UNCHANGED)
    assert prob.shape == (96, 96) and set(np.unique(mask)) <= {0, 255}
    assert ((prob >= 128) == (mask == 255)).mean() > 0.99  # the mask is the thresholded probability
    for argv, msg in ([["--model", str(tmp_path / "missing"), str(out)], "no such file"],
                      [["--model", str(tiny_run / "ckpt" / "invert.pt"), str(out)], "not a segmenter"],
                      [["--model", str(tiny_run), str(tmp_path / "nothing*.png")], "matches no image"]):
        assert main(["segment", *argv, "--out", str(tmp_path / "o2")]) == 2
        assert msg in capsys.readouterr().err
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    assert main(["segment", "--model", str(tiny_run), str(bad), "--out", str(tmp_path / "o3")]) == 2
    assert "broken.png" in capsys.readouterr().err


_REALLOC_FAULTS = """
import resource, torch
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
counts = []
for _ in range(40):  # a 64 MB tensor allocated, written and freed, as the loss's gradient per call
    f0 = faults()
    torch.empty(1 << 24).fill_(1.0)
    counts.append(faults() - f0)
print(sum(counts[20:]))
"""


def test_tuned_glibc_reuses_freed_large_blocks():
    """Under the tuned tunables a freed 64 MB tensor's memory is reused without page faults once the heap
    has grown to hold the loop's blocks (mmap_max=0 keeps every block in the heap; the 1 GB trim threshold
    keeps the heap); under plain glibc each one is a fresh mapping that faults in again (16,384 faults of
    4 KiB). Page faults on fresh memory are what made the ops' benchmark unstable in a VM that hands freed
    pages back to its host (docs/ALLOCATOR.md)."""
    import subprocess
    from vesselfast import allocator

    def faults(tunables):
        env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
        if tunables:
            env["GLIBC_TUNABLES"] = tunables
        res = subprocess.run([sys.executable, "-c", _REALLOC_FAULTS], env=env, capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        return int(res.stdout.split()[-1])
    assert faults(allocator.GLIBC_TUNABLES) < 64  # the last 20 calls: none, give or take a stray page
    assert faults(None) >= 20 * 32  # every call at least 64 MB in 2 MB pages


def test_allocator_reexec_environment(monkeypatch):
    from vesselfast import allocator

    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("VESSELFAST_ALLOCATOR_SET", raising=False)
    monkeypatch.delenv("VESSELFAST_ALLOCATOR", raising=False)
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    monkeypatch.setattr(allocator, "find_mimalloc", lambda: None)
    env = allocator.environment()
    assert allocator.plan() == "glibc-tuned" and "LD_PRELOAD" not in env
    assert "glibc.malloc.mmap_threshold=33554432" in env["GLIBC_TUNABLES"]
    assert "glibc.malloc.hugetlb=1" in env["GLIBC_TUNABLES"]  # huge pages for the heap
    monkeypatch.setattr(allocator, "find_mimalloc", lambda: "/venv/site-packages/cmeel.prefix/lib/libmimalloc.so.3")
    env = allocator.environment()
    assert env["LD_PRELOAD"].endswith("libmimalloc.so.3") and env["MIMALLOC_ALLOW_LARGE_OS_PAGES"] == "1"
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "/lib/libtcmalloc_minimal.so.4")
    assert allocator.plan() == "tcmalloc"  # installed tcmalloc first, then mimalloc, then glibc
    assert allocator.environment()["LD_PRELOAD"].endswith("libtcmalloc_minimal.so.4")
    monkeypatch.setenv("VESSELFAST_ALLOCATOR", "mimalloc")
    assert allocator.environment()["LD_PRELOAD"].endswith("libmimalloc.so.3")
    monkeypatch.setenv("VESSELFAST_ALLOCATOR", "system")
    assert allocator.environment() is None


def _target_and_source(cfg):
    """The tiny run's unlabelled target training images and its source masks' vessel fraction."""
    from vesselfast.pipeline.inputs import build_data, load_inputs

    inputs = load_inputs(cfg)
    data = build_data(cfg, cfg.seed, inputs, {f: 1.0 for f in cfg.data.source})
    return inputs.target_images, data.source_vessel_fraction()


@pytest.mark.parametrize("prior", ["estimate", "source"])
def test_calibration_matches_the_vessel_prior(tiny_run, tmp_path, prior):
    """F^k is shifted so that the share of target-training pixels at >= 0.5 equals the configured prior
    (no target label involved): baseline_histmatch's mean probability on the target training images
    (capped at the source's), or the source masks' vessel fraction inside the FOV. The anchor's figures
    are checked against its probabilities computed here."""
    from vesselfast.pipeline.calibration import marked_share
    from vesselfast.pipeline.stages import Context, segmenter_probs

    run = tiny_run
    if prior != "estimate":  # the stages before F^0 are reused from the session's run
        run = tmp_path / prior
        assert main(["train", "--preset", "tiny", "--out", str(run), "--reuse", str(tiny_run),
                     "--set", f"segmenter.vessel_prior={prior}"]) == 0
    stages = json.loads((run / "stages.json").read_text())
    targets, source = _target_and_source(resolve("tiny"))
    figures = json.loads((tiny_run / "stages.json").read_text())["vessel_fraction"]
    ctx = Context(None, RunDir(run, writer=False), 0, "cpu", 1)
    anchor = segmenter_probs(ctx, RunDir(tiny_run, writer=False).load("baseline_histmatch"), targets, "fp32", "a")
    pooled = np.concatenate([p.ravel() for p in anchor]).astype(np.float64)
    assert figures["marked_share"] == pytest.approx(float((pooled >= 0.5).mean()), abs=0.002)  # bf16 in the run
    assert figures["mean_probability"] == pytest.approx(float(pooled.mean()), abs=0.002)
    share = figures["mean_probability"]
    want = source if prior == "source" or share > source else share
    assert 0 < want < 0.5
    ctx = Context(None, RunDir(run, writer=False), 0, "cpu", 1)
    for stage in ("segmenter_0", "segmenter_1"):
        assert stages[stage]["calibration_prior"] == pytest.approx(want, abs=1e-5)
        probs = segmenter_probs(ctx, RunDir(run, writer=False).load(stage), targets, "fp32", stage)
        assert marked_share(probs, 0.5) == pytest.approx(want, abs=0.01)
    assert "calibration_prior" not in stages["baseline"]  # the baselines stay as defined
    # the self-training control is calibrated like the rounds
    assert stages["baseline_selftrain"]["calibration_prior"] == pytest.approx(want, abs=1e-5)


def test_vessel_prior_modes_and_the_cap():
    """The prior from each mode: a number, the source fraction, the estimate at most the source fraction
    (segmenter.estimate_cap), none; --set segmenter.vessel_prior=0.07 (YAML reads a float) is accepted."""
    from vesselfast.pipeline.calibration import vessel_prior

    cfg = resolve("tiny", sets=["segmenter.vessel_prior=0.07"])
    assert cfg.segmenter.vessel_prior == "0.07"
    assert vessel_prior(cfg.segmenter.vessel_prior, 0.12, None, True) == (pytest.approx(0.07), "")
    with pytest.raises(UserError, match="segmenter.vessel_prior=.*vessel fraction in \\(0, 1\\)"):
        resolve("tiny", sets=["segmenter.vessel_prior=1.5"])
    assert vessel_prior("source", 0.12, 0.3, True) == (0.12, "")
    assert vessel_prior("none", 0.12, 0.3, True) == (None, "")
    assert vessel_prior("estimate", 0.12, 0.04, True) == (0.04, "")
    capped, note = vessel_prior("estimate", 0.12, 0.9, True)
    assert capped == 0.12 and "capped" in note
    assert vessel_prior("estimate", 0.12, 0.9, False) == (0.9, "")


def test_logit_shift_hits_the_prior_on_pooled_pixels():
    """The shift makes the prior's share of the pooled pixels reach the threshold, for images of
    different sizes (brute force: apply the shift and count)."""
    import numpy as np

    from vesselfast.pipeline.calibration import logit_shift, marked_share

    rng = np.random.default_rng(0)
    probs = [rng.random((40, 50)) ** 3, rng.random((70, 30)) ** 2]
    for prior in (0.05, 0.2, 0.6):
        shift, before = logit_shift(probs, prior, 0.5)
        assert before == marked_share(probs, 0.5)
        shifted = [1 / (1 + np.exp(-(np.log(p) - np.log1p(-p) + shift))) for p in probs]
        assert marked_share(shifted, 0.5) == pytest.approx(prior, abs=2 / 4100)
    assert marked_share([np.array([[0.5, 0.4]]), np.array([[0.9, 0.9, 0.1, 0.2]])], 0.5) == pytest.approx(3 / 6)


def test_reuse_takes_unchanged_stages_and_equals_a_fresh_run(tiny_run, tmp_path, capsys):
    """--reuse: a change to the rounds' segmenter retrains nothing before it; the result equals a run
    computed from scratch with the same config; a change to G_T^0 keeps G_S only."""
    sets = ["--set", "segmenter.steps_round=7"]
    reused, fresh = tmp_path / "reused", tmp_path / "fresh"
    assert main(["train", "--preset", "tiny", "--out", str(reused), "--reuse", str(tiny_run)] + sets) == 0
    stages = json.loads((reused / "stages.json").read_text())
    before = ("pretrain_source", "pretrain_target", "invert", "synthesize_0", "segmenter_0", "baseline",
              "baseline_histmatch", "pseudo_label_1", "target_generator_1", "synthesize_1")
    assert all(stages[s]["reused_from"] == str(tiny_run) for s in before)
    assert "reused_from" not in stages["segmenter_1"]
    original = json.loads((tiny_run / "stages.json").read_text())
    assert stages["segmenter_1"]["identity"] != original["segmenter_1"]["identity"]
    assert all(stages[s]["identity"] == original[s]["identity"] for s in before)
    assert main(["train", "--preset", "tiny", "--out", str(fresh)] + sets) == 0
    assert json.loads((fresh / "metrics.json").read_text())["target_test"] == \
        json.loads((reused / "metrics.json").read_text())["target_test"]
    metrics = json.loads((reused / "metrics.json").read_text())
    assert metrics["computed_seconds"] < metrics["total_seconds"]

    other = tmp_path / "other_target"
    assert main(["train", "--preset", "tiny", "--out", str(other), "--reuse", str(tiny_run),
                 "--set", "generator.steps_target=13"]) == 0
    stages = json.loads((other / "stages.json").read_text())
    assert "reused_from" in stages["pretrain_source"] and "reused_from" in stages["baseline"]
    for s in ("pretrain_target", "synthesize_0", "segmenter_0", "pseudo_label_1", "segmenter_1"):
        assert "reused_from" not in stages[s], s

    capsys.readouterr()
    out_json = tmp_path / "cmp.json"
    assert main(["compare", str(tiny_run), str(reused), str(other), "--json", str(out_json),
                 "--plot", str(tmp_path / "cmp.png")]) == 0
    table = capsys.readouterr().out
    assert "segmenter.steps_round=7" in table and "generator.steps_target=13" in table and "(reference)" in table
    data = json.loads(out_json.read_text())
    assert [r["name"] for r in data["runs"]] == ["run", "reused", "other_target"]
    assert data["runs"][1]["metrics"]["iter0"]["dsc"] == data["runs"][0]["metrics"]["iter0"]["dsc"]
    assert (tmp_path / "cmp.png").stat().st_size > 0
    assert "generator training min" in table and data["runs"][0]["profile"]["generator training"] > 0


def test_profile_sorts_every_stage_into_one_kind():
    """keys.profile against sums written out by hand."""
    from vesselfast.pipeline.keys import KINDS, profile

    stages = {"survey": {"seconds": 5}, "pretrain_source": {"seconds": 100}, "pretrain_target": {"seconds": 90},
              "target_generator_1": {"seconds": 30}, "invert": {"seconds": 7}, "synthesize_0": {"seconds": 11},
              "baseline": {"seconds": 20}, "baseline_histmatch": {"seconds": 25, "inference_seconds": 4},
              "segmenter_0": {"seconds": 22, "inference_seconds": 3}, "pseudo_label_1": {"seconds": 2},
              "selftrain_pseudo_label_1": {"seconds": 2}, "baseline_selftrain": {"seconds": 9, "inference_seconds": 1}}
    got = profile(stages, evaluation_seconds=6)
    assert list(got) == list(KINDS)
    assert got == {"survey": 5, "generator training": 220, "inversion and synthesis": 18,
                   "segmenter training": 20 + 21 + 19 + 8, "inference": 4 + 3 + 1 + 2 + 2 + 6}


def test_diagnostics_per_round(tiny_run):
    """The paper's diagnostics: intensity distance of each round's synthetic images to the real target
    crops (the source crops as reference) and the pseudo-labels' positive share."""
    diag = json.loads((tiny_run / "metrics.json").read_text())["diagnostics"]
    assert set(diag) == {"source", "iter0", "iter1"}
    for entry in diag.values():
        assert entry["hist_euclidean"] >= 0 and 0 <= entry["hist_cosine"] <= 1
    stages = json.loads((tiny_run / "stages.json").read_text())
    assert diag["iter1"]["pseudo_label_share"] == stages["pseudo_label_1"]["marked_share"]
    assert "pseudo-label share" in (tiny_run / "report.md").read_text()
    assert (tiny_run / "diagnostics.png").stat().st_size > 0


def test_reuse_errors(tmp_path, capsys):
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "x"), "--reuse", str(tmp_path / "nothing")]) == 2
    assert "--reuse" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_a_rounds_only_key_reuses_the_inversion(tiny_run, tmp_path):
    """The rounds' sampler settings are not part of the inversion's (or Iter-0's) identity: changing
    synthesis.noise_steps reuses everything up to F^0 and recomputes the rounds' synthesis."""
    out = tmp_path / "noise_steps"
    assert main(["train", "--preset", "tiny", "--out", str(out), "--reuse", str(tiny_run),
                 "--set", "synthesis.noise_steps=4"]) == 0
    stages = json.loads((out / "stages.json").read_text())
    for name in ("pretrain_source", "pretrain_target", "invert", "synthesize_0", "segmenter_0", "pseudo_label_1",
                 "target_generator_1"):
        assert stages[name]["reused_from"] == str(tiny_run), name
    for name in ("synthesize_1", "segmenter_1"):
        assert "reused_from" not in stages[name], name
    assert stages["synthesize_1"]["unet_evals_per_image"] == 4


def test_a_stage_reads_only_its_declared_config_slice():
    from vesselfast.pipeline.cache import ConfigSlice, UndeclaredConfigKey, stage_identity
    from vesselfast.pipeline.config import to_dict

    cfg = to_dict(resolve("tiny"))
    view = ConfigSlice(cfg, ("generator.lr", "generator.channel_mult"))
    assert view.generator.lr == cfg["generator"]["lr"] and view.generator.channel_mult == (1, 2)
    with pytest.raises(UndeclaredConfigKey, match="generator.batch_size"):
        view.generator.batch_size
    with pytest.raises(UndeclaredConfigKey, match="'segmenter'"):
        view.segmenter
    with pytest.raises(AttributeError, match="read-only"):
        view.generator = 1
    other = dict(cfg, generator=dict(cfg["generator"], batch_size=99))  # a key outside the slice
    assert stage_identity("s", 0, view, {}) == stage_identity("s", 0, ConfigSlice(other, view.values()), {})
    changed = dict(cfg, generator=dict(cfg["generator"], lr=1.0))
    assert stage_identity("s", 0, view, {}) != stage_identity("s", 0, ConfigSlice(changed, view.values()), {})


@pytest.mark.parametrize("old,new", [("synthesis.ddim_steps=5", "synthesis.noise_steps"),
                                     ("segmenter.calibrate=source", "segmenter.vessel_prior"),
                                     ("segmenter.self_train=0.3", "lost its ablation"),
                                     ("data.crops_inside_fov=true", "removed")])
def test_retired_config_keys_are_refused_with_the_new_name(tmp_path, capsys, old, new):
    out = tmp_path / "never"
    assert main(["train", "--preset", "tiny", "--out", str(out), "--set", old]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and old.split("=")[0] in err[0] and new in err[0]
    assert not out.exists()


def test_baselines_false_means_no_baselines(tiny_run, tmp_path):
    """baselines: false evaluates no baseline; baseline_histmatch is trained only when the vessel-fraction
    estimate needs it (vessel_prior=estimate), not with a fixed prior."""
    out = tmp_path / "fixed"
    assert main(["train", "--preset", "tiny", "--out", str(out), "--reuse", str(tiny_run),
                 "--set", "baselines=false", "--set", "segmenter.vessel_prior=0.1"]) == 0
    stages = json.loads((out / "stages.json").read_text())
    assert "baseline" not in stages and "baseline_histmatch" not in stages
    assert set(json.loads((out / "metrics.json").read_text())["target_test"]) == {"iter0", "iter1"}
    assert stages["segmenter_1"]["calibration_prior"] == pytest.approx(0.1)
    out = tmp_path / "estimate"
    assert main(["train", "--preset", "tiny", "--out", str(out), "--reuse", str(tiny_run),
                 "--set", "baselines=false"]) == 0
    stages = json.loads((out / "stages.json").read_text())
    assert "baseline_histmatch" in stages and "vessel_fraction" in stages and "baseline" not in stages
    assert set(json.loads((out / "metrics.json").read_text())["target_test"]) == {"iter0", "iter1"}


def test_stage_and_metric_key_names():
    """keys.py is the one place that maps stages to metric keys and finds the last round."""
    from vesselfast.pipeline.keys import final_key, final_stage, metric_key, model_order

    assert [metric_key(s) for s in ("baseline", "baseline_histmatch", "baseline_selftrain", "segmenter_0",
                                    "segmenter_12", "invert", "pseudo_label_1", "segmenter_1.partial", "selftrain_1",
                                    "selftrain_pseudo_label_1")] == \
        ["baseline", "baseline_histmatch", "baseline_selftrain", "iter0", "iter12", None, None, None, None, None]
    assert final_stage(["segmenter_0", "segmenter_10", "segmenter_2", "segmenter_3.partial", "baseline"]) == "segmenter_10"
    assert final_stage(["baseline"]) == "" and final_key(["iter0", "iter2", "iter10", "baseline"]) == "iter10"
    assert sorted(["iter10", "iter2", "baseline_histmatch", "source", "baseline_selftrain", "baseline", "iter0"],
                  key=model_order) == \
        ["source", "baseline", "baseline_histmatch", "baseline_selftrain", "iter0", "iter2", "iter10"]


def test_selftrain_control_is_the_rounds_on_pseudo_labelled_target_crops(tiny_run, tmp_path):
    """baseline_selftrain: round 1 pseudo-labels are the anchor's marks on the real target training images
    (the same pooled share), its training set is pseudo-labelled real target crops (not the synthetic pairs),
    it is fine-tuned from the anchor with the rounds' budget, and with two rounds the last round carries the
    name while the first (selftrain_1) feeds it."""
    import numpy as np
    import torch

    from vesselfast.pipeline.inputs import load_samples

    run = RunDir(tiny_run, writer=False)
    stages = run.stages()
    assert stages["selftrain_pseudo_label_1"]["marked_share"] == pytest.approx(
        stages["vessel_fraction"]["marked_share"], abs=1e-5)  # both rounded to 5 digits
    assert stages["baseline_selftrain"]["steps"] == resolve("tiny").segmenter.steps_round
    pseudo = run.load("selftrain_pseudo_label_1")
    # the crops are real target images: each one occurs in a target training image
    cfg = resolve("tiny")
    train = load_samples(cfg, [cfg.data.target], "target", "train", False, seed=cfg.seed)
    crop = pseudo["images"][0, 0].numpy()
    c = crop.shape[0]
    found = any(np.allclose(s.image[i:i + c, j:j + c], crop)
                for s in train for i in range(s.image.shape[0] - c + 1) for j in range(s.image.shape[1] - c + 1))
    assert found
    assert set(torch.unique(pseudo["masks"]).tolist()) <= {0.0, 1.0}
    # fine-tuned from the anchor: far closer to its weights than the control trained from scratch
    fresh = tmp_path / "fresh"
    assert main(["train", "--preset", "tiny", "--out", str(fresh), "--reuse", str(tiny_run),
                 "--set", "segmenter.finetune=false"]) == 0
    anchor = run.load("baseline_histmatch")["model"]

    def distance(state):  # over the convolution weights (not the norm statistics or the calibrated bias)
        return sum(float((state[k] - anchor[k]).pow(2).sum()) for k in anchor if anchor[k].dim() == 4) ** 0.5
    assert distance(run.load("baseline_selftrain")["model"]) < 0.5 * distance(
        RunDir(fresh, writer=False).load("baseline_selftrain")["model"])

    two = tmp_path / "two_rounds"
    assert main(["train", "--preset", "tiny", "--out", str(two), "--reuse", str(tiny_run), "--set", "rounds=2"]) == 0
    st = RunDir(two, writer=False).stages()
    assert {"selftrain_pseudo_label_1", "selftrain_1", "selftrain_pseudo_label_2", "baseline_selftrain"} <= set(st)
    assert st["selftrain_pseudo_label_1"]["reused_from"] == str(tiny_run)
    assert "baseline_selftrain" in json.loads((two / "metrics.json").read_text())["target_test"]


def test_unlabelled_target_folder_trains_and_evaluates_nothing(tmp_path, capsys):
    """A user's own scans (a flat folder of images, no labels, no --target-test): the run trains every
    stage and reports that nothing was evaluated instead of refusing; export still works."""
    import cv2

    from vesselfast.data.synthetic import raw_pair

    scans = tmp_path / "my_scans"
    scans.mkdir()
    for i in range(4):
        cv2.imwrite(str(scans / f"scan{i}.png"), raw_pair("target", "train", i, 96)[0])
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--target", str(scans), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "not evaluated (no labelled test images)" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["target_test"] == {} and "segmenter_1" in metrics["stages"]
    assert "no labelled test images" in (out / "train.log").read_text()
    assert "not evaluated (no labelled test images" in (out / "report.md").read_text()
    assert main(["export", "--onnx", "--run", str(out), "--out", str(tmp_path / "mine.onnx")]) == 0

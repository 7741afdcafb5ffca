"""Fault tolerance on the tiny preset: SIGKILL / Ctrl-C at points of every kind of stage and a resume that
ends with exactly the metrics of the uninterrupted run (the session's ``tiny_run``), a refused second
concurrent run, disk full in the middle of a run, NaN/Inf losses, atomic writes, and safe loading.

Crashes are deterministic: ``VESSELFAST_TEST_KILL_AT=POINT`` makes the process signal itself when it
reaches POINT (vesselfast/testhooks.py lists the points)."""
import errno
import json
import os
import pickle
import re
import signal
import subprocess
import sys

import pytest
import torch

from vesselfast.cli import main
from vesselfast.errors import UserError
from vesselfast import checkpoint
from vesselfast.pipeline.config import resolve
from vesselfast.pipeline.loop import NonFiniteLoss, run_training
from vesselfast.pipeline.launch import run_pipeline
from vesselfast.checkpoint import atomic_write, load_checkpoint
from vesselfast.pipeline.rundir import RunDir

TIMEOUT = 180


def _as_in_a_terminal():
    """Ctrl-C reaches a command run in a terminal; a job that a non-interactive shell starts with ``&``
    inherits SIGINT ignored (POSIX), and Python keeps an inherited SIG_IGN. Pytest itself may be such a
    job, so the child restores the default: the Ctrl-C test then tests Ctrl-C, however pytest was started."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def train(out, kill_at=None, signal_name="KILL", wait=True):
    """``python -m vesselfast train --preset tiny --out OUT`` in a subprocess, with the thread count of
    the in-process reference run (conftest), so the numbers can be compared bit for bit."""
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), VESSELFAST_TEST_KILL_SIGNAL=signal_name)
    env.pop("VESSELFAST_TEST_KILL_AT", None)
    if kill_at:
        env["VESSELFAST_TEST_KILL_AT"] = kill_at
    proc = subprocess.Popen([sys.executable, "-m", "vesselfast", "train", "--preset", "tiny", "--out", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_as_in_a_terminal)
    if not wait:
        return proc
    stdout, stderr = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, stdout, stderr


def target_test(run):
    return json.loads((run / "metrics.json").read_text())["target_test"]


def stray_files(run):
    return sorted(p.name for p in run.rglob("*.tmp"))


@pytest.mark.slow
def test_kills_at_every_kind_of_point_then_resume_gives_identical_metrics(tiny_run, tmp_path):
    """One run directory, killed again and again, each re-run getting further: inside a training stage
    after an in-stage checkpoint, in the middle of a checkpoint write, between a stage's checkpoint and
    its done-mark, Ctrl-C while metrics.json is written, inside a fine-tuning stage before its first
    checkpoint, at a stage start; then a run paused (SIGSTOP) while holding the directory, a second run
    refused, and the paused one continued to the end."""
    out = tmp_path / "run"

    rc, _, _ = train(out, "pretrain_source:11")
    assert rc == -signal.SIGKILL
    assert load_checkpoint(out / "ckpt" / "pretrain_source.partial.pt")["step"] == 10

    rc, _, err = train(out, "write:invert.pt")
    assert rc == -signal.SIGKILL and "resuming at step 10/12" in err
    assert not (out / "ckpt" / "invert.pt").exists() and stray_files(out)  # killed mid-write

    rc, _, _ = train(out, "segmenter_0:saved")
    assert rc == -signal.SIGKILL and not stray_files(out)  # the re-open removed the killed write's temp file
    assert (out / "ckpt" / "segmenter_0.pt").exists() and "segmenter_0" not in RunDir(out).stages()

    rc, _, err = train(out, "write:metrics.json", "INT")
    assert rc == 130 and err.strip().splitlines()[-1] == "vesselfast: interrupted; re-run the same command to resume"
    assert not stray_files(out) and "segmenter_0" in RunDir(out).stages()

    rc, _, _ = train(out, "target_generator_1:3")  # ckpt_every=10 > 6 steps: restarts from step 0
    assert rc == -signal.SIGKILL and not (out / "ckpt" / "target_generator_1.partial.pt").exists()

    rc, _, _ = train(out, "segmenter_1:start")
    assert rc == -signal.SIGKILL and "target_generator_1" in RunDir(out).stages()

    paused = train(out, "segmenter_1:start", "STOP", wait=False)
    try:
        _, status = os.waitpid(paused.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status)
        rc, _, err = train(out)
        assert rc == 2, err
        assert err.strip() == (f"vesselfast: error: {out}: another vesselfast run is using this directory "
                               "(locked); wait for it or choose another --out")
    finally:
        paused.send_signal(signal.SIGCONT)
    stdout, stderr = paused.communicate(timeout=TIMEOUT)
    assert paused.returncode == 0, stderr
    assert "done:" in stdout

    assert target_test(out) == target_test(tiny_run)  # every metric, every test image, bit for bit
    assert not stray_files(out) and not list(out.glob("ckpt/*.partial.pt"))
    log = (out / "train.log").read_text()
    assert log.count("starting run") == 1 and log.count("resuming run") == 6


def test_disk_full_in_a_stage_then_resume(tiny_run, tmp_path, monkeypatch):
    """ENOSPC while the inversion's checkpoint is written: one clear error naming that file, no partial
    or temp file, earlier stages intact; after space is freed the re-run ends like the uninterrupted run."""
    out = tmp_path / "run"
    real_save = checkpoint.torch.save

    def save_until_full(obj, fh):
        if obj.get("kind") == "invert":
            fh.write(b"\0" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, fh)

    cfg = resolve("tiny")
    with monkeypatch.context() as mp:
        mp.setattr(checkpoint.torch, "save", save_until_full)
        with pytest.raises(UserError) as exc:
            run_pipeline(cfg, str(out))
    assert str(exc.value) == (f"{out / 'ckpt' / 'invert.pt'}: cannot write (No space left on device); the disk "
                              "is full: free space, then re-run the same command to resume")
    assert not stray_files(out) and not (out / "ckpt" / "invert.pt").exists()
    # the stages before the inversion: survey, baselines, both generators
    assert set(RunDir(out).stages()) == {"survey", "baseline_histmatch", "vessel_fraction", "baseline", "pretrain_source",
                                         "pretrain_target"}
    load_checkpoint(out / "ckpt" / "pretrain_target.pt", kind="pretrain_target")
    run_pipeline(cfg, str(out))
    assert target_test(out) == target_test(tiny_run)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--preset", "tiny", "--set", "generator.lr=1e30", "--set", "ckpt_every=1", "--out", str(out)])
    # the run's progress lines ("[vesselfast] ...") reach this stderr only when this test is the process's
    # first run (the console handler binds the stderr of its time); the error is one line either way
    err = "\n".join(ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith("[vesselfast] "))
    assert rc == 2 and len(err.splitlines()) == 1, err
    partial = out / "ckpt" / "pretrain_source.partial.pt"
    assert re.fullmatch(
        rf"vesselfast: error: pretrain_source: loss is (nan|inf) at step 2; stopped, the last good in-stage "
        rf"checkpoint {re.escape(str(partial))} \(step 1\) is kept\. Lower the learning rate .*", err), err
    ck = load_checkpoint(partial, kind="pretrain_source.partial")
    assert ck["step"] == 1 and all(torch.isfinite(t).all() for t in ck["state"]["model"].values())
    assert "pretrain_source" not in RunDir(out).stages()


class Blowup(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    """A step can report a finite loss and still leave infinite weights: the checkpoint due after it is
    not written, the previous one stays, and the error says so."""
    run = RunDir(tmp_path / "run")
    model = Blowup()

    def step(i):
        with torch.no_grad():
            model.w += 1 if i < 4 else float("inf")  # step 5 (index 4) breaks the weights
        return torch.tensor(1.0)

    with pytest.raises(NonFiniteLoss, match=r"toy: the weights became non-finite at step 6; stopped, the last "
                                            r"good in-stage checkpoint .*toy\.partial\.pt \(step 3\) is kept"):
        run_training(step, 10, {"model": model}, torch.Generator(), "toy", run, "toy", ckpt_every=3)
    ck = load_checkpoint(run.partial_path("toy"), kind="toy.partial")
    assert ck["step"] == 3 and torch.equal(ck["state"]["model"]["w"], torch.full((3,), 4.0))


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write(target, lambda fh: fh.write("old"), "w")

    def half_then_fail(fh):
        fh.write("new but incompl")
        raise KeyboardInterrupt  # Ctrl-C in the middle of a write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_fail, "w")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    assert target.stat().st_mode & 0o044 == 0o044 & ~checkpoint._UMASK  # group/others may read results


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("fmt", ["torch_zip", "plain_pickle"])
def test_loading_never_runs_code_from_a_file(tmp_path, fmt):
    marker = tmp_path / "PAYLOAD_RAN"
    evil = tmp_path / "evil.pt"
    payload = {"vesselfast_format": 1, "kind": "segmenter_0", "model": RunsCode(marker)}
    if fmt == "torch_zip":
        torch.save(payload, evil)
        expect = r"refused to load: the file would run code .*GLOBAL posix\.system"
    else:
        evil.write_bytes(pickle.dumps(payload, protocol=4))
        expect = "not a readable vesselfast checkpoint"
    pickle.loads(pickle.dumps(RunsCode(tmp_path / "control")))  # the payload is live: plain pickle runs it
    assert (tmp_path / "control").exists()
    with pytest.raises(UserError, match=expect):
        load_checkpoint(evil)
    assert not marker.exists()


def test_foreign_and_mislabelled_checkpoints(tiny_run, tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "foreign.pt")
    with pytest.raises(UserError, match=r"foreign\.pt: not a vesselfast checkpoint \(no vesselfast_format key\)"):
        load_checkpoint(tmp_path / "foreign.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(UserError, match=r"text\.pt: not a readable vesselfast checkpoint \(truncated or foreign"):
        load_checkpoint(tmp_path / "text.pt")
    run = RunDir(tmp_path / "run")  # one stage's file copied over another's
    run.ckpt.mkdir(parents=True)
    (run.ckpt / "invert.pt").write_bytes((tiny_run / "ckpt" / "segmenter_0.pt").read_bytes())
    with pytest.raises(UserError, match="holds a 'segmenter_0' checkpoint, expected 'invert'; delete it to recompute"):
        run.load("invert")


def test_kill_point_refuses_an_ignored_signal(monkeypatch):
    """A process that inherited SIGINT ignored (a job a non-interactive shell started with `&`) would drop
    the simulated Ctrl-C and finish normally: the hook says so instead of passing silently."""
    from vesselfast import testhooks

    monkeypatch.setenv(testhooks.KILL_AT, "somewhere")
    monkeypatch.setenv(testhooks.KILL_SIGNAL, "INT")
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with pytest.raises(RuntimeError, match="SIGINT is ignored in this process"):
            testhooks.kill_point("somewhere")
    finally:
        signal.signal(signal.SIGINT, previous)

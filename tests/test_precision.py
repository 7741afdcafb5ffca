"""Precision ``auto``: the picker with the hardware mocked both ways (CPU with and without native BF16,
CUDA with and without bf16), the resolved value's round trip through config.yaml (also across machines
on resume), the emulation warning, and the refusals."""
import json
import logging

import pytest
import torch
import yaml

from vesselfast import hardware
from vesselfast.cli import main
from vesselfast.errors import UserError
from vesselfast.models.precision import GradScaling
from vesselfast.pipeline.config import dump, from_dict, resolve, settle_precision


@pytest.fixture
def cpu_native(monkeypatch):
    """Set whether this 'CPU' executes bf16 natively."""
    def set_native(native: bool):
        why = "native BF16 (AVX512_BF16)" if native else "no AVX512_BF16 or AMX: oneDNN would emulate bf16"
        monkeypatch.setattr(hardware, "native_bf16_cpu", lambda: (native, why))
    return set_native


def test_cpu_picker_follows_native_bf16(cpu_native):
    cpu_native(True)
    assert hardware.resolve_precision("auto", "cpu")[0] == "bf16"
    cpu_native(False)
    precision, why = hardware.resolve_precision("auto", "cpu")
    assert precision == "fp32" and "emulate" in why and hardware.cpu_model() in why
    for explicit in ("fp32", "bf16"):
        assert hardware.resolve_precision(explicit, "cpu") == (explicit, "set explicitly")
    with pytest.raises(ValueError, match="precision must be one of"):
        hardware.resolve_precision("int8", "cpu")


@pytest.mark.parametrize("onednn,avx512_bf16,amx,machine,native", [
    (True, True, False, "x86_64", True),     # Zen 4/5, Cooper Lake
    (True, False, True, "x86_64", True),     # Sapphire Rapids: AMX
    (True, False, False, "x86_64", False),   # Skylake-X / Cascade Lake: AVX-512 without BF16
    (False, False, False, "x86_64", False),  # AVX2 only (Zen 3, Haswell...), or ONEDNN_MAX_CPU_ISA capped
    (True, False, False, "aarch64", True),   # ARM with bf16 (oneDNN's own check covers it)
    (False, False, False, "aarch64", False),
])
def test_native_bf16_uses_torch_checks(monkeypatch, onednn, avx512_bf16, amx, machine, native):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(hardware.platform, "machine", lambda: machine)
    hardware.native_bf16_cpu.cache_clear()
    try:
        assert hardware.native_bf16_cpu()[0] is native
    finally:
        hardware.native_bf16_cpu.cache_clear()


@pytest.mark.parametrize("bf16,capability,want", [(True, (9, 0), "bf16"), (False, (7, 5), "fp16"),
                                                   (False, (6, 1), "fp32")])
def test_cuda_picker(monkeypatch, bf16, capability, want):
    monkeypatch.setattr(hardware, "cuda_bf16", lambda device: bf16)
    monkeypatch.setattr(hardware, "_cuda_capability", lambda device: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    precision, why = hardware.resolve_precision("auto", "cuda")
    assert precision == want and "Test GPU" in why


def test_auto_resolves_into_the_saved_config(cpu_native):
    cpu_native(False)
    cfg = resolve("tiny")
    assert cfg.generator.precision == "auto" and cfg.segmenter.precision == "auto"
    text, warning = settle_precision(cfg)
    assert (cfg.generator.precision, cfg.segmenter.precision) == ("fp32", "fp32") and warning is None
    assert "precision generator fp32, segmenter fp32" in text
    again = from_dict(yaml.safe_load(dump(cfg)))  # what a resume reads back
    assert (again.generator.precision, again.segmenter.precision) == ("fp32", "fp32")


def test_resume_keeps_the_precision_it_started_with(cpu_native):
    """A run started with bf16 on a native machine, resumed on one without: it keeps bf16 (the config
    must match) and says that it runs emulated here."""
    cpu_native(True)
    started = resolve("tiny")
    settle_precision(started)
    saved = yaml.safe_load(dump(started))
    cpu_native(False)
    cfg = resolve("tiny")
    text, warning = settle_precision(cfg, saved)
    assert dump(cfg) == dump(started)
    assert "kept from the run's start" in text
    assert warning.count("\n") == 0 and "emulated" in warning and "keeps it" in warning


def test_explicit_bf16_without_native_support_warns_once(cpu_native):
    cpu_native(False)
    cfg = resolve("tiny", sets=["generator.precision=bf16", "segmenter.precision=bf16"])
    text, warning = settle_precision(cfg)
    assert cfg.generator.precision == "bf16" and "set explicitly" in text
    assert "\n" not in warning and "emulated" in warning
    assert "--set generator.precision=auto" in warning and "--set segmenter.precision=auto" in warning
    cpu_native(True)
    assert settle_precision(resolve("tiny", sets=["generator.precision=bf16"]))[1] is None


def test_run_log_names_precision_and_warns(tiny_run, tmp_path, cpu_native, caplog):
    """The first log line names the resolved precision; a run resumed on a CPU without native BF16 keeps
    its saved precision and logs one warning."""
    first = (tiny_run / "train.log").read_text().splitlines()[0]
    saved = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert f"precision generator {saved['generator']['precision']}" in first
    assert saved["generator"]["precision"] in ("fp32", "bf16")
    if saved["generator"]["precision"] != "bf16":
        pytest.skip("this machine resolved auto to fp32: the cross-machine warning needs a bf16 run")
    cpu_native(False)
    with caplog.at_level(logging.WARNING, logger="vesselfast"):
        assert main(["train", "--preset", "tiny", "--out", str(tiny_run)]) == 0  # resumes: everything done
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "emulated" in warnings[0]


def test_fp16_on_cpu_is_refused(tiny_run, tmp_path, capsys):
    with pytest.raises(UserError, match="generator.precision=fp16 needs a GPU"):
        resolve("tiny", sets=["generator.precision=fp16"])
    with pytest.raises(UserError, match="use auto, fp32, bf16 or fp16"):
        resolve("tiny", sets=["segmenter.precision=half"])
    assert main(["segment", "--model", str(tiny_run), str(tiny_run / "pictures" / "round0.png"),
                 "--out", str(tmp_path / "o"), "--precision", "fp16"]) == 2
    assert "--precision fp16 needs a GPU" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_segment_warns_about_emulated_bf16(tiny_run, tmp_path, cpu_native, capsys):
    cpu_native(False)
    out = tmp_path / "o"
    assert main(["segment", "--model", str(tiny_run), str(tiny_run / "pictures" / "round0.png"),
                 "--out", str(out), "--precision", "bf16"]) == 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert len(err) == 1 and "--precision bf16" in err[0] and "--precision auto" in err[0]


def test_info_names_cpu_capability_and_auto(capsys):
    assert main(["info", "--json"]) == 0
    hw = json.loads(capsys.readouterr().out)["hardware"]
    assert hw["cpu_model"] == hardware.cpu_model() and hw["cpu_capability"]
    assert hw["auto_cpu"] == ("bf16" if hw["native_bf16"] else "fp32")


def test_grad_scaling_only_for_fp16():
    """fp32 / bf16 train without a scaler (and checkpoint nothing extra); fp16 would scale (GPU only)."""
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for precision in ("fp32", "bf16", "auto"):
        scaling = GradScaling(precision, "cpu")
        assert scaling.scaler is None and scaling.state() == {}
    before = model.weight.detach().clone()
    loss = model(torch.ones(2, 3)).sum()
    opt.zero_grad()
    GradScaling("fp32", "cpu").backward_step(loss, opt)
    assert torch.allclose(model.weight, before - 0.1 * 2 * torch.ones(1, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 gradient scaling needs a GPU")
@pytest.mark.cuda
def test_grad_scaling_fp16_on_cuda():
    scaling = GradScaling("fp16", "cuda")
    assert scaling.scaler is not None and "scaler" in scaling.state()

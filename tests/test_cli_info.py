import json
import subprocess
import sys

from vesselfast.cli import main


def test_info_json_schema(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["extension"]["cpu"] is True  # the suite runs on an install with the C++ extension
    assert isinstance(info["extension"]["cuda"], bool)
    for op in ("ddim_step", "ddim_inverse_step", "ddpm_step", "vessel_noise_loss"):
        assert info["ops"][op]["auto_cpu"] == "cpu"
        assert {"cpu", "torch"} <= set(info["ops"][op]["available"])
    import onnxruntime
    assert info["runtimes"]["onnxruntime_providers"] == onnxruntime.get_available_providers()
    assert "CPUExecutionProvider" in info["runtimes"]["onnxruntime_providers"]


def test_closed_pipe_is_not_an_error():
    """`vesselfast info | true`: the reader is gone before anything is written; no traceback, exit 0."""
    proc = subprocess.run(f"{sys.executable} -m vesselfast info | true", shell=True, capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr


def test_info_text_and_python_m(monkeypatch):
    out = subprocess.run([sys.executable, "-m", "vesselfast", "info"], capture_output=True, text=True, check=True).stdout
    assert "extension vesselfast._C: cpu=built" in out and "ddim_step" in out
    env_forced = subprocess.run([sys.executable, "-m", "vesselfast", "info", "--json"], capture_output=True, text=True,
                                env={**__import__("os").environ, "VESSELFAST_BACKEND": "torch"}, check=True).stdout
    assert json.loads(env_forced)["ops"]["ddim_step"]["auto_cpu"] == "torch"


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "info" in capsys.readouterr().out

"""Compile checks of the GPU kernels on a machine without a GPU (what CI can prove about them).

- The raw CUDA sources (csrc/cuda/*.cu) compile with nvcc to object files for sm_80 and sm_90, with the
  flags setup.py uses in CUDA builds. Skipped, with the reason, when nvcc is not installed.
- The Triton kernels compile to PTX and a cubin for sm_90 through ``triton.compile(ASTSource(...),
  target=GPUTarget("cuda", 90, 32))`` (no driver needed), for every dtype and constexpr variant the
  launchers use.
What runs on CPU is tested in tests/test_ops_backends.py (Triton interpreter, shared step_math.h).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CU_FILES = sorted((REPO / "csrc" / "cuda").glob("*.cu"))


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    cand = Path(home) / "bin" / "nvcc"
    return str(cand) if cand.exists() else None


def test_cuda_sources_exist():
    names = {p.name for p in CU_FILES}
    assert {"diffusion_step_kernels.cu", "vessel_loss_kernels.cu"} <= names


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("src", CU_FILES, ids=lambda p: p.name)
def test_nvcc_compiles_cuda_kernels(src, arch, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (install a CUDA toolkit or set CUDA_HOME) - CUDA sources not compiled")
    obj = tmp_path / (src.stem + ".o")
    # setup.py's nvcc flags plus the ones torch's CUDAExtension adds (no implicit half/bfloat16
    # conversions or operators: the kernels must use the explicit intrinsics).
    cmd = [nvcc, "-c", f"-arch={arch}", "-std=c++17", "-O3", "--use_fast_math", "-fmad=false",
           "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
           "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr",
           "-Werror", "all-warnings", "-I", str(REPO / "csrc" / "include"), str(src), "-o", str(obj)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"
    assert obj.stat().st_size > 0
    # The launchers the torch glue (ops_cuda.cpp) calls are defined with external linkage.
    nm = shutil.which("nm")
    if nm:
        syms = subprocess.run([nm, "-C", "--defined-only", str(obj)], capture_output=True, text=True).stdout
        wanted = {"diffusion_step_kernels": ["vesselfast::cuda::launch_diffusion_step("],
                  "vessel_loss_kernels": ["vesselfast::cuda::launch_vessel_loss_fwd(",
                                          "vesselfast::cuda::launch_vessel_loss_bwd(",
                                          "vesselfast::cuda::vessel_loss_workspace_bytes("]}[src.stem]
        for sym in wanted:
            assert sym in syms, f"{sym} not defined in {obj.name}"


def test_cuda_sources_include_no_torch_headers():
    """The .cu files must compile without a CUDA build of torch (docs/BENCHMARKS.md, "Building kernels without a GPU")."""
    for src in CU_FILES + [REPO / "csrc" / "include" / "vesselfast" / "cuda_launchers.h"]:
        text = src.read_text()
        for bad in ("<torch/", "<ATen/", "<c10/", "\"torch/", "\"ATen/", "\"c10/"):
            assert bad not in text, f"{src.name} includes {bad}"


# ------------------------------------------------------------------------------------------------
# Triton -> PTX / cubin for sm_90 without a GPU
# ------------------------------------------------------------------------------------------------
# The compiles run in a fresh interpreter: once Triton's CPU interpreter has run kernels in a process
# (tests/test_ops_backends.py does), triton.language is left patched and later compiles fail there.
_COMPILE_SCRIPT = r"""
import itertools, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vesselfast.kernels import diffusion_step as ds, vessel_loss as vl

def compile_one(kernel, signature, constexprs):
    sig = dict(signature)
    sig.update({k: "constexpr" for k in constexprs})
    k = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs),
                       target=GPUTarget("cuda", 90, 32))
    return {"kernel": kernel.__name__, "constexprs": {k: str(v) for k, v in constexprs.items()},
            "sm90": ".target sm_90" in k.asm["ptx"], "entry": f".entry {kernel.__name__}" in k.asm["ptx"],
            "cubin_bytes": len(k.asm["cubin"])}

out = []
for ty in ("fp32", "bf16", "fp16"):
    p = "*" + ty
    sig = {"x_ptr": p, "eps_ptr": p, "z_ptr": p, "coef_ptr": "*fp32", "out_ptr": p, "x0_ptr": p, "per_sample": "i32"}
    # every flag combination in float32, the all-on variant in the other dtypes (keeps CI fast)
    combos = list(itertools.product([True, False], repeat=4)) if ty == "fp32" else [(True,) * 4]
    for clip, use_eps, noise, x0 in combos:
        out.append(compile_one(ds.diffusion_step_kernel, sig, {"CLIP": clip, "USE_EPS": use_eps,
                   "HAS_NOISE": noise, "NEED_X0": x0, "BLOCK": ds.GPU_BLOCK}))
    for has_w in (True, False):
        out.append(compile_one(vl._partial_kernel, {"eps_ptr": p, "hat_ptr": p, "w_ptr": p, "part_ptr": "*fp32",
                   "n": "i32", "nblocks": "i32"}, {"HAS_W": has_w, "BLOCK": ds.GPU_BLOCK}))
        out.append(compile_one(vl._backward_kernel, {"g_ptr": "*fp32", "sumw_ptr": "*fp32", "eps_ptr": p,
                   "hat_ptr": p, "w_ptr": p, "out_ptr": p, "n": "i32", "inv_n_half": "fp32"},
                   {"HAS_W": has_w, "BLOCK": ds.GPU_BLOCK}))
out.append(compile_one(vl._finalize_kernel, {"part_ptr": "*fp32", "loss_ptr": "*fp32", "sumw_ptr": "*fp32",
           "nblocks": "i32", "inv_n_half": "fp32"}, {"BLOCK": vl.FINAL_BLOCK}))
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def triton_sm90_builds():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


@pytest.mark.parametrize("kernel", ["diffusion_step_kernel", "_partial_kernel", "_finalize_kernel",
                                    "_backward_kernel"])
def test_triton_kernels_compile_sm90(triton_sm90_builds, kernel):
    builds = [b for b in triton_sm90_builds if b["kernel"] == kernel]
    assert builds, f"{kernel} was not compiled"
    expected = {"diffusion_step_kernel": 16 + 2, "_partial_kernel": 6, "_finalize_kernel": 1,
                "_backward_kernel": 6}[kernel]
    assert len(builds) == expected
    for b in builds:
        assert b["sm90"] and b["entry"], b
        assert b["cubin_bytes"] > 1000, b

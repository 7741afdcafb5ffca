"""Compile checks of the GPU kernels on a machine without a GPU (what CI can prove about them).

- The raw CUDA sources (csrc/cuda/*.cu) compile with nvcc to object files for sm_80 and sm_90, with the
  flags setup.py uses in CUDA builds. Skipped, with the reason, when nvcc is not installed.
- The Triton kernels compile to PTX and a cubin for sm_90 through ``triton.compile(ASTSource(...),
  target=GPUTarget("cuda", 90, 32))`` (no driver needed), for every dtype and constexpr variant the
  launchers use.
What runs on CPU is tested in tests/test_ops_backends.py (Triton interpreter, shared step_math.h).
"""
from __future__ import annotations

import itertools
import os
import shutil
import subprocess
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
    cmd = [nvcc, "-c", f"-arch={arch}", "-std=c++17", "-O3", "--use_fast_math", "-fmad=false",
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
    """The .cu files must compile without a CUDA build of torch (DESIGN.md section 3)."""
    for src in CU_FILES + [REPO / "csrc" / "include" / "vesselfast" / "cuda_launchers.h"]:
        text = src.read_text()
        for bad in ("<torch/", "<ATen/", "<c10/", "\"torch/", "\"ATen/", "\"c10/"):
            assert bad not in text, f"{src.name} includes {bad}"


# ------------------------------------------------------------------------------------------------
# Triton -> PTX / cubin for sm_90 without a GPU
# ------------------------------------------------------------------------------------------------
def _jit(kernel):
    """A compilable JITFunction even when the module was imported under TRITON_INTERPRET=1."""
    from triton.runtime.jit import JITFunction
    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)


def _compile(kernel, signature, constexprs):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(signature)
    sig.update({k: "constexpr" for k in constexprs})
    src = ASTSource(fn=_jit(kernel), signature=sig, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32))


def _check_binary(k, name):
    assert ".target sm_90" in k.asm["ptx"]
    assert f".entry {name}" in k.asm["ptx"]
    assert len(k.asm["cubin"]) > 1000


TY = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}


@pytest.fixture(scope="module")
def triton_mod():
    pytest.importorskip("triton")
    from vesselfast.kernels import diffusion_step, vessel_loss
    return diffusion_step, vessel_loss


@pytest.mark.parametrize("ty", list(TY))
def test_triton_diffusion_step_compiles_sm90(triton_mod, ty):
    ds, _ = triton_mod
    p = TY[ty]
    sig = {"x_ptr": p, "eps_ptr": p, "z_ptr": p, "coef_ptr": "*fp32", "out_ptr": p, "x0_ptr": p,
           "per_sample": "i32"}
    # every flag combination in one dtype, the all-on variant in the others (keeps CI fast)
    combos = list(itertools.product([True, False], repeat=4)) if ty == "fp32" else [(True,) * 4]
    for clip, use_eps, noise, x0 in combos:
        k = _compile(ds.diffusion_step_kernel, sig, {"CLIP": clip, "USE_EPS": use_eps, "HAS_NOISE": noise,
                                                     "NEED_X0": x0, "BLOCK": ds.GPU_BLOCK})
        _check_binary(k, "diffusion_step_kernel")


@pytest.mark.parametrize("ty", list(TY))
def test_triton_vessel_loss_compiles_sm90(triton_mod, ty):
    _, vl = triton_mod
    from vesselfast.kernels.diffusion_step import GPU_BLOCK
    p = TY[ty]
    for has_w in (True, False):
        k = _compile(vl._partial_kernel, {"eps_ptr": p, "hat_ptr": p, "w_ptr": p, "part_ptr": "*fp32", "n": "i32",
                                          "nblocks": "i32"}, {"HAS_W": has_w, "BLOCK": GPU_BLOCK})
        _check_binary(k, "_partial_kernel")
        k = _compile(vl._backward_kernel, {"g_ptr": "*fp32", "sumw_ptr": "*fp32", "eps_ptr": p, "hat_ptr": p,
                                           "w_ptr": p, "out_ptr": p, "n": "i32", "inv_n_half": "fp32"},
                     {"HAS_W": has_w, "BLOCK": GPU_BLOCK})
        _check_binary(k, "_backward_kernel")
    k = _compile(vl._finalize_kernel, {"part_ptr": "*fp32", "loss_ptr": "*fp32", "sumw_ptr": "*fp32",
                                       "nblocks": "i32", "inv_n_half": "fp32"}, {"BLOCK": vl.FINAL_BLOCK})
    _check_binary(k, "_finalize_kernel")

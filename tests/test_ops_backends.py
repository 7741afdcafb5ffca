"""Every available backend of the fused ops against the float64 reference (docs/METHOD.md).

Backends on this CPU-only CI: ``torch`` (the reference itself, run in the test dtype), ``cpu`` (the
C++ extension, when built) and ``triton`` (Triton's CPU interpreter, ``TRITON_INTERPRET=1``, set below
before the kernels are first imported). ``cuda`` cannot run here; tests/test_kernels_compile.py compiles it.

Ground truth is the ``*_reference`` function evaluated in float64 on the very same (already rounded)
inputs, with float64 schedule coefficients. Tolerances (|got - want| <= atol + rtol * |want|):
- rtol: one rounding of the output to the dtype (float32 math, rounded once on store); bfloat16 allows one
  full ulp (2^-7) because Triton's interpreter truncates float32 -> bfloat16 instead of rounding;
- atol, per sample: 4x the largest error of the same reference run in float32 on that sample (float32
  math amplifies rounding by up to ~1/sqrt(abar) at t ~ T and by 1/sqrt(1/abar - 1) at t ~ 0; a kernel
  doing float32 math may not be worse than plain float32 torch), plus 1e-7 of the largest output.
Output buffers are poisoned: with deterministic algorithms on, torch fills every ``empty`` tensor with NaN
(also those the C++ extension allocates through ATen), so an element a kernel forgets to write fails.
"""
from __future__ import annotations

import math
import os
import warnings

os.environ.setdefault("TRITON_INTERPRET", "1")  # also set in conftest.py, before anything imports triton

import pytest  # noqa: E402
import torch  # noqa: E402

from vesselfast import ops  # noqa: E402
from vesselfast.ops import diffusion_step as ds  # noqa: E402
from vesselfast.ops import registry  # noqa: E402
from vesselfast.ops import vessel_loss as vl  # noqa: E402

CPU_BACKENDS = [b for b in ("torch", "cpu", "triton") if registry.backend_unavailable_reason(b, "cpu") is None]
KERNEL_BACKENDS = [b for b in CPU_BACKENDS if b != "torch"]
SHAPES = [(3, 1, 37, 53), (1, 2, 255, 257), (4, 3, 5, 1)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
RTOL = {torch.float32: 2e-6, torch.bfloat16: 2.0 ** -7 + 1e-6, torch.float16: 2.0 ** -10 + 1e-6}


def test_expected_backends_present():
    """CI must not silently lose a backend: the extension is built and Triton is importable."""
    if os.environ.get("VESSELFAST_NO_EXT", "").strip().lower() not in ("1", "true", "yes", "on"):
        assert "cpu" in CPU_BACKENDS, registry.backend_unavailable_reason("cpu", "cpu")
    assert "triton" in CPU_BACKENDS, registry.backend_unavailable_reason("triton", "cpu")


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """torch.empty / empty_like (Python and ATen) return NaN-filled memory while this is on."""
    prev = torch.are_deterministic_algorithms_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    assert torch.isnan(torch.empty(4)).all()
    yield
    torch.use_deterministic_algorithms(prev)
    torch.utils.deterministic.fill_uninitialized_memory = prev_fill


@pytest.fixture(autouse=True)
def _kernels_interpreted():
    """If something imported vesselfast.kernels before TRITON_INTERPRET was set, re-create its kernels."""
    if "triton" in CPU_BACKENDS:
        import importlib

        import triton.runtime.interpreter as interp

        from vesselfast.kernels import diffusion_step as kds
        from vesselfast.kernels import vessel_loss as kvl
        if not isinstance(kds.diffusion_step_kernel, interp.InterpretedFunction):
            importlib.reload(kds)
            importlib.reload(kvl)
    yield


def linear_alpha_bar(T: int = 1000) -> torch.Tensor:
    betas = torch.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


ABAR = linear_alpha_bar()


def timesteps(gen, batch):
    """Per-sample timesteps covering both ends of the schedule (t = 0 and t = 999 among them)."""
    t = torch.randint(0, 1000, (batch,), generator=gen)
    t[0] = 999
    if batch > 2:
        t[1] = 0
    return t


def abar_at(t):
    """alpha_bar at t (float64 [B]); 1 for t < 0 (the step after the last)."""
    return torch.where(t >= 0, ABAR[t.clamp(min=0)], torch.ones((), dtype=torch.float64))


def assert_close(got, want, dtype, what, ref32=None):
    """``ref32``: the float64 reference's formula evaluated in float32 (sets the per-sample atol)."""
    assert got.shape == want.shape, what
    assert got.dtype == dtype, f"{what}: dtype {got.dtype} != {dtype}"
    got64 = got.double()
    assert torch.isfinite(got64).all(), f"{what}: non-finite outputs (unwritten elements?)"
    atol = torch.full((want.shape[0],), 1e-7 * (want.abs().max().item() + 1.0), dtype=torch.float64)
    if ref32 is not None:
        atol = atol + 4 * (ref32.double() - want).abs().flatten(1).amax(1)
    atol = atol.reshape(-1, *([1] * (want.dim() - 1)))
    err = (got64 - want).abs()
    bound = atol + RTOL[dtype] * want.abs()
    bad = err > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())}/{bad.numel()} elements off, max err {err.max().item():.3g}, "
                           f"worst excess {(err - bound).max().item():.3g}")


def make_inputs(shape, dtype, seed, noncontig=False):
    gen = torch.Generator().manual_seed(seed)

    def rnd():
        if noncontig:  # a transposed view: same values, non-contiguous memory
            t = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen).to(dtype).transpose(-1, -2)
            assert not t.is_contiguous() or min(shape[-2:]) == 1
            return t
        return torch.randn(*shape, generator=gen).to(dtype)
    x, eps, z = rnd() * 1.5, rnd(), rnd()
    return gen, x, eps, z


# ------------------------------------------------------------------------------------------------
# Diffusion updates
# ------------------------------------------------------------------------------------------------
STEP_CASES = [
    # (op, kwargs); prev/next timestep offsets and eta per case
    ("ddim", dict(eta=0.0, clip=True)),
    ("ddim", dict(eta=0.7, clip=True)),
    ("ddim", dict(eta=1.0, clip=False)),
    ("ddim_inverse", dict(clip=True)),
    ("ddim_inverse", dict(clip=False)),
    ("ddpm", dict(variance="fixed_large", clip=True)),
    ("ddpm", dict(variance="fixed_small", clip=False)),
]


def run_step(kind, kw, x, eps, z, t, backend, return_x0=True, out=None):
    """(got, want64, want32): the op through ``backend`` (into ``out`` when given), and the reference on
    the same inputs in float64 and in float32 (both as (out, x0))."""
    def reference(dt):
        xr, er, zr = x.to(dt), eps.to(dt), z.to(dt)
        if kind == "ddim":
            ab_t, ab_p = abar_at(t), abar_at(t - 20)
            return ops.ddim_step_reference(xr, er, ab_t, ab_p, kw["eta"], zr if kw["eta"] > 0 else None, kw["clip"])
        if kind == "ddim_inverse":
            return ops.ddim_inverse_step_reference(xr, er, abar_at(t), abar_at((t + 20).clamp(max=999)), kw["clip"])
        return ops.ddpm_step_reference(xr, er, abar_at(t), abar_at(t - 1), zr, kw["variance"], kw["clip"])

    if kind == "ddim":
        got = ops.ddim_step(x, eps, abar_at(t), abar_at(t - 20), eta=kw["eta"], noise=z, clip=kw["clip"],
                            return_x0=return_x0, backend=backend, out=out)
    elif kind == "ddim_inverse":
        got = ops.ddim_inverse_step(x, eps, abar_at(t), abar_at((t + 20).clamp(max=999)), clip=kw["clip"],
                                    return_x0=return_x0, backend=backend, out=out)
    else:
        got = ops.ddpm_step(x, eps, abar_at(t), abar_at(t - 1), noise=z, variance=kw["variance"], clip=kw["clip"],
                            return_x0=return_x0, backend=backend, out=out)
    return got, reference(torch.float64), reference(torch.float32)


# The torch backend computes in the input dtype (half-precision math, not a kernel): float32 only.
BACKEND_DTYPES = [(b, d) for b in CPU_BACKENDS for d in DTYPES if b != "torch" or d == torch.float32]


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("case", range(len(STEP_CASES)))
def test_step_matches_float64_reference(backend, dtype, shape, case):
    kind, kw = STEP_CASES[case]
    gen, x, eps, z = make_inputs(shape, dtype, seed=1000 * case + len(shape) + shape[-1])
    t = timesteps(gen, shape[0])
    (out, x0), (want, want_x0), (r32, r32_x0) = run_step(kind, kw, x, eps, z, t, backend)
    assert_close(out, want, dtype, f"{kind} out [{backend}]", r32)
    assert_close(x0, want_x0, dtype, f"{kind} x0 [{backend}]", r32_x0)
    if kw.get("clip"):
        assert x0.abs().max() <= 1.0


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("case", range(len(STEP_CASES)))
@pytest.mark.parametrize("return_x0", [False, True], ids=["out", "out+x0"])
def test_step_into_out_buffer(backend, dtype, case, return_x0):
    """out=: the result lands in the caller's (NaN-poisoned) buffer, every element written, equal to the
    float64 reference; the inputs stay as they were."""
    kind, kw = STEP_CASES[case]
    gen, x, eps, z = make_inputs((3, 1, 37, 53), dtype, seed=50 + case)
    t = timesteps(gen, 3)
    x_before = x.clone()
    out = torch.empty_like(x)
    got, (want, want_x0), (r32, r32_x0) = run_step(kind, kw, x, eps, z, t, backend, return_x0=return_x0, out=out)
    result = got[0] if return_x0 else got
    assert result.data_ptr() == out.data_ptr()
    assert_close(out, want, dtype, f"{kind} out= [{backend}]", r32)
    if return_x0:
        assert_close(got[1], want_x0, dtype, f"{kind} x0 with out= [{backend}]", r32_x0)
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_step_out_must_not_overlap_inputs(backend):
    _, x, eps, z = make_inputs((2, 1, 8, 8), torch.float32, seed=9)
    for bad in (x, eps, x[:1], torch.empty(3, 1, 8, 8), torch.empty(2, 1, 8, 8, dtype=torch.float64)):
        with pytest.raises(ValueError, match="out "):
            ops.ddim_step(x, eps, 0.3, 0.45, backend=backend, out=bad)
    with pytest.raises(ValueError, match="shares memory"):
        ops.ddpm_step(x, eps, 0.3, 0.45, noise=z, backend=backend, out=z)
    if backend == "cpu":  # the compiled op checks too, for callers of torch.ops.vesselfast directly
        with pytest.raises(RuntimeError, match="shares memory"):
            torch.ops.vesselfast.diffusion_step_out(x, eps, torch.ones(2, 6), None, True, x)


@pytest.mark.parametrize("backend,dtype", [(b, d) for b, d in BACKEND_DTYPES if d != torch.float16],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_step_noncontiguous_inputs(backend, dtype):
    shape = (2, 3, 19, 23)
    gen, x, eps, z = make_inputs(shape, dtype, seed=7, noncontig=True)
    assert not x.is_contiguous() and not eps.is_contiguous() and not z.is_contiguous()
    t = timesteps(gen, shape[0])
    for kind, kw in STEP_CASES[:1] + STEP_CASES[1:2] + STEP_CASES[3:4] + STEP_CASES[5:6]:
        (out, x0), (want, want_x0), (r32, r32_x0) = run_step(kind, kw, x, eps, z, t, backend)
        assert out.shape == shape
        assert_close(out, want, dtype, f"{kind} non-contiguous [{backend}]", r32)
        assert_close(x0, want_x0, dtype, f"{kind} x0 non-contiguous [{backend}]", r32_x0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_step_without_x0_and_scalar_alpha_bar(backend):
    gen, x, eps, z = make_inputs((2, 1, 33, 31), torch.float32, seed=3)
    out = ops.ddim_step(x, eps, 0.3, 0.45, backend=backend)  # Python floats broadcast to the batch
    want, _ = ops.ddim_step_reference(x.double(), eps.double(), 0.3, 0.45)
    assert isinstance(out, torch.Tensor)
    assert_close(out, want, torch.float32, f"ddim scalar abar [{backend}]")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_step_last_ddim_step_returns_x0(backend):
    """abar_prev = 1: sigma = 0 and x_prev equals the (clipped) x0 prediction, noise or not."""
    gen, x, eps, z = make_inputs((2, 1, 17, 9), torch.float32, seed=5)
    out, x0 = ops.ddim_step(x, eps, torch.tensor([0.9, 0.5]), 1.0, eta=1.0, noise=z, return_x0=True, backend=backend)
    assert torch.allclose(out, x0, atol=1e-6)


def test_kernel_entry_points_reject_noncontiguous():
    x = torch.randn(2, 4, 6).transpose(1, 2)
    coef = torch.ones(2, 6)
    if "cpu" in CPU_BACKENDS:
        with pytest.raises(RuntimeError, match="contiguous"):
            torch.ops.vesselfast.diffusion_step(x, x, coef, None, True, False)
        with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
            torch.ops.vesselfast.diffusion_step(x.double().contiguous(), x.double().contiguous(), coef, None, True,
                                               False)
    if "triton" in CPU_BACKENDS:
        from vesselfast.kernels.diffusion_step import diffusion_step
        from vesselfast.kernels.vessel_loss import vessel_noise_loss_fwd
        with pytest.raises(ValueError, match="contiguous"):
            diffusion_step(x, x, coef, None, True, False)
        with pytest.raises(ValueError, match="contiguous"):
            vessel_noise_loss_fwd(x, x, None)


# ------------------------------------------------------------------------------------------------
# Vessel-weighted noise loss
# ------------------------------------------------------------------------------------------------
def loss_inputs(shape, dtype, seed, with_w=True, noncontig=False):
    gen, eps, hat, _ = make_inputs(shape, dtype, seed, noncontig)
    w = None
    if with_w:
        w = (torch.rand(shape, generator=gen) < 0.3).to(dtype)
        w[0] = 0  # one sample without vessels: sum_w = 0
        if noncontig:
            w = w.transpose(-1, -2).contiguous().transpose(-1, -2)
    g = torch.rand(shape[0], generator=gen, dtype=torch.float64) + 0.5  # per-sample upstream gradient
    return eps, hat, w, g


def loss_reference64(eps, hat, w, g):
    h64 = hat.double().requires_grad_(True)
    loss = ops.vessel_noise_loss_reference(eps.double(), h64, None if w is None else w.double())
    (loss * g).sum().backward()
    return loss.detach(), h64.grad


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_w", [True, False], ids=["w", "no_w"])
def test_loss_forward_backward_match_float64(backend, dtype, shape, with_w):
    eps, hat, w, g = loss_inputs(shape, dtype, seed=shape[-1] + with_w, with_w=with_w)
    want, want_grad = loss_reference64(eps, hat, w, g)
    h = hat.clone().requires_grad_(True)
    loss = ops.vessel_noise_loss(eps, h, w, reduction="none", backend=backend)
    assert loss.dtype == torch.float32 and loss.shape == (shape[0],)
    # float32 accumulation over up to 131k elements: 1e-5 relative
    assert torch.allclose(loss.double(), want, rtol=1e-5, atol=1e-7), (loss, want)
    (loss * g.float()).sum().backward()
    assert h.grad.dtype == dtype
    assert_close(h.grad, want_grad, dtype, f"loss grad [{backend}]")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_loss_noncontiguous_and_mean(backend):
    eps, hat, w, g = loss_inputs((3, 2, 21, 13), torch.float32, seed=11, noncontig=True)
    assert not eps.is_contiguous() and not hat.is_contiguous() and not w.is_contiguous()
    want, want_grad = loss_reference64(eps, hat, w, torch.full((3,), 1 / 3, dtype=torch.float64))
    h = hat.clone().requires_grad_(True)  # clone keeps the strides: still non-contiguous
    assert not h.is_contiguous()
    loss = ops.vessel_noise_loss(eps, h, w, backend=backend)  # reduction="mean"
    assert loss.dim() == 0
    assert abs(loss.item() - want.mean().item()) <= 1e-5 * want.mean().item()
    loss.backward()
    assert h.grad.shape == h.shape
    assert_close(h.grad, want_grad, torch.float32, f"loss grad non-contiguous [{backend}]")


def test_loss_gradcheck_torch_float64():
    gen = torch.Generator().manual_seed(0)
    eps = torch.randn(3, 1, 5, 7, generator=gen, dtype=torch.float64)
    hat = torch.randn(3, 1, 5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, 1, 5, 7, generator=gen) < 0.4).double()
    fn = lambda h: ops.vessel_noise_loss(eps, h, w, reduction="none", backend="torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hat,))
    assert torch.autograd.gradgradcheck(fn, (hat,))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_loss_gradcheck_kernels_float32(backend):
    """The kernels take float32 at most, so gradcheck runs in float32. The loss is quadratic in eps_hat,
    so central differences are exact up to rounding: with eps=1e-2 the only error is float32 rounding of
    the O(1) loss, ~1e-7 / 1e-2 = 1e-5 per entry; atol 1e-3 leaves a 100x margin and still catches any
    wrong factor (the smallest true gradient entries here are ~1e-2)."""
    gen = torch.Generator().manual_seed(1)
    eps = torch.randn(3, 1, 5, 7, generator=gen)
    hat = torch.randn(3, 1, 5, 7, generator=gen).requires_grad_(True)
    w = (torch.rand(3, 1, 5, 7, generator=gen) < 0.4).float()
    fn = lambda h: ops.vessel_noise_loss(eps, h, w, reduction="none", backend=backend)  # noqa: E731
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*double precision.*")
        assert torch.autograd.gradcheck(fn, (hat,), eps=1e-2, atol=1e-3, rtol=1e-2)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_loss_is_deterministic(backend):
    eps, hat, w, _ = loss_inputs((2, 1, 255, 257), torch.float32, seed=4)
    a = ops.vessel_noise_loss(eps, hat, w, reduction="none", backend=backend)
    b = ops.vessel_noise_loss(eps, hat, w, reduction="none", backend=backend)
    assert torch.equal(a, b)


def test_loss_grad_only_to_eps_hat():
    eps = torch.randn(2, 1, 4, 4, requires_grad=True)
    hat = torch.randn(2, 1, 4, 4, requires_grad=True)
    w = torch.ones(2, 1, 4, 4, requires_grad=True)
    for backend in CPU_BACKENDS:
        eps.grad = hat.grad = w.grad = None
        ops.vessel_noise_loss(eps, hat, w, backend=backend).backward()
        assert eps.grad is None and w.grad is None and hat.grad is not None, backend


# ------------------------------------------------------------------------------------------------
# Registry: one door, explicit failures
# ------------------------------------------------------------------------------------------------
OP_NAMES = ["ddim_step", "ddim_inverse_step", "ddpm_step", "vessel_noise_loss"]


@pytest.mark.parametrize("name", OP_NAMES)
def test_auto_picks_cpu_kernel_on_cpu(name, monkeypatch):
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("extension not built")
    assert ops.OPS[name].pick("cpu") == "cpu"
    assert ops.OPS[name].pick("cpu", "auto", torch.bfloat16) == "cpu"
    # auto never picks the interpreter, even when TRITON_INTERPRET=1
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops.OPS[name].pick("cpu") == "cpu"


@pytest.mark.parametrize("name", OP_NAMES)
def test_auto_falls_back_to_torch_for_float64(name, monkeypatch):
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    assert ops.OPS[name].pick("cpu", "auto", torch.float64) == "torch"
    with pytest.raises(ops.BackendUnavailable, match="float64"):
        ops.OPS[name].pick("cpu", "cpu", torch.float64)


def test_env_var_forces_torch(monkeypatch):
    monkeypatch.setenv(registry.ENV_VAR, "torch")
    assert all(ops.OPS[n].pick("cpu") == "torch" for n in OP_NAMES)

    def boom(*a, **k):
        raise AssertionError("kernel called although VESSELFAST_BACKEND=torch")
    monkeypatch.setitem(ds.ddim_step_op.impls, "cpu", boom)
    monkeypatch.setitem(vl.vessel_noise_loss_op.impls, "cpu", boom)
    x = torch.randn(2, 1, 8, 8)
    out = ops.ddim_step(x, x, 0.5, 0.6)
    want, _ = ops.ddim_step_reference(x.double(), x.double(), 0.5, 0.6)
    assert_close(out, want, torch.float32, "forced torch")
    ops.vessel_noise_loss(x, x)


def test_env_var_with_unavailable_backend_says_where_it_came_from(monkeypatch):
    monkeypatch.setenv(registry.ENV_VAR, "cuda")
    with pytest.raises(ops.BackendUnavailable, match=registry.ENV_VAR):
        ops.ddim_step(torch.randn(1, 4), torch.randn(1, 4), 0.5, 0.6)


@pytest.mark.parametrize("name", OP_NAMES)
def test_explicit_cuda_on_cpu_raises_with_reason(name, monkeypatch):
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    with pytest.raises(ops.BackendUnavailable, match=r"cuda.*cannot run: .*CUDA tensors"):
        ops.OPS[name].pick("cpu", "cuda")
    x = torch.randn(1, 1, 4, 4)
    with pytest.raises(ops.BackendUnavailable, match="CUDA tensors"):
        if name == "vessel_noise_loss":
            ops.vessel_noise_loss(x, x, backend="cuda")
        else:
            getattr(ops, name)(x, x, 0.5, 0.6, backend="cuda")


def test_triton_without_interpreter_on_cpu_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ops.BackendUnavailable, match="TRITON_INTERPRET"):
        ops.OPS["ddim_step"].pick("cpu", "triton")


def test_unknown_backend_raises():
    with pytest.raises(ops.BackendUnavailable, match="unknown backend"):
        ops.OPS["ddpm_step"].pick("cpu", "tpu")


def test_describe_lists_choice():
    d = ops.describe()
    assert set(OP_NAMES) <= set(d)
    for name in OP_NAMES:
        assert d[name]["auto_cpu"] in d[name]["available"]
        assert "torch" in d[name]["available"]


def test_sanity_reference_formula():
    """The float64 reference itself against the docs/METHOD.md formula written out by hand (one element)."""
    x, e, ab_t, ab_p, eta, z = 0.3, -0.4, 0.6, 0.8, 0.5, 0.25
    x0 = max(-1.0, min(1.0, math.sqrt(1 / ab_t) * x - math.sqrt(1 / ab_t - 1) * e))
    ep = (math.sqrt(1 / ab_t) * x - x0) / math.sqrt(1 / ab_t - 1)
    sigma = eta * math.sqrt((1 - ab_p) / (1 - ab_t)) * math.sqrt(1 - ab_t / ab_p)
    want = math.sqrt(ab_p) * x0 + math.sqrt(1 - ab_p - sigma ** 2) * ep + sigma * z
    t = lambda v: torch.tensor([[v]], dtype=torch.float64)  # noqa: E731
    got, _ = ops.ddim_step_reference(t(x), t(e), ab_t, ab_p, eta, t(z))
    assert abs(got.item() - want) < 1e-12


# ------------------------------------------------------------------------------------------------
# CPU kernel internals: every instruction-set variant, and the 16-bit conversions against torch's
# ------------------------------------------------------------------------------------------------
ISAS = ["generic", "avx2", "avx512"]  # VESSELFAST_CPU_ISA only lowers the choice: unsupported ones run lower


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="extension not built")
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_isa_variants_match_reference(isa, dtype, monkeypatch):
    monkeypatch.setenv("VESSELFAST_CPU_ISA", isa)
    shape = (3, 1, 37, 53)
    gen, x, eps, z = make_inputs(shape, dtype, seed=17)
    t = timesteps(gen, shape[0])
    for kind, kw in STEP_CASES:
        (out, x0), (want, want_x0), (r32, r32_x0) = run_step(kind, kw, x, eps, z, t, "cpu")
        assert_close(out, want, dtype, f"{kind} out [cpu/{isa}]", r32)
        assert_close(x0, want_x0, dtype, f"{kind} x0 [cpu/{isa}]", r32_x0)
    eps, hat, w, g = loss_inputs(shape, dtype, seed=18)
    want, want_grad = loss_reference64(eps, hat, w, g)
    h = hat.clone().requires_grad_(True)
    loss = ops.vessel_noise_loss(eps, h, w, reduction="none", backend="cpu")
    assert torch.allclose(loss.double(), want, rtol=1e-5, atol=1e-7)
    (loss * g.float()).sum().backward()
    assert_close(h.grad, want_grad, dtype, f"loss grad [cpu/{isa}]")


def _special_values(dtype):
    finfo = torch.finfo(dtype)
    vals = [0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), float("nan"), finfo.max, -finfo.max, finfo.tiny,
            finfo.tiny / 4, -finfo.tiny / 8, finfo.eps, 65504.0, 65519.0, 65520.0, 1e-7, 6e-8, 3e-8, 1e38, 3.4e38]
    gen = torch.Generator().manual_seed(3)
    rnd = torch.randn(4000, generator=gen, dtype=torch.float64) * torch.logspace(-9, 9, 4000, dtype=torch.float64)
    return torch.cat([torch.tensor(vals, dtype=torch.float64), rnd]).float()


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="extension not built")
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cpu_conversions_bit_exact_with_torch(isa, dtype, monkeypatch):
    """out = d * x with clip off and a = b = s = 0: loads must widen exactly and stores must round like
    torch (nearest even; overflow to inf; NaN stays NaN), in every ISA variant. (Infinite inputs are left
    out: the generic update computes 0 * x0 = NaN for them, by design of out = a x0 + b eps' + d x + s z.)"""
    monkeypatch.setenv("VESSELFAST_CPU_ISA", isa)
    src = _special_values(dtype)
    src = src[~torch.isinf(src.to(dtype).float())]
    for d in (1.0, 1.0 / 3.0, 1.7):
        # load path: values already representable in dtype, d = 1 -> exact round trip
        x = src.to(dtype).reshape(1, -1)
        coef = torch.tensor([[1.0, 1.0, 0.0, 0.0, d, 0.0]])
        out, _ = torch.ops.vesselfast.diffusion_step(x, torch.zeros_like(x), coef, None, False, False)
        want = (x.float() * torch.tensor(d, dtype=torch.float32)).to(dtype)
        # bit-exact, except that 0 * x0 + d * (-0) is +0 (IEEE), and NaN payloads may differ
        same = ((out.view(torch.int16) == want.view(torch.int16)) | (torch.isnan(out) & torch.isnan(want))
                | ((out == 0) & (want == 0)))
        assert same.all(), (d, x[~same][:5], out[~same][:5], want[~same][:5])


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="extension not built")
@pytest.mark.parametrize("isa", ISAS)
def test_cpu_streaming_stores_match_the_cached_path_bit_for_bit(isa, monkeypatch):
    """Outputs larger than the last-level cache reach memory through non-temporal stores in 512-element
    blocks (cpu_dtype.h ``streamed``): the head up to a 64-byte line, the blocks and the tail must give
    exactly the cached path's numbers, for an output that starts mid-line and ragged sample lengths."""
    monkeypatch.setenv("VESSELFAST_CPU_ISA", isa)
    shape = (3, 1, 41, 67)  # 2747 per sample: blocks straddle samples, ragged tails
    gen, x, eps, z = make_inputs(shape, torch.float32, seed=23)
    t = timesteps(gen, shape[0])
    n = x.numel()
    backing = torch.empty(n + 5)
    out = backing[5:].view(shape)  # 20 bytes past a 64-byte line
    assert out.data_ptr() % 64 != 0
    coefs = [ds.ddim_coefficients(abar_at(t), abar_at(t - 7), 0.0),
             ds.ddpm_coefficients(abar_at(t), abar_at(t - 1), "fixed_large")]
    for coef, noise in zip(coefs, (None, z)):
        got = {}
        for stream in ("0", "1"):
            monkeypatch.setenv("VESSELFAST_STREAM_STORES", stream)
            out.fill_(float("nan"))
            torch.ops.vesselfast.diffusion_step_out(x, eps, coef, noise, True, out)
            got[stream] = out.clone()
            fresh, _ = torch.ops.vesselfast.diffusion_step(x, eps, coef, noise, True, False)
            assert torch.equal(fresh, got[stream])
        assert not torch.isnan(got["1"]).any()
        assert torch.equal(got["0"], got["1"])
    e, hat, w, g = loss_inputs(shape, torch.float32, seed=24)
    grads = {}
    for stream in ("0", "1"):
        monkeypatch.setenv("VESSELFAST_STREAM_STORES", stream)
        _, sum_w = torch.ops.vesselfast.vessel_noise_loss_fwd(e, hat, w)
        grads[stream] = torch.ops.vesselfast.vessel_noise_loss_bwd(g.float(), e, hat, w, sum_w)
    assert torch.equal(grads["0"], grads["1"])
    _, want_grad = loss_reference64(e, hat, w, g)
    assert_close(grads["1"], want_grad, torch.float32, f"loss grad streamed [cpu/{isa}]")

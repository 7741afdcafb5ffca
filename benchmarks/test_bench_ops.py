"""Benchmark group ``ops``: the fused ops against eager torch, ``torch.compile`` and the copy floor.

For each op and size N (float32 elements per tensor, batch 8 with per-sample timesteps):
- ``eager``: the plain-torch ``*_reference`` (the spec; what the code would run without vesselfast);
- ``compile``: ``torch.compile`` of that reference, alpha_bar passed as [B] tensors so it compiles once;
- every kernel backend available on the device (``cpu`` here; ``cuda`` and ``triton`` on a GPU),
  through the public op (coefficient tables and checks included: what callers pay);
- ``auto``: the public op with its default backend choice and per-sample alpha_bar tensors [B] (so
  ``VESSELFAST_BACKEND=torch`` turns it into the reference, and ``--compare`` must notice): the
  coefficient table is built on every call, ~15 small float64 ops on the tensors' device;
- ``auto-scalar`` (step ops): the same with alpha_bar as Python floats, one level for the whole batch, as
  the samplers call it (vesselfast/diffusion/sampling.py): the table comes from a cache;
- ``cpu-kernel`` / ``cuda-kernel`` (not in quick mode): the compiled op called directly with a
  precomputed coefficient table (steps) or without autograd (loss), to show the public op's fixed cost.
- ``copy``: ``dst.copy_(src)`` moving the same number of bytes as the op must move (the bandwidth floor).
  Every fused row also times such a copy before each of its rounds (``timed_with_floor``): its "% floor"
  is the median of the per-round ratios, so a change in the machine's memory bandwidth during the run
  (another tenant, the page placement of one allocation) moves the op and its floor together. The
  ``copy`` rows stay as the floor measured on its own.
Measured the same way as the floor: the step ops write into a preallocated ``out=`` buffer, as the
sampling loops do, so neither side pays for a fresh allocation. The loss's contract is autograd's (a new
gradient tensor per call), so every loss row, the eager one included, allocates its gradient; the
allocator decides what that costs (docs/ALLOCATOR.md).
Bytes an op must move (float32): ddim_step (eta = 0) and ddim_inverse_step read x, eps and write out (3N*4);
ddpm_step also reads the noise (4N*4); vessel_noise_loss forward + backward reads eps, eps_hat, w twice
and writes the gradient (7N*4); group_norm_act (norm, per-sample affine, SiLU; channels_last [8, 64, H, W])
forward + backward reads x, writes y, reads x and the output gradient, writes dx (5N*4). Its ``eager`` row
is the reference on the same channels_last tensor (ATen's group norm in that layout), and ``nchw`` is
ATen's group norm and SiLU on an NCHW copy: what a network kept in NCHW pays. ``extra_info`` records op,
impl, numel and bytes for ``vesselfast bench``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import QUICK, bench_device, bench_sizes, record, rounds_for, timed, timed_with_floor, with_compile

from vesselfast import ops
from vesselfast.ops import diffusion_step as ds
from vesselfast.ops.registry import backend_unavailable_reason

GROUP = "ops"
pytestmark = pytest.mark.bench_group(GROUP)

DEVICE = bench_device()
SIZES = bench_sizes(default=[1 << 20, 1 << 22, 1 << 24], quick=[1 << 16])
BATCH = 8
WIDTH = 256
# Triton on CPU tensors is its interpreter (TRITON_INTERPRET=1, for tests): not a performance path.
KERNEL_IMPLS = [b for b in ("cuda", "triton", "cpu") if backend_unavailable_reason(b, DEVICE) is None
                and not (b == "triton" and DEVICE.type == "cpu")]
RAW_IMPLS = [] if QUICK else [f"{b}-kernel" for b in KERNEL_IMPLS if b in ("cpu", "cuda")]
IMPLS = ["eager"] + (["compile"] if with_compile() else []) + ["auto"] + KERNEL_IMPLS + RAW_IMPLS
STEP_IMPLS = IMPLS[:IMPLS.index("auto") + 1] + ["auto-scalar"] + IMPLS[IMPLS.index("auto") + 1:]
# tensors of N float32 each that the op must read or write
TENSORS = {"ddim_step": 3, "ddim_inverse_step": 3, "ddpm_step": 4, "vessel_noise_loss": 7, "group_norm_act": 5}
GN_CHANNELS, GN_GROUPS = 64, 16


def _shape(numel):
    per = max(1, numel // BATCH)
    return (BATCH, 1, max(1, per // WIDTH), min(WIDTH, per))


def _inputs(numel, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = _shape(numel)
    x, eps, z = (torch.randn(shape, generator=gen).to(DEVICE) for _ in range(3))
    T = 1000
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0)
    t = torch.randint(21, T - 21, (BATCH,), generator=gen)
    return x, eps, z, abar[t].to(DEVICE), abar[t - 20].to(DEVICE), abar[t + 20].to(DEVICE), abar[t - 1].to(DEVICE)


def _step_callable(op, impl, numel):
    x, eps, z, ab_t, ab_prev20, ab_next20, ab_prev1 = _inputs(numel)
    if impl.endswith("-kernel"):  # the compiled op alone, coefficient table computed once
        coef = {"ddim_step": lambda: ds.ddim_coefficients(ab_t, ab_prev20, 0.0),
                "ddim_inverse_step": lambda: ds.ddim_inverse_coefficients(ab_t, ab_next20),
                "ddpm_step": lambda: ds.ddpm_coefficients(ab_t, ab_prev1, "fixed_large")}[op]()
        noise = z if op == "ddpm_step" else None
        out = torch.empty_like(x)
        return lambda: torch.ops.vesselfast.diffusion_step_out(x, eps, coef, noise, True, out)
    out = torch.empty_like(x)
    if impl == "auto-scalar":  # one level for the batch, floats: the samplers' call (cached table)
        a_t = float(ab_t[0])
        b = float({"ddim_step": ab_prev20, "ddim_inverse_step": ab_next20, "ddpm_step": ab_prev1}[op][0])
        kw = {"noise": z} if op == "ddpm_step" else {}
        return lambda: getattr(ops, op)(x, eps, a_t, b, out=out, **kw)
    if op == "ddim_step":
        ref = lambda: ops.ddim_step_reference(x, eps, ab_t, ab_prev20)[0]  # noqa: E731
        fused = lambda b: ops.ddim_step(x, eps, ab_t, ab_prev20, backend=b, out=out)  # noqa: E731
        ref_fn, args = ops.ddim_step_reference, (x, eps, ab_t, ab_prev20)
    elif op == "ddim_inverse_step":
        ref = lambda: ops.ddim_inverse_step_reference(x, eps, ab_t, ab_next20)[0]  # noqa: E731
        fused = lambda b: ops.ddim_inverse_step(x, eps, ab_t, ab_next20, backend=b, out=out)  # noqa: E731
        ref_fn, args = ops.ddim_inverse_step_reference, (x, eps, ab_t, ab_next20)
    else:
        ref = lambda: ops.ddpm_step_reference(x, eps, ab_t, ab_prev1, z)[0]  # noqa: E731
        fused = lambda b: ops.ddpm_step(x, eps, ab_t, ab_prev1, noise=z, backend=b, out=out)  # noqa: E731
        ref_fn, args = ops.ddpm_step_reference, (x, eps, ab_t, ab_prev1, z)
    if impl == "eager":
        return ref
    if impl == "compile":
        compiled = torch.compile(ref_fn, dynamic=False)
        return lambda: compiled(*args)[0]
    return lambda: fused(impl)


def _loss_callable(impl, numel):
    x, eps, _, _, _, _, _ = _inputs(numel, seed=1)
    hat = x.clone().requires_grad_(True)
    w = (torch.rand(x.shape, generator=torch.Generator().manual_seed(2)) < 0.2).float().to(DEVICE)
    g = torch.full((BATCH,), 1.0 / BATCH, device=DEVICE)
    if impl.endswith("-kernel"):  # forward + backward kernels, no autograd
        e, h = eps.contiguous(), hat.detach()

        def raw():
            _, sum_w = torch.ops.vesselfast.vessel_noise_loss_fwd(e, h, w)
            return torch.ops.vesselfast.vessel_noise_loss_bwd(g, e, h, w, sum_w)
        return raw
    if impl == "eager":
        fwd = ops.vessel_noise_loss_reference
    elif impl == "compile":
        fwd = torch.compile(ops.vessel_noise_loss_reference, dynamic=False)
    else:
        fwd = lambda e, h, ww: ops.vessel_noise_loss(e, h, ww, reduction="none", backend=impl)  # noqa: E731

    def run():  # forward + backward, no .grad accumulation (autograd.grad returns the gradient)
        loss = fwd(eps, hat, w)
        return torch.autograd.grad(loss, hat, g)[0]
    return run


def _group_norm_callable(impl, numel):
    """Forward + backward of group_norm_act on a channels_last [8, 64, H, W] float32 tensor (weight, bias
    and a per-sample modulation, as the generator's blocks call it)."""
    g = torch.Generator().manual_seed(3)
    side = max(1, int(round((numel / (BATCH * GN_CHANNELS)) ** 0.5)))
    x = torch.randn(BATCH, GN_CHANNELS, side, side, generator=g).to(DEVICE)
    weight, bias = torch.randn(GN_CHANNELS, generator=g).to(DEVICE), torch.randn(GN_CHANNELS, generator=g).to(DEVICE)
    scale, shift = (torch.randn(BATCH, GN_CHANNELS, generator=g).to(DEVICE) for _ in range(2))
    if impl == "nchw":
        x = x.contiguous().requires_grad_(True)
        fwd = lambda: F.silu(F.group_norm(x, GN_GROUPS, weight, bias) * (1 + scale[:, :, None, None])  # noqa: E731
                             + shift[:, :, None, None])
    else:
        x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
        backend = {"eager": "torch", "compile": "torch"}.get(impl, impl)
        fwd = lambda: ops.group_norm_act(x, GN_GROUPS, weight, bias, 1e-5, scale, shift,  # noqa: E731
                                         backend=backend)
        if impl == "compile":
            fwd = torch.compile(fwd, dynamic=False)
    dy = torch.randn(x.shape, generator=g).to(DEVICE).contiguous(memory_format=torch.channels_last)
    return lambda: torch.autograd.grad(fwd(), x, dy)[0]


def _record(benchmark, op, impl, numel, tensors):
    nbytes = tensors * numel * 4
    record(benchmark, GROUP, op, impl, numel, bytes=nbytes, dtype="float32")
    return nbytes


def _copy(nbytes):
    """``dst.copy_(src)`` moving ``nbytes`` (half read, half written): the bandwidth floor."""
    src = torch.randn(nbytes // 8, device=DEVICE)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def _run(benchmark, fn, sync, nbytes, impl=None):
    """Fused rows get their floor measured round by round beside them (``timed_with_floor``); the
    eager and compiled references, 5-20x slower than the floor, only their own time."""
    if impl in (None, "eager", "compile", "nchw"):
        timed(benchmark, fn, sync, rounds_for(nbytes), warmup=2)
    else:
        timed_with_floor(benchmark, fn, _copy(nbytes), sync, rounds_for(nbytes), warmup=2)


@pytest.mark.parametrize("numel", SIZES, ids=lambda n: f"{n}")
@pytest.mark.parametrize("impl", STEP_IMPLS)
@pytest.mark.parametrize("op", ["ddim_step", "ddim_inverse_step", "ddpm_step"])
def test_step(benchmark, sync, op, impl, numel):
    nbytes = _record(benchmark, op, impl, numel, TENSORS[op])
    _run(benchmark, _step_callable(op, impl, numel), sync, nbytes, impl)


@pytest.mark.parametrize("numel", SIZES, ids=lambda n: f"{n}")
@pytest.mark.parametrize("impl", IMPLS)
def test_vessel_noise_loss_fwd_bwd(benchmark, sync, impl, numel):
    nbytes = _record(benchmark, "vessel_noise_loss", impl, numel, TENSORS["vessel_noise_loss"])
    _run(benchmark, _loss_callable(impl, numel), sync, nbytes, impl)


@pytest.mark.parametrize("numel", SIZES, ids=lambda n: f"{n}")
@pytest.mark.parametrize("impl", ["eager", "nchw"] + [i for i in IMPLS if i in ("compile", "auto", "cpu")])
def test_group_norm_act_fwd_bwd(benchmark, sync, impl, numel):
    nbytes = _record(benchmark, "group_norm_act", impl, numel, TENSORS["group_norm_act"])
    _run(benchmark, _group_norm_callable(impl, numel), sync, nbytes, impl)


@pytest.mark.parametrize("numel", SIZES, ids=lambda n: f"{n}")
@pytest.mark.parametrize("tensors", sorted(set(TENSORS.values())))
def test_copy_floor(benchmark, sync, tensors, numel):
    """A plain copy moving tensors * numel * 4 bytes (half read, half written): the bandwidth floor of
    every op that moves that many bytes."""
    nbytes = tensors * numel * 4
    record(benchmark, GROUP, "copy", "copy", numel, bytes=nbytes, dtype="float32", tensors=tensors)
    _run(benchmark, _copy(nbytes), sync, nbytes)

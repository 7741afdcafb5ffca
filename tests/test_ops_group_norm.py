"""group_norm_act: the reference against a float64 brute force of its formula, the compiled kernel
against the reference (values and every gradient, float32 / bfloat16 / float16, shapes that split into
several row blocks and ones that do not), the op's registration (opcheck, torch.compile), backend choice,
input errors, and the generator computing the same in channels_last (kernel) as in NCHW (reference)."""
import pytest
import torch
import torch.nn.functional as F

from vesselfast import _ext, ops
from vesselfast.models.generator import GeneratorArch, GeneratorUNet
from vesselfast.ops import group_norm as gn

needs_ext = pytest.mark.skipif(not _ext.cpu_built(), reason="vesselfast._C not built (VESSELFAST_NO_EXT)")
CL = torch.channels_last

# (B, C, H, W, groups): one block; C not a multiple of the vector width; several row blocks with a
# partial last one (C=8: 1,024 rows per block); B=1; the generator's 64 px level; 24 groups of 6 (a base-48
# generator's 144-channel concatenation).
SHAPES = [(2, 32, 8, 8, 8), (3, 12, 5, 7, 3), (2, 8, 45, 47, 2), (1, 64, 33, 17, 16), (8, 32, 64, 64, 8),
          (2, 144, 6, 5, 24)]


def _leaves(shape, dtype, seed=0):
    b, c, h, w, _ = shape
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, c, h, w, generator=g) * 2 + 0.7).to(dtype).contiguous(memory_format=CL)
    weight, bias = torch.randn(c, generator=g), torch.randn(c, generator=g)
    scale, shift = torch.randn(b, c, generator=g) * 0.5, torch.randn(b, c, generator=g)
    return [v.requires_grad_() for v in (x, weight, bias, scale, shift)]


def _brute_force(x, groups, weight, bias, scale, shift, eps, silu):
    """float64, per sample and group, from the definition."""
    x = x.double()
    out = torch.empty_like(x)
    per = x.shape[1] // groups
    for b in range(x.shape[0]):
        for g in range(groups):
            v = x[b, g * per:(g + 1) * per]
            mean, var = v.mean(), ((v - v.mean()) ** 2).mean()
            for c in range(g * per, (g + 1) * per):
                z = (x[b, c] - mean) / torch.sqrt(var + eps) * weight[c].double() + bias[c].double()
                z = z * (1 + scale[b, c].double()) + shift[b, c].double()
                out[b, c] = z * torch.sigmoid(z) if silu else z
    return out


@pytest.mark.parametrize("silu", [True, False])
def test_reference_matches_the_definition(silu):
    x, weight, bias, scale, shift = (v.detach() for v in _leaves((2, 12, 5, 6, 3), torch.float64))
    got = ops.group_norm_act(x, 3, weight, bias, 1e-5, scale, shift, silu, backend="torch")
    assert got.dtype == torch.float64
    assert torch.allclose(got, _brute_force(x, 3, weight, bias, scale, shift, 1e-5, silu), rtol=1e-12, atol=1e-12)


def test_reference_without_modulation_is_torch_group_norm_then_silu():
    x, weight, bias, _, _ = (v.detach() for v in _leaves((2, 16, 6, 6, 4), torch.float64))
    want = F.silu(F.group_norm(x, 4, weight.double(), bias.double(), 1e-5))
    assert torch.allclose(ops.group_norm_act(x, 4, weight, bias, backend="torch"), want, rtol=1e-12, atol=1e-12)


@needs_ext
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_float64_reference(shape, silu, dtype):
    """Values and the gradients of x, weight, bias, scale and shift. The kernel computes in float32 and
    rounds once, so in 16-bit types y and dx are within two roundings of the float64 truth."""
    groups = shape[-1]
    leaves = _leaves(shape, dtype, seed=sum(shape))
    y = ops.group_norm_act(leaves[0], groups, *leaves[1:3], 1e-5, *leaves[3:], silu)
    assert y.dtype == dtype and y.is_contiguous(memory_format=CL)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    got = torch.autograd.grad(y, leaves, grad)
    ref = [v.detach().double().requires_grad_() for v in leaves]
    y64 = ops.group_norm_act(ref[0], groups, *ref[1:3], 1e-5, *ref[3:], silu)
    want = torch.autograd.grad(y64, ref, grad.double())
    tol = {torch.float32: 2e-6, torch.bfloat16: 6e-3, torch.float16: 2e-3}[dtype]
    for name, a, b in [("y", y, y64)] + list(zip(("x", "weight", "bias", "scale", "shift"), got, want)):
        err = ((a.double() - b).abs().max() / b.abs().max()).item()
        # weight/bias/scale/shift gradients are float32 sums over whole channels: float32-level in every dtype
        limit = tol if name in ("y", "x") else 5e-6
        assert err < limit, (name, err)


@needs_ext
def test_kernel_does_not_depend_on_the_thread_count():
    leaves = _leaves((4, 16, 40, 40, 4), torch.float32, seed=3)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            y = ops.group_norm_act(leaves[0], 4, *leaves[1:3], 1e-5, *leaves[3:])
            results.append([y] + list(torch.autograd.grad(y.sum(), leaves)))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


@needs_ext
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_flushes_subnormals_only_inside_and_far_tails_stay_right(threads):
    """The kernel runs with subnormals flushed (csrc/include/vesselfast/cpu_dtype.h, FlushSubnormals) and
    must hand the caller's floating-point mode back: the calling thread runs a share of the blocks, alone
    for the small shape and beside a worker for the large one (above the kernel's ~32K elements per thread).
    Shifts of +-150 put z far past the exp's clamp on both sides, where the flushed lanes live."""
    leaves = _leaves((2, 16, 12, 12, 4) if threads == 1 else (2, 16, 64, 64, 4), torch.float32, seed=7)
    with torch.no_grad():
        leaves[4].copy_(torch.linspace(-150, 150, leaves[4].numel()).reshape(leaves[4].shape))
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        y = ops.group_norm_act(leaves[0], 4, *leaves[1:3], 1e-5, *leaves[3:])
        got = torch.autograd.grad(y, leaves, torch.ones_like(y))
        tiny, three = torch.tensor([1e-39]), 3.0  # 1e-39 is subnormal in float32
        assert (tiny * three).item() > 0 and (1e-310 * three) > 0, "the kernel left FTZ/DAZ set on this thread"
    finally:
        torch.set_num_threads(saved)
    ref = [v.detach().double().requires_grad_() for v in leaves]
    y64 = ops.group_norm_act(ref[0], 4, *ref[1:3], 1e-5, *ref[3:])
    want = torch.autograd.grad(y64, ref, torch.ones_like(y64))
    for name, a, b in [("y", y, y64)] + list(zip(("x", "weight", "bias", "scale", "shift"), got, want)):
        err = ((a.double() - b).abs().max() / b.abs().max()).item()
        assert err < 5e-6, (name, err)


@needs_ext
def test_backend_choice():
    x = torch.randn(2, 8, 6, 6)
    assert not gn.is_channels_last(x) and gn.is_channels_last(x.contiguous(memory_format=CL))
    assert not gn.is_channels_last(torch.randn(2, 1, 6, 6).contiguous(memory_format=CL))  # C=1: both layouts
    calls = []
    kernel = gn.group_norm_act_op.impls["cpu"]
    gn.group_norm_act_op.impls["cpu"] = lambda *a: calls.append(1) or kernel(*a)
    try:
        ref = ops.group_norm_act(x, 2)                                   # NCHW: the reference, NCHW out
        assert not calls and ref.is_contiguous()
        fused = ops.group_norm_act(x.contiguous(memory_format=CL), 2)     # channels_last: the kernel
        assert len(calls) == 1
        forced = ops.group_norm_act(x, 2, backend="cpu")                 # explicit: converts the layout
        assert len(calls) == 2
        assert ops.group_norm_act(x.double().contiguous(memory_format=CL), 2).dtype == torch.float64  # no kernel
        assert len(calls) == 2
    finally:
        gn.group_norm_act_op.impls["cpu"] = kernel
    assert torch.allclose(fused, ref, atol=1e-5) and torch.allclose(forced, ref, atol=1e-5)


@needs_ext
def test_bad_inputs_name_the_problem():
    x = torch.randn(2, 6, 4, 4).contiguous(memory_format=CL)
    s = torch.ones(2, 6)
    with pytest.raises(RuntimeError, match="6 channels do not split into 4 groups"):
        torch.ops.vesselfast.group_norm_act_fwd(x, s, s, 4, 1e-5, True)
    with pytest.raises(RuntimeError, match="channels_last"):
        torch.ops.vesselfast.group_norm_act_fwd(x.contiguous(), s, s, 3, 1e-5, True)
    with pytest.raises(RuntimeError, match=r"float32 \[B, C\]"):
        torch.ops.vesselfast.group_norm_act_fwd(x, s[:1], s, 3, 1e-5, True)


@needs_ext
def test_opcheck_and_compile():
    x, _, _, scale, shift = (v.detach() for v in _leaves((2, 8, 6, 5, 2), torch.float32, seed=7))
    y, mean, rstd = torch.ops.vesselfast.group_norm_act_fwd(x, scale, shift, 2, 1e-5, True)
    grad = torch.randn_like(y).contiguous(memory_format=CL)
    fwd, bwd = torch.ops.vesselfast.group_norm_act_fwd.default, torch.ops.vesselfast.group_norm_act_bwd.default
    for op, args in [(fwd, (x.requires_grad_(), scale, shift, 2, 1e-5, True)),
                     (fwd, (x.detach(), scale, shift, 2, 1e-5, False)),
                     (bwd, (grad, x.detach(), scale, shift, mean, rstd, 2, True))]:
        torch.library.opcheck(op, args)
    torch._dynamo.reset()
    fn = lambda v: ops.group_norm_act(v, 2, scale=scale, shift=shift)  # noqa: E731
    assert torch.equal(torch.compile(fn, fullgraph=True)(x.detach()), fn(x.detach()))


@needs_ext
@pytest.mark.parametrize("base", [16, 48])  # 48: a 144-channel norm in 24 groups
def test_generator_channels_last_equals_nchw(base):
    """The network with its norms in the kernel (channels_last) and in the reference (NCHW), same
    weights: outputs and parameter gradients agree to float32 precision."""
    torch.manual_seed(0)
    arch = GeneratorArch(base_channels=base, channel_mult=[1, 2], attention_levels=[1])
    nchw = GeneratorUNet(arch)
    for p in nchw.parameters():  # the zero-initialised output layers would hide differences
        torch.nn.init.normal_(p, std=0.1)
    cl = GeneratorUNet(arch).to(memory_format=CL)
    cl.load_state_dict(nchw.state_dict())
    x, cond = torch.randn(2, 1, 16, 16), (torch.rand(2, 1, 16, 16) < 0.2).float()
    t = torch.tensor([10, 700])
    calls = []
    kernel = gn.group_norm_act_op.impls["cpu"]
    gn.group_norm_act_op.impls["cpu"] = lambda *a: calls.append(1) or kernel(*a)
    try:
        out_cl = cl(x.contiguous(memory_format=CL), t, cond)
        n_cl = len(calls)
        out_nchw = nchw(x, t, cond)
    finally:
        gn.group_norm_act_op.impls["cpu"] = kernel
    n_norms = sum(isinstance(m, torch.nn.GroupNorm) for m in nchw.modules())
    assert n_cl == n_norms and len(calls) == n_norms  # every norm of the channels_last network, none of NCHW's
    assert torch.allclose(out_cl, out_nchw, rtol=1e-4, atol=1e-5)
    g_cl = torch.autograd.grad(out_cl.square().sum(), list(cl.parameters()))
    g_nchw = torch.autograd.grad(out_nchw.square().sum(), list(nchw.parameters()))
    for a, b in zip(g_cl, g_nchw):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4 * max(1.0, b.abs().max().item()))

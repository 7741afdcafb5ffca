"""The compiled ops as real torch ops: schemas, fake (meta) kernels and autograd registered
(by each op's module under vesselfast/ops/, at import), checked by ``torch.library.opcheck``, by ``torch.compile(fullgraph=True)``
over a function calling every op (result equal to eager), and by gradients against the reference."""
import pytest
import torch

from vesselfast import _ext, ops
from vesselfast.ops import diffusion_step as ds

pytestmark = pytest.mark.skipif(not _ext.cpu_built(), reason="vesselfast._C not built (VESSELFAST_NO_EXT)")
OPS = torch.ops.vesselfast


def _inputs(seed=0, shape=(3, 1, 12, 10)):
    g = torch.Generator().manual_seed(seed)
    x, eps, z = (torch.randn(shape, generator=g) for _ in range(3))
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    t = torch.tensor([999, 400, 3])
    return x * 1.5, eps, z, abar[t], abar[t - 1]


def test_opcheck_every_op():
    """Schema, fake tensor, autograd registration and AOT dispatch, as torch's own custom-op test does."""
    x, eps, z, ab_t, ab_p = _inputs()
    coef = ds.ddpm_coefficients(ab_t, ab_p, "fixed_large")
    w = (torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    loss, sum_w = OPS.vessel_noise_loss_fwd(eps, x, w)
    for op, args in [(OPS.diffusion_step.default, (x, eps, coef, z, True, True)),
                     (OPS.diffusion_step.default, (x.requires_grad_(), eps.requires_grad_(), coef, None, False, False)),
                     (OPS.diffusion_step_out.default, (x.detach(), eps.detach(), coef, z, True, torch.empty_like(x))),
                     (OPS.vessel_noise_loss_fwd.default, (eps.detach(), x.detach().requires_grad_(), w)),
                     (OPS.vessel_noise_loss_fwd.default, (eps.detach(), x.detach(), None)),
                     (OPS.vessel_noise_loss_bwd.default, (torch.ones(3), eps.detach(), x.detach(), w, sum_w))]:
        torch.library.opcheck(op, args)


def test_compile_fullgraph_equals_eager():
    x, eps, z, ab_t, ab_p = _inputs(2)
    coef = ds.ddim_coefficients(ab_t, ab_p, 0.5)
    w = (torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) < 0.3).float()

    def every_op(x, eps, z, coef, w):
        out, x0 = OPS.diffusion_step(x, eps, coef, z, True, True)
        buf = torch.empty_like(x)
        OPS.diffusion_step_out(out, eps, coef, None, True, buf)
        loss, sum_w = OPS.vessel_noise_loss_fwd(eps, buf, w)
        grad = OPS.vessel_noise_loss_bwd(torch.ones_like(loss), eps, buf, w, sum_w)
        return out, x0, buf, loss, grad

    torch._dynamo.reset()
    compiled = torch.compile(every_op, fullgraph=True)
    for got, want in zip(compiled(x, eps, z, coef, w), every_op(x, eps, z, coef, w)):
        assert torch.equal(got, want)


def test_diffusion_step_gradients_match_the_reference():
    """Autograd through torch.ops.vesselfast.diffusion_step (x, eps, noise; both outputs used) against
    autograd through the float64 reference formula on the same values."""
    x, eps, z, ab_t, ab_p = _inputs(4)
    for clip in (True, False):
        coef = ds.ddim_coefficients(ab_t, ab_p, 0.7)
        leaves = [v.clone().requires_grad_() for v in (x, eps, z)]
        out, x0 = OPS.diffusion_step(*leaves[:2], coef, leaves[2], clip, True)
        g_out, g_x0 = torch.randn_like(x), torch.randn_like(x)
        got = torch.autograd.grad((out * g_out).sum() + (x0 * g_x0).sum(), leaves)
        ref_leaves = [v.double().requires_grad_() for v in (x, eps, z)]
        r_out, r_x0 = ops.ddim_step_reference(*ref_leaves[:2], ab_t, ab_p, 0.7, ref_leaves[2], clip)
        want = torch.autograd.grad((r_out * g_out.double()).sum() + (r_x0 * g_x0.double()).sum(), ref_leaves)
        for name, a, b in zip(("x", "eps", "noise"), got, want):
            assert torch.allclose(a.double(), b, rtol=1e-4, atol=1e-4 * b.abs().max().item()), (clip, name)


def test_public_loss_gradient_flows_through_the_registered_autograd():
    x, eps, _, _, _ = _inputs(5)
    hat = x.clone().requires_grad_()
    w = (torch.rand(x.shape, generator=torch.Generator().manual_seed(6)) < 0.3).float()
    ops.vessel_noise_loss(eps, hat, w, backend="cpu").backward()
    h64 = x.double().requires_grad_()
    ops.vessel_noise_loss_reference(eps.double(), h64, w.double()).mean().backward()
    assert torch.allclose(hat.grad.double(), h64.grad, rtol=1e-5, atol=1e-7)


def test_per_sample_tables_are_cached_by_value():
    """Per-sample CPU alpha_bar tensors take the cached table (one build per set of values): the result
    equals the float64 reference, a tensor changed in place gets its own table, and a table built from
    the same values in a new tensor is a cache hit."""
    x, eps, z, ab_t, ab_p = _inputs(7)
    ds._cached_table.cache_clear()
    first = ops.ddim_step(x, eps, ab_t, ab_p, backend="cpu")
    want, _ = ops.ddim_step_reference(x.double(), eps.double(), ab_t, ab_p)
    assert torch.allclose(first.double(), want, rtol=1e-5, atol=1e-5)
    again = ops.ddim_step(x, eps, ab_t.clone(), ab_p.clone(), backend="cpu")
    assert torch.equal(first, again) and ds._cached_table.cache_info().hits == 1
    ab_p[1] = ab_t[1]  # in place: a no-op step for sample 1 (x0 re-noised to the same level)
    moved = ops.ddim_step(x, eps, ab_t, ab_p, backend="cpu")
    want, _ = ops.ddim_step_reference(x.double(), eps.double(), ab_t, ab_p)
    assert torch.allclose(moved.double(), want, rtol=1e-5, atol=1e-5) and not torch.equal(moved[1], first[1])
    assert ds._cached_table.cache_info().misses == 2

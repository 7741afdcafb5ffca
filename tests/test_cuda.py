"""The GPU paths: the ``cuda`` and ``triton`` backends on CUDA tensors against the float64 reference, the
out= form, the loss's gradients, torch.compile over the ops, precision ``auto`` and fp16 gradient
scaling, and the tiny preset end to end on the GPU. Marked ``cuda``: skipped without a GPU (CI), run by
scripts/device_check.sh on a lent one, where a missing CUDA build fails instead of skipping."""
import pytest
import torch

from vesselfast import _ext, ops
from vesselfast.ops import diffusion_step as ds
from vesselfast.ops.registry import backend_unavailable_reason

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DEV = "cuda"
BACKENDS = ("cuda", "triton")
RTOL = {torch.float32: 2e-6, torch.bfloat16: 2.0 ** -8 + 1e-6, torch.float16: 2.0 ** -11 + 1e-6}


def _abar():
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)


def _inputs(dtype, shape=(3, 1, 67, 129), seed=0):
    g = torch.Generator().manual_seed(seed)
    x, eps, z = (torch.randn(shape, generator=g) for _ in range(3))
    t = torch.tensor([999, 400, 0])
    return (x * 1.5).to(dtype), eps.to(dtype), z.to(dtype), t


def _close(got, want64, want32, dtype, what):
    """|got - want| <= 4 x the float32 reference's own error + one rounding to ``dtype``."""
    got64 = got.double().cpu()
    atol = 4 * (want32.double() - want64).abs().flatten(1).amax(1).reshape(-1, *([1] * (got.dim() - 1))) + 1e-7
    bad = (got64 - want64).abs() > atol + RTOL[dtype] * want64.abs()
    assert torch.isfinite(got64).all() and not bad.any(), f"{what}: {int(bad.sum())} elements off"


def test_cuda_extension_is_built_and_picked():
    assert _ext.cuda_built(), _ext.load()[1] or "vesselfast._C has no CUDA kernels: rebuild with CUDA_HOME set"
    for name in BACKENDS:
        assert backend_unavailable_reason(name, torch.device(DEV)) is None, name
    assert ops.OPS["ddim_step"].pick(DEV) == "cuda"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["ddim", "ddim_inverse", "ddpm"])
@pytest.mark.parametrize("into", [False, True], ids=["new", "out="])
def test_steps_match_the_float64_reference(backend, dtype, kind, into):
    x, eps, z, t = _inputs(dtype)
    ab = _abar()
    a_t, a_o = ab[t], torch.where(t - 20 >= 0, ab[(t - 20).clamp(min=0)], torch.ones(()))
    a_n = ab[(t + 20).clamp(max=999)]

    def run(fn, xx, ee, zz, **kw):
        if kind == "ddim":
            return fn["ddim"](xx, ee, a_t, a_o, eta=0.5, noise=zz, **kw)
        if kind == "ddim_inverse":
            return fn["inv"](xx, ee, a_t, a_n, **kw)
        return fn["ddpm"](xx, ee, a_t, torch.where(t - 1 >= 0, ab[(t - 1).clamp(min=0)], torch.ones(())), noise=zz, **kw)
    public = {"ddim": ops.ddim_step, "inv": ops.ddim_inverse_step, "ddpm": ops.ddpm_step}
    reference = {"ddim": ops.ddim_step_reference, "inv": ops.ddim_inverse_step_reference, "ddpm": ops.ddpm_step_reference}
    gx, ge, gz = (v.to(DEV) for v in (x, eps, z))
    out = torch.empty_like(gx) if into else None
    got = run(public, gx, ge, gz, backend=backend, out=out)
    if into:
        assert got.data_ptr() == out.data_ptr()
    want64 = run(reference, x.double(), eps.double(), z.double())[0]
    want32 = run(reference, x.float(), eps.float(), z.float())[0]
    _close(got, want64, want32, dtype, f"{kind} [{backend}, {dtype}]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_forward_backward_match_float64(backend):
    x, eps, _, _ = _inputs(torch.float32, seed=3)
    w = (torch.rand(x.shape, generator=torch.Generator().manual_seed(4)) < 0.3).float()
    hat = x.to(DEV).requires_grad_()
    loss = ops.vessel_noise_loss(eps.to(DEV), hat, w.to(DEV), reduction="none", backend=backend)
    loss.sum().backward()
    h64 = x.double().requires_grad_()
    want = ops.vessel_noise_loss_reference(eps.double(), h64, w.double())
    want.sum().backward()
    assert torch.allclose(loss.double().cpu(), want.detach(), rtol=1e-5)
    assert torch.allclose(hat.grad.double().cpu(), h64.grad, rtol=1e-5, atol=1e-8)


def test_compile_fullgraph_on_gpu_equals_eager():
    x, eps, z, t = _inputs(torch.float32, seed=5)
    x, eps, z = x.to(DEV), eps.to(DEV), z.to(DEV)
    coef = ds.ddim_coefficients(_abar()[t], _abar()[(t - 20).clamp(min=0)], 0.3).to(DEV)

    def f(x, eps, z, coef):
        out, x0 = torch.ops.vesselfast.diffusion_step(x, eps, coef, z, True, True)
        loss, _ = torch.ops.vesselfast.vessel_noise_loss_fwd(eps, out, None)
        return out, x0, loss
    torch._dynamo.reset()
    for got, want in zip(torch.compile(f, fullgraph=True)(x, eps, z, coef), f(x, eps, z, coef)):
        assert torch.equal(got, want)


def test_precision_auto_and_fp16_scaling_on_gpu():
    from vesselfast.hardware import resolve_precision
    from vesselfast.pipeline.segmentation import train_segmenter

    precision, why = resolve_precision("auto", DEV)
    if torch.cuda.get_device_capability() >= (8, 0):
        assert precision == "bf16", why
    g = torch.Generator().manual_seed(0)
    images = torch.rand(16, 1, 32, 32, generator=g) * 2 - 1
    masks = (torch.rand(16, 1, 32, 32, generator=g) < 0.2).float()
    model = train_segmenter(images, masks, 5, 4, device=DEV, precision="fp16", channels=(8, 16))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_tiny_preset_on_gpu(tmp_path):
    import json

    from vesselfast.cli import main

    assert main(["train", "--preset", "tiny", "--device", "cuda", "--out", str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["target_test"]
    assert {"baseline", "baseline_histmatch", "iter0", "iter1"} <= set(metrics)

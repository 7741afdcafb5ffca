"""Our diffusion conventions against the field's reference implementation, diffusers, in float64.

Pinned equalities (docs/METHOD.md, "Which diffusers settings these equal"):
- the linear schedule and alpha_bar (diffusers' "linear" betas computed in float64);
- 50-step respacing = ``DDIMScheduler(timestep_spacing="leading", steps_offset=0)``;
- the DDIM step = ``DDIMScheduler(clip_sample=True, set_alpha_to_one=True).step(..., use_clipped_model_output=True)``
  with injected noise, eta 0 and > 0;
- the DDPM step = ``DDPMScheduler(variance_type="fixed_small" | "fixed_large", clip_sample=True)``;
- the inversion update = ``DDIMInverseScheduler(clip_sample=False)``'s step (where diffusers keeps the raw
  eps after clipping, so with clipping on the two differ; it also evaluates the network one level up).
Pinned differences: T != 1000 scales the betas by 1000/T (improved-diffusion), and for N not dividing T
our timesteps are floor(i*T/N), not "leading"'s i*(T//N).
"""
import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from vesselfast import ops  # noqa: E402
from vesselfast.diffusion import NoiseSchedule  # noqa: E402

T, N = 1000, 50
OURS = NoiseSchedule.make("linear", T)
BETAS64 = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)  # diffusers' "linear" formula, in float64


def _float64(sched):
    """A diffusers scheduler with its schedule tensors in float64 (it builds them in float32)."""
    sched.betas = BETAS64.clone()
    sched.alphas = 1.0 - sched.betas
    sched.alphas_cumprod = torch.cumprod(sched.alphas, 0)
    for name in ("final_alpha_cumprod", "initial_alpha_cumprod"):
        if hasattr(sched, name):
            setattr(sched, name, torch.tensor(1.0, dtype=torch.float64))
    sched.one = torch.tensor(1.0, dtype=torch.float64)
    return sched


def _tensors(seed, shape=(2, 1, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))


def test_schedule_equals_diffusers_linear():
    assert np.allclose(OURS.betas, BETAS64.numpy(), rtol=0, atol=1e-15)
    sched = _float64(diffusers.DDIMScheduler(num_train_timesteps=T))
    assert np.allclose(OURS.alphas_cumprod, sched.alphas_cumprod.numpy(), rtol=1e-14, atol=0)


def test_respacing_equals_leading_when_n_divides_t():
    sched = diffusers.DDIMScheduler(num_train_timesteps=T, timestep_spacing="leading", steps_offset=0)
    sched.set_timesteps(N)
    assert sched.timesteps.tolist() == OURS.ddim_timesteps(N)[::-1]


def test_respacing_differs_from_leading_when_n_does_not_divide_t():
    sched = diffusers.DDIMScheduler(num_train_timesteps=T, timestep_spacing="leading", steps_offset=0)
    sched.set_timesteps(30)
    ours = OURS.ddim_timesteps(30)
    assert ours == [i * T // 30 for i in range(30)]           # floor(i T / N): ends at 966
    assert sched.timesteps.tolist()[::-1] == [i * (T // 30) for i in range(30)]  # i (T // N): ends at 957
    assert ours != sched.timesteps.tolist()[::-1]


def test_betas_scale_with_t_unlike_diffusers():
    """improved-diffusion's convention: for T steps the betas are linspace(1e-4, 0.02) * 1000 / T, so every
    T covers the same noise range; diffusers keeps beta_start / beta_end as given."""
    ours = NoiseSchedule.make("linear", 100).betas
    assert np.allclose(ours, np.linspace(1e-3, 0.2, 100))
    d = diffusers.DDPMScheduler(num_train_timesteps=100).betas.double().numpy()
    assert np.allclose(d, np.linspace(1e-4, 0.02, 100), atol=1e-9) and not np.allclose(ours, d)


@pytest.mark.parametrize("eta", [0.0, 0.6])
@pytest.mark.parametrize("t", [980, 500, 20, 0])
def test_ddim_step_equals_diffusers(eta, t):
    sched = _float64(diffusers.DDIMScheduler(num_train_timesteps=T, clip_sample=True, set_alpha_to_one=True,
                                             timestep_spacing="leading", steps_offset=0))
    sched.set_timesteps(N)
    x, eps, z = _tensors(t + int(10 * eta))
    x = x * 2.0  # some x0 predictions fall outside [-1, 1]: clipping and the eps re-derivation matter
    want = sched.step(eps, t, x, eta=eta, use_clipped_model_output=True, variance_noise=z)
    prev = t - T // N
    abar_prev = float(OURS.alpha_bar(prev)) if prev >= 0 else 1.0
    for fn in (ops.ddim_step_reference, lambda *a, **k: ops.ddim_step(*a, **k, backend="torch", return_x0=True)):
        got, x0 = fn(x, eps, float(OURS.alpha_bar(t)), abar_prev, eta=eta, noise=z, clip=True)
        assert torch.allclose(got, want.prev_sample, rtol=0, atol=1e-13)
        assert torch.allclose(x0, want.pred_original_sample, rtol=0, atol=1e-13)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("t", [999, 400, 1])
def test_ddpm_step_equals_diffusers(variance, t):
    sched = _float64(diffusers.DDPMScheduler(num_train_timesteps=T, variance_type=variance, clip_sample=True))
    x, eps, _ = _tensors(t)
    x = x * 2.0
    want = sched.step(eps, t, x, generator=torch.Generator().manual_seed(7)).prev_sample
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)  # diffusers' draw
    got, _ = ops.ddpm_step_reference(x, eps, float(OURS.alpha_bar(t)), float(OURS.alpha_bar(t - 1)), noise=z,
                                     variance=variance, clip=True)
    assert torch.allclose(got, want, rtol=0, atol=1e-13)


@pytest.mark.parametrize("t", [20, 300])
def test_inversion_update_equals_diffusers_without_clipping(t):
    """DDIMInverseScheduler.step(eps, t_next, x) moves x from level t_next - T/N to t_next; with clipping
    off it is our ddim_inverse_step (with clipping on, diffusers keeps the raw eps, we re-derive it)."""
    sched = _float64(diffusers.DDIMInverseScheduler(num_train_timesteps=T, clip_sample=False, set_alpha_to_one=True))
    sched.set_timesteps(N)
    x, eps, _ = _tensors(t)
    want = sched.step(eps, t, x).prev_sample
    got, _ = ops.ddim_inverse_step_reference(x, eps, float(OURS.alpha_bar(t - T // N)), float(OURS.alpha_bar(t)),
                                             clip=False)
    assert torch.allclose(got, want, rtol=0, atol=1e-13)
    clipped = _float64(diffusers.DDIMInverseScheduler(num_train_timesteps=T, clip_sample=True, set_alpha_to_one=True))
    clipped.set_timesteps(N)
    big = x * 4.0
    ours, _ = ops.ddim_inverse_step_reference(big, eps, float(OURS.alpha_bar(t - T // N)), float(OURS.alpha_bar(t)))
    assert not torch.allclose(ours, clipped.step(eps, t, big).prev_sample)  # the documented difference

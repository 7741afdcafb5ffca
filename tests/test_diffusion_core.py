"""Diffusion core against known values and float64 re-derivations written here from docs/METHOD.md."""
import math

import numpy as np
import pytest
import torch

from vesselfast.diffusion import NoiseSchedule, ddim_invert, ddim_sample, ddpm_sample, make_sampler, t0_index
from vesselfast.ops import ddim_inverse_step, ddim_step, ddpm_step

SCHED = NoiseSchedule.make("linear", 1000)


def test_linear_schedule_known_values():
    abar = SCHED.alphas_cumprod
    assert abar.dtype == np.float64
    assert abar[0] == pytest.approx(0.9999, abs=1e-12)
    assert abar[300] == pytest.approx(0.394011, abs=5e-7)
    assert abar[999] == pytest.approx(4.036e-5, rel=1e-3)
    # brute-force product of (1 - beta) in plain Python floats
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    assert abar[500] == pytest.approx(math.prod(1 - b for b in betas[:501]), rel=1e-12)


def test_schedule_scales_with_T_and_cosine():
    s = NoiseSchedule.make("linear", 100)
    assert s.betas[0] == pytest.approx(1e-3) and s.betas[-1] == pytest.approx(0.2)
    c = NoiseSchedule.make("cosine", 1000).alphas_cumprod
    assert np.all(np.diff(c) < 0) and c[0] > 0.999 and c[-1] < 1e-3


def test_alpha_bar_gather_and_clean_level():
    a = SCHED.alpha_bar(torch.tensor([-1, 0, 300]))
    assert a.dtype == torch.float64
    assert a.tolist() == [1.0, SCHED.alphas_cumprod[0], SCHED.alphas_cumprod[300]]
    with pytest.raises(ValueError):
        SCHED.alpha_bar([1000])


def test_q_sample_per_sample_timesteps():
    x0, noise = torch.randn(3, 1, 4, 5, dtype=torch.float64), torch.randn(3, 1, 4, 5, dtype=torch.float64)
    t = torch.tensor([0, 500, 999])
    xt = SCHED.q_sample(x0, t, noise)
    for i, ti in enumerate(t.tolist()):
        ab = SCHED.alphas_cumprod[ti]
        assert torch.allclose(xt[i], math.sqrt(ab) * x0[i] + math.sqrt(1 - ab) * noise[i], atol=1e-14)


def test_ddim_respacing_and_t0():
    ts = SCHED.ddim_timesteps(50)
    assert ts[:3] == [0, 20, 40] and ts[-1] == 980 and len(ts) == 50
    assert t0_index(0.3, 50) == 15 and ts[15] == 300
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError):
            t0_index(bad, 50)


# ---- single steps against scalar float64 math, per element, per-sample timesteps ----

def _scalar_pred(x, e, ab, clip):
    x0 = math.sqrt(1 / ab) * x - math.sqrt(1 / ab - 1) * e
    if clip:
        x0 = min(1.0, max(-1.0, x0))
    return x0, (math.sqrt(1 / ab) * x - x0) / math.sqrt(1 / ab - 1)


def _per_sample_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 1, 3, 4, generator=g, dtype=torch.float64) * 1.5
    return x, torch.randn(x.shape, generator=g, dtype=torch.float64), torch.randn(x.shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_matches_scalar_math(clip, eta):
    x, e, z = _per_sample_inputs()
    t, tp = [980, 300, 20], [960, 280, -1]
    ab, abp = SCHED.alpha_bar(t), SCHED.alpha_bar(tp)
    out = ddim_step(x, e, ab, abp, eta=eta, noise=z if eta else None, clip=clip, backend="torch")
    for i in range(3):
        a, ap = ab[i].item(), abp[i].item()
        sigma = eta * math.sqrt((1 - ap) / (1 - a)) * math.sqrt(1 - a / ap)
        for xv, ev, zv, ov in zip(x[i].flatten().tolist(), e[i].flatten().tolist(), z[i].flatten().tolist(),
                                  out[i].flatten().tolist()):
            x0, ep = _scalar_pred(xv, ev, a, clip)
            want = math.sqrt(ap) * x0 + math.sqrt(max(0.0, 1 - ap - sigma ** 2)) * ep + sigma * zv
            assert ov == pytest.approx(want, abs=1e-12)


def test_ddim_last_step_returns_x0_without_noise():
    x, e, z = _per_sample_inputs(1)
    out, x0 = ddim_step(x, e, SCHED.alpha_bar([20] * 3), 1.0, eta=1.0, noise=z, return_x0=True, backend="torch")
    assert torch.allclose(out, x0, atol=1e-14)


def test_ddim_inverse_step_matches_scalar_math():
    x, e, _ = _per_sample_inputs(2)
    t, tn = [0, 280, 500], [20, 300, 520]
    out = ddim_inverse_step(x, e, SCHED.alpha_bar(t), SCHED.alpha_bar(tn), clip=True, backend="torch")
    for i in range(3):
        a, an = SCHED.alphas_cumprod[t[i]], SCHED.alphas_cumprod[tn[i]]
        for xv, ev, ov in zip(x[i].flatten().tolist(), e[i].flatten().tolist(), out[i].flatten().tolist()):
            x0, ep = _scalar_pred(xv, ev, a, True)
            assert ov == pytest.approx(math.sqrt(an) * x0 + math.sqrt(1 - an) * ep, abs=1e-12)


@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
def test_ddpm_step_matches_scalar_math(variance):
    x, e, z = _per_sample_inputs(3)
    t = [999, 300, 0]
    out = ddpm_step(x, e, SCHED.alpha_bar(t), SCHED.alpha_bar([s - 1 for s in t]), noise=z, variance=variance,
                    backend="torch")
    betas = SCHED.betas
    for i in range(3):
        ti = t[i]
        a = SCHED.alphas_cumprod[ti]
        ap = SCHED.alphas_cumprod[ti - 1] if ti > 0 else 1.0
        beta = betas[ti]
        var = beta if variance == "fixed_large" else beta * (1 - ap) / (1 - a)
        sigma = math.sqrt(var) if ti > 0 else 0.0
        for xv, ev, zv, ov in zip(x[i].flatten().tolist(), e[i].flatten().tolist(), z[i].flatten().tolist(),
                                  out[i].flatten().tolist()):
            x0, _ = _scalar_pred(xv, ev, a, True)
            mu = beta * math.sqrt(ap) / (1 - a) * x0 + (1 - ap) * math.sqrt(1 - beta) / (1 - a) * xv
            assert ov == pytest.approx(mu + sigma * zv, abs=1e-10)


# ---- loops ----

def gaussian_eps_fn(s2: float, schedule=SCHED):
    """Exact E[eps | x_t] for data x0 ~ N(0, s2 I): a smooth model that DDIM can invert."""
    def fn(x, t):
        ab = schedule.alpha_bar(t).to(x.dtype).reshape(-1, 1, 1, 1)
        return torch.sqrt(1 - ab) * x / (ab * s2 + 1 - ab)
    return fn


def test_inversion_then_sampling_recovers_input():
    """DDIM inversion is a first-order discretisation of the probability-flow ODE: inverting then
    sampling back over the same respaced steps returns the input up to an O(1/N) error."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64) * 0.5
    fn = gaussian_eps_fn(0.25)
    errors = {}
    for n in (50, 500):
        t0 = t0_index(0.3, n)
        latent = ddim_invert(fn, SCHED, x0, num_steps=n, t0_steps=t0, clip=False)
        assert (latent - x0).abs().max() > 0.1  # the latent really is noisier (level 300)
        back = ddim_sample(fn, SCHED, latent, num_steps=n, start_index=t0, clip=False)
        errors[n] = ((back - x0).abs().max() / x0.abs().max()).item()
    assert errors[500] < 0.012
    assert errors[50] / errors[500] > 5  # first-order convergence (ideal: 10)


def test_loops_call_the_network_as_documented():
    calls = []
    def fn(x, t):
        calls.append(int(t[0]))
        return torch.zeros_like(x)
    x = torch.zeros(1, 1, 4, 4)
    ddim_invert(fn, SCHED, x, 50, 15)
    assert calls == list(range(0, 300, 20)); calls.clear()
    ddim_sample(fn, SCHED, x, 50, start_index=15)
    assert calls == list(range(300, -1, -20)); calls.clear()
    ddim_sample(fn, SCHED, x, 10)
    assert calls == list(range(900, -1, -100)); calls.clear()
    ddpm_sample(fn, NoiseSchedule.make("linear", 50), x)
    assert calls == list(range(49, -1, -1))


@pytest.mark.parametrize("name,evals,noisy", [("ddim_latent", 16, False), ("ddpm_latent", 301, True),
                                              ("ddim_noise", 25, True), ("ddpm_noise", 1000, True)])
def test_sampler_objects_count_their_evaluations_and_draws(name, evals, noisy):
    """Each sampler object states its network evaluations per image and whether it draws random numbers;
    both are checked against what its loop actually does (calls counted, generator state compared)."""
    sampler = make_sampler(name, ddim_steps=50, t0_steps=15, noise_steps=25)
    assert sampler.name == name and sampler.evals_per_image(SCHED) == evals and sampler.draws_noise() == noisy
    calls = []

    def fn(x, t):
        calls.append(int(t[0]))
        return torch.zeros_like(x)
    g = torch.Generator().manual_seed(0)
    before = g.get_state()
    x = sampler.start(torch.zeros(2, 1, 4, 4), torch.Size((2, 1, 4, 4)), "cpu", g)
    sampler.sample(fn, SCHED, x, g)
    assert len(calls) == evals
    assert (not torch.equal(before, g.get_state())) == noisy
    assert make_sampler("ddim_latent", ddim_steps=50, t0_steps=15, eta=0.5).draws_noise()
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler("ddim", ddim_steps=50)


def test_injected_noise_reproduces_and_progress_reports():
    fn = gaussian_eps_fn(0.25)
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    noises = [torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(i)) for i in range(50)]
    seen = []
    a = ddim_sample(fn, SCHED, x, 10, eta=1.0, noise_fn=lambda i, shape: noises[i], progress=lambda d, n: seen.append((d, n)))
    b = ddim_sample(fn, SCHED, x, 10, eta=1.0, noise_fn=lambda i, shape: noises[i])
    c = ddim_sample(fn, SCHED, x, 10, eta=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert seen[-1] == (10, 10) and len(seen) == 10
    s20 = NoiseSchedule.make("linear", 50)
    d1 = ddpm_sample(fn, s20, x, generator=torch.Generator().manual_seed(3))
    d2 = ddpm_sample(fn, s20, x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(d1, d2)


def test_ddpm_sampling_reaches_data_distribution():
    """Ancestral sampling of the exact Gaussian model gives samples with the data's variance."""
    s20 = NoiseSchedule.make("linear", 200)
    fn = gaussian_eps_fn(0.04, s20)
    x = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = ddpm_sample(fn, s20, x, generator=torch.Generator().manual_seed(1), clip=False)
    assert out.std().item() == pytest.approx(0.2, rel=0.1)


@pytest.mark.parametrize("loop", ["ddim_sample", "ddim_invert", "ddpm_sample"])
def test_loops_write_into_two_buffers_and_match_fresh_outputs(loop, monkeypatch):
    """Each loop's steps write into two buffers used in turn (no image-sized allocation per step), leave
    the caller's input untouched, and give exactly what steps into fresh tensors give."""
    import vesselfast.diffusion.sampling as sampling

    fn = gaussian_eps_fn(0.25)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    x_before = x.clone()
    s50 = NoiseSchedule.make("linear", 50)
    run = {"ddim_sample": lambda: ddim_sample(fn, SCHED, x, 10, eta=0.5, generator=torch.Generator().manual_seed(2)),
           "ddim_invert": lambda: ddim_invert(fn, SCHED, x, 50, 15),
           "ddpm_sample": lambda: ddpm_sample(fn, s50, x, generator=torch.Generator().manual_seed(2))}[loop]
    step_name = {"ddim_sample": "ddim_step", "ddim_invert": "ddim_inverse_step", "ddpm_sample": "ddpm_step"}[loop]
    real = getattr(sampling, step_name)
    buffers, inputs = [], []

    def recording(x_t, *args, out=None, **kw):
        buffers.append(out.data_ptr())
        inputs.append(x_t.data_ptr())
        return real(x_t, *args, out=out, **kw)

    with monkeypatch.context() as mp:
        mp.setattr(sampling, step_name, recording)
        got = run()
    assert len(set(buffers)) == 2 and all(a != b for a, b in zip(buffers, buffers[1:]))
    assert inputs[0] == x.data_ptr() and inputs[1:] == buffers[:-1]  # each step reads what the last wrote
    assert torch.equal(x, x_before)

    def fresh(x_t, *args, out=None, **kw):  # the same step into a new tensor
        return real(x_t, *args, **kw)
    with monkeypatch.context() as mp:
        mp.setattr(sampling, step_name, fresh)
        assert torch.equal(run(), got)

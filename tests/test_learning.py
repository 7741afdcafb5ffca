"""Tests that fail when learning breaks (not only when shapes or ranges do): on the built-in data a few
hundred segmenter steps beat a constant predictor by a clear DSC margin, a generator's noise-prediction
loss on a fixed held-out batch falls, and its conditional version uses the mask."""
import numpy as np
import pytest
import torch

from vesselfast.data import builtin_domain, random_crops, thick_mask
from vesselfast.diffusion import NoiseSchedule
from vesselfast.metrics import dsc
from vesselfast.ops import vessel_noise_loss
from vesselfast.pipeline.config import GeneratorTrainConfig
from vesselfast.pipeline.generative import build_generator, train_generator
from vesselfast.pipeline.segmentation import predict_probs, train_segmenter


def _crops(role, split, n_images, n_crops, seed):
    samples = builtin_domain(role, split, n_images, 96, seed)
    images, masks, _ = random_crops(samples, n_crops, 32, np.random.default_rng(seed))
    return samples, torch.as_tensor(images), None if masks is None else torch.as_tensor(masks)


def test_segmenter_beats_a_constant_predictor():
    _, images, masks = _crops("source", "train", 6, 256, 0)
    model = train_segmenter(images, masks, 250, batch_size=8, lr=3e-3, seed=0, precision="fp32",
                            channels=(8, 16, 32))
    test = builtin_domain("source", "test", 4, 96, 0)
    learned, constant = [], []
    for s in test:
        p = predict_probs(model, s.image, 64, 32, precision="fp32")
        learned.append(dsc((p >= 0.5) & s.fov, s.mask))
        constant.append(dsc(s.fov, s.mask))  # "everything in the FOV is vessel": the best constant for DSC
    assert np.mean(learned) > np.mean(constant) + 0.25, (np.mean(learned), np.mean(constant))


def _heldout_loss(model, schedule, x0, mask, cond=None):
    """The training loss on a fixed batch (fixed timesteps and noise), weighted by ``mask``'s vessels; the
    network sees ``cond`` (default: ``mask``)."""
    g = torch.Generator().manual_seed(123)
    t = torch.randint(0, schedule.T, (x0.shape[0],), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        eps = model.eval()(schedule.q_sample(x0, t, noise), t, mask if cond is None else cond)
    w = None if mask is None else thick_mask(mask, 2)
    return float(vessel_noise_loss(noise, eps, w, backend="torch"))


@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "mask-conditioned"])
def test_generator_loss_falls_on_a_heldout_batch(conditional):
    gcfg = GeneratorTrainConfig(base_channels=8, channel_mult=[1, 2], batch_size=8, lr=2e-3, precision="fp32")
    schedule = NoiseSchedule.make("linear", 100)
    role = "source" if conditional else "target"
    _, images, masks = _crops(role, "train", 6, 128, 1)
    _, held_images, held_masks = _crops(role, "val" if conditional else "train", 4, 16, 2)
    masks = masks if conditional else None
    held_masks = held_masks if conditional else None
    model = build_generator(gcfg, 0)
    before = _heldout_loss(model, schedule, held_images, held_masks)
    ema = train_generator(model, images, masks, 150, gcfg, schedule, seed=0)
    after = _heldout_loss(model, schedule, held_images, held_masks)
    assert after < 0.6 * before, (before, after)
    smoothed = build_generator(gcfg, 0)
    smoothed.load_state_dict(ema.state_dict())
    assert _heldout_loss(smoothed, schedule, held_images, held_masks) < before  # the EMA learned too
    if conditional:  # the mask channel carries information: a wrong mask predicts the noise worse
        wrong = torch.roll(held_masks, shifts=(7, 5), dims=(-2, -1))
        assert _heldout_loss(model, schedule, held_images, held_masks, cond=wrong) > after

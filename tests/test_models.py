"""Networks: shapes, conditioning, zero-init output, timestep embedding, EMA, precision switches."""
import math

import pytest
import torch

from vesselfast.models import EMA, GeneratorArch, GeneratorUNet, SegmenterUNet, autocast, timestep_embedding

SMALL = GeneratorArch(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,))


def test_timestep_embedding_formula():
    t = torch.tensor([0, 7, 300])
    emb = timestep_embedding(t, 8)
    for i, ti in enumerate(t.tolist()):
        for k in range(4):
            f = ti * math.exp(-math.log(10000) * k / 4)
            assert emb[i, k].item() == pytest.approx(math.cos(f), abs=1e-5)
            assert emb[i, 4 + k].item() == pytest.approx(math.sin(f), abs=1e-5)


def test_every_width_builds_with_the_group_and_head_counts_of_the_rule():
    """Norm groups: ch / 4 capped at 32 where that divides ch (every width that built before keeps its
    count), else the largest divisor below it (brute force); attention heads likewise; any base width
    builds (base 48 with (1, 2, 2) has a 144-channel concatenation that 32 groups do not divide)."""
    from vesselfast.models.generator import AttentionBlock, _norm

    for ch in range(1, 600):
        cap = max(1, min(32, ch // 4))
        groups = _norm(ch).num_groups
        assert groups == max(d for d in range(1, cap + 1) if ch % d == 0)
        if ch % cap == 0:
            assert groups == cap
        with torch.device("meta"):
            heads = AttentionBlock(ch).heads
        assert ch % heads == 0 and heads == max(d for d in range(1, max(1, ch // 32) + 1) if ch % d == 0)
    for base in range(1, 65):
        with torch.device("meta"):
            net = GeneratorUNet(GeneratorArch(base_channels=base, channel_mult=(1, 2, 2), attention_levels=(2,)))
        assert all(m.num_channels % m.num_groups == 0 for m in net.modules() if isinstance(m, torch.nn.GroupNorm))


def test_generator_output_zero_initialised_then_depends_on_inputs():
    torch.manual_seed(0)
    g = GeneratorUNet(SMALL)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 900])
    assert torch.count_nonzero(g(x, t)) == 0  # zero-initialised output conv
    with torch.no_grad():  # leave the zero-init state: every zero-initialised layer gets weights
        for p in g.parameters():
            if not p.any():
                p.normal_(std=0.1)
    cond = (torch.rand(2, 1, 16, 16) > 0.5).float()
    a, b, c = g(x, t, cond), g(x, t, None), g(x, torch.tensor([11, 900]), cond)
    assert a.shape == x.shape
    assert not torch.allclose(a, b)                    # the mask channel conditions the output
    assert torch.allclose(g(x, t, torch.zeros_like(cond)), b)  # None == zeros (unconditional model)
    assert not torch.allclose(a[0], c[0]) and torch.allclose(a[1], c[1], atol=1e-6)  # per-sample t
    with pytest.raises(ValueError, match="divisible"):
        g(torch.randn(1, 1, 15, 16), t[:1])


def test_generator_trains_in_bf16_and_channels_last():
    torch.manual_seed(0)
    g = GeneratorUNet(SMALL)
    x = torch.randn(2, 1, 16, 16)
    with autocast("cpu", "bf16"):
        out = g(x, torch.tensor([1, 2]))
    out.float().pow(2).mean().backward()
    assert g.out[-1].weight.grad is not None
    gl = GeneratorUNet(SMALL).to(memory_format=torch.channels_last)
    assert gl(x.contiguous(memory_format=torch.channels_last), torch.tensor([1, 2])).shape == x.shape
    with pytest.raises(ValueError):
        autocast("cpu", "fp16")


def test_segmenter_any_size_and_default_width():
    s = SegmenterUNet()
    assert 1.8e6 < sum(p.numel() for p in s.parameters()) < 2.2e6
    assert s.eval()(torch.randn(2, 1, 37, 53)).shape == (2, 1, 37, 53)


def test_ema_tracks_weights():
    m = torch.nn.Linear(3, 1)
    ema = EMA(m, decay=0.5)
    before = ema.model.weight.clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(m)
    assert torch.allclose(ema.model.weight, 0.5 * before + 0.5 * m.weight)
    with pytest.raises(ValueError):
        EMA(m, decay=1.0)

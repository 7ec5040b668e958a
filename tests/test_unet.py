"""The DIP U-Net: preset sizes counted by hand, block names, shapes, sigmoid, MC dropout."""

import pytest
import torch
from torch import nn

from dip_uq.dip.unet import UNet, UNetConfig, build_unet, conv_weight_count, mc_dropout_samples


def test_small_preset_has_76608_conv_weights():
    net = UNet.from_preset("small")
    # inc 1*32*9; down 2 x (32*32*9 twice); up 2 x ((32+4)*32*9 + 32*32*9); skip 2 x 32*4; outc 32
    by_hand = 288 + 2 * 2 * 9216 + 2 * (36 * 32 * 9 + 9216) + 2 * 128 + 32
    assert by_hand == 76_608
    assert conv_weight_count(net) == 76_608


def test_large_preset_count_and_norm():
    net = UNet.from_preset("large")
    c = 128 * 128 * 9
    # 5 down blocks (2 convs each), 5 up blocks; only the two deepest ups get a 4-channel skip
    by_hand = 128 * 9 + 5 * 2 * c + 5 * 2 * c + 2 * (4 * 128 * 9) + 2 * (128 * 4) + 128
    assert conv_weight_count(net) == by_hand == 2_960_640
    assert any(isinstance(m, nn.GroupNorm) for m in net.modules())
    assert not net.config.use_sigmoid
    assert sorted(net.skip.keys()) == ["0", "1"]


def test_3d_count_scales_kernel_volume():
    n2 = conv_weight_count(UNet.from_preset("small", ndim=2))
    n3 = conv_weight_count(UNet.from_preset("small", ndim=3))
    # 3x3 weights grow by 27/9, 1x1 weights are unchanged (skip 2*128, outc 32)
    one_by_one = 2 * 128 + 32
    assert n3 == (n2 - one_by_one) * 3 + one_by_one


def test_blocks_identifiable_by_prefix():
    net = UNet.from_preset("small")
    blocks = net.blocks()
    assert set(blocks) == {"inc", "down.0", "down.1", "up.0", "up.1", "skip.0", "skip.1", "outc"}
    names = dict(net.named_parameters())
    for prefix, weights in blocks.items():
        for w in weights:
            assert w.startswith(prefix + ".") and w in names
    assert sum(names[w].numel() for ws in blocks.values() for w in ws) == 76_608


def test_zero_skip_builds_no_weights_and_no_input_channel():
    net = UNet(channels=(8, 8, 8), skip_channels=(0, 0, 3), use_sigmoid=False)
    assert list(net.skip.keys()) == ["0"]  # up.0 leaves scale 2 (skip 3); up.1 has none
    assert net.up[0].conv1.conv.in_channels == 8 + 3
    assert net.up[1].conv1.conv.in_channels == 8


@pytest.mark.parametrize("shape", [(28, 28), (29, 31), (9, 10, 11)])
def test_shapes_and_sigmoid_range(shape):
    net = UNet.from_preset("small", ndim=len(shape), generator=torch.Generator().manual_seed(0))
    out = net(torch.randn(2, 1, *shape))
    assert out.shape == (2, 1, *shape)
    assert out.min() > 0 and out.max() < 1


def test_sigmoid_preactivation_is_clamped():
    net = UNet(channels=(4,), skip_channels=(0,))
    t = torch.tensor([-100.0, -15.0, 0.0, 40.0])
    assert torch.equal(net.activation(t), torch.sigmoid(t.clamp(-15, 15)))
    z = torch.randn(1, 1, 8, 8)
    assert torch.equal(net(z), net.activation(net.pre_activation(z)))


def test_groupnorm_layout():
    net = UNet(channels=(4, 6), skip_channels=(0, 2), use_norm=True)
    assert isinstance(net.inc.norm, nn.GroupNorm) and net.inc.norm.num_groups == 1
    assert isinstance(net.skip["0"].norm, nn.GroupNorm)
    assert not hasattr(net.outc, "norm")


def test_init_deterministic_under_generator():
    a = UNet.from_preset("small", generator=torch.Generator().manual_seed(3))
    b = UNet.from_preset("small", generator=torch.Generator().manual_seed(3))
    c = UNet.from_preset("small", generator=torch.Generator().manual_seed(4))
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    assert not all(torch.equal(p, r) for p, r in zip(a.parameters(), c.parameters()))


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="one entry per scale"):
        UNetConfig(channels=(8, 8), skip_channels=(0,))
    with pytest.raises(ValueError, match="must be 0"):
        UNetConfig(channels=(8, 8), skip_channels=(4, 4))
    with pytest.raises(ValueError, match="unknown UNet preset"):
        UNet.from_preset("medium")
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        UNet.from_preset("small")(torch.zeros(8, 8))
    with pytest.raises(ValueError, match="3D"):
        build_unet(UNetConfig(ndim=2), ndim=3)


def test_mc_dropout_after_every_3x3_conv_and_samples():
    net = UNet.from_preset("small", dropout=0.05, generator=torch.Generator().manual_seed(0))
    n3x3 = sum(1 for m in net.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))
    assert len(net.dropout_layers()) == n3x3 == 1 + 4 + 4
    assert conv_weight_count(net) == 76_608
    z = torch.randn(1, 1, 16, 16)
    s1 = mc_dropout_samples(net, z, 4, generator=torch.Generator().manual_seed(1))
    s2 = mc_dropout_samples(net, z, 4, generator=torch.Generator().manual_seed(1))
    assert s1.shape == (4, 1, 1, 16, 16)
    assert torch.equal(s1, s2)  # deterministic under a seed
    assert (s1[0] - s1[1]).abs().max() > 0  # samples differ
    net.eval()
    assert torch.equal(net(z), net(z))  # dropout off outside MC sampling
    with pytest.raises(ValueError, match="no dropout"):
        mc_dropout_samples(UNet.from_preset("small"), z, 2)


@pytest.mark.parametrize("cin,stride", [(8, 1), (20, 2), (3, 1)])
def test_cpu_conv3d_decomposition_equals_conv3d(cin, stride):
    from dip_uq.dip.unet import _Conv3d

    g = torch.Generator().manual_seed(0)
    conv = _Conv3d(cin, 5, 3, stride=stride, padding=1).double()
    x = torch.randn(2, cin, 7, 6, 9, generator=g, dtype=torch.float64, requires_grad=True)
    out = conv(x)
    ref = nn.Conv3d.forward(conv, x)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, atol=1e-12)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    g1 = torch.autograd.grad((out * w).sum(), (x, conv.weight, conv.bias))
    g2 = torch.autograd.grad((ref * w).sum(), (x, conv.weight, conv.bias))
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-10)


def test_saturated_fraction_matches_finite_differences():
    """The flat-output fraction equals the share of voxels whose output moves less than
    1e-4 per unit of pre-activation, measured by nudging outc's bias (which shifts every
    pre-activation by the same amount)."""
    g = torch.Generator().manual_seed(0)
    net = UNet(UNetConfig(channels=(4, 4), skip_channels=(0, 2)), generator=g).double()
    z = torch.randn(1, 1, 16, 16, generator=g, dtype=torch.float64)
    with torch.no_grad():  # spread the pre-activations over [-27, 3]: past the clamp and live
        wf = net.pre_activation(z) - net.outc.bias
        a = 30.0 / float(wf.max() - wf.min())
        net.outc.weight.mul_(a)
        net.outc.bias.fill_(-12.0 - a * float(wf.mean()))
    t = net.pre_activation(z).detach()
    assert t.min() < -15 and t.max() > -9  # some voxels live, some beyond the clamp
    h = 1e-6
    with torch.no_grad():
        lo = net(z)
        net.outc.bias.add_(h)
        hi = net(z)
        net.outc.bias.sub_(h)
    slope = (hi - lo) / h
    frac = net.saturated_fraction(z)
    assert 0.05 < frac < 0.95
    assert frac == pytest.approx(float((slope < 1e-4).double().mean()), abs=1.5 / z.numel())
    linear = UNet(UNetConfig(channels=(4, 4), skip_channels=(0, 2), use_sigmoid=False))
    assert linear.saturated_fraction(z.float()) == 0.0


def test_preset_config_overrides():
    from dip_uq.dip import preset_config

    cfg = preset_config("small", use_sigmoid=False)
    assert cfg.use_sigmoid is False and cfg.channels == (32, 32, 32)
    assert cfg.skip_channels == (0, 4, 4) and preset_config("small").use_sigmoid
    assert UNet.from_preset("small", use_sigmoid=False).config == cfg
    with pytest.raises(ValueError, match="unknown UNet preset"):
        preset_config("medium")

"""Parameter selection and Jacobian products against the dense Jacobian."""

from __future__ import annotations

import pytest
import torch
from test_laplace_problems import cnn_model, one_thread  # noqa: F401
from torch import nn

from dip_uq.laplace import FunctionalModel, ParameterSelection


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 3, 1),
        nn.GroupNorm(1, 3),
        nn.Conv2d(3, 1, 3),
    ).double()
    net.train()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(3):
            net(torch.randn(5, 2, 6, 6, dtype=torch.float64))
    return net.eval()


def test_default_selection_excludes_norm_affine_and_conv_weights_is_one_call():
    net = _bn_net()
    sel = ParameterSelection(net)
    assert all(not n.startswith(("1.", "4.")) for n in sel.names)  # BN and GN affine excluded
    assert "0.bias" in sel.names
    conv = ParameterSelection(net, "conv_weights")
    assert conv.names == ["0.weight", "3.weight", "5.weight"]
    assert conv.d == 4 * 2 * 9 + 3 * 4 + 3 * 9
    assert conv.specs[0].kernel == (3, 3) and conv.specs[1].kernel == (1, 1)


def test_flatten_unflatten_round_trip_and_blocks():
    net = _bn_net()
    sel = ParameterSelection(
        net, "conv_weights", blocks=lambda name: "a" if name.startswith("0") else "b"
    )
    assert sel.block_names == ["a", "b"]
    assert sel.block_sizes().tolist() == [72, 12 + 27]
    flat = torch.randn(7, sel.d, dtype=torch.float64)
    back = sel.flatten(sel.unflatten(flat))
    torch.testing.assert_close(back, flat)
    assert sel.unflatten(flat)["3.weight"].shape == (7, 3, 4, 1, 1)
    v = torch.arange(sel.d, dtype=torch.float64)
    torch.testing.assert_close(sel.block_sum(v), torch.stack([v[:72].sum(), v[72:].sum()]))


def test_bad_selections_are_clear_errors():
    net = _bn_net()
    with pytest.raises(ValueError, match="empty"):
        ParameterSelection(net, lambda n, p, m: False)
    with pytest.raises(ValueError, match="unknown parameter selection"):
        ParameterSelection(net, "weights-please")
    with pytest.raises(ValueError, match="unknown blocks"):
        ParameterSelection(net, blocks="per-galaxy")
    sel = ParameterSelection(net)
    with pytest.raises(ValueError, match="expected last dim"):
        sel.unflatten(torch.zeros(3, sel.d + 1))


@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "cnn3d"])
def test_jvp_vjp_match_dense_jacobian(name):
    g = torch.Generator().manual_seed(0)
    if name == "mlp":
        torch.manual_seed(1)
        net = nn.Sequential(nn.Linear(3, 7), nn.Tanh(), nn.Linear(7, 2)).double()
        x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    elif name == "cnn_bn":
        net = _bn_net()
        x = torch.randn(2, 2, 6, 6, generator=g, dtype=torch.float64)
    else:
        torch.manual_seed(2)
        net = nn.Sequential(
            nn.Conv3d(1, 2, 3, padding=1), nn.Tanh(), nn.Conv3d(2, 1, 3, padding=1)
        ).double()
        x = torch.randn(1, 1, 4, 4, 4, generator=g, dtype=torch.float64)
    fm = FunctionalModel(net)
    J = fm.dense_jacobian(x)
    out = fm.output(x)
    assert J.shape == (out.numel(), fm.d)
    V = torch.randn(4, fm.d, generator=g, dtype=torch.float64)
    torch.testing.assert_close(fm.jvp(x, V).reshape(4, -1), V @ J.T)
    U = torch.randn(3, *out.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(fm.vjp(x, U), U.reshape(3, -1) @ J)
    # finite-difference check of the dense Jacobian itself (independent of torch.func)
    theta = fm.theta_star()
    e = torch.zeros_like(theta)
    i = fm.d // 2
    e[i] = 1e-6
    fd = (fm(theta + e, x) - fm(theta - e, x)).reshape(-1) / 2e-6
    torch.testing.assert_close(fd, J[:, i], atol=1e-6, rtol=1e-5)


def test_batchnorm_in_train_mode_warns_and_uses_eval_copy_without_mutating():
    net = _bn_net().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.warns(UserWarning, match="train mode"):
        fm = FunctionalModel(net)
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    fm.jvp(x, torch.randn(2, fm.d, dtype=torch.float64))
    assert net.training  # user's model untouched
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k])
    torch.testing.assert_close(fm.output(x), net.eval()(x))  # running statistics, not batch ones


def test_jvp_shape_errors_are_clear():
    fm = FunctionalModel(cnn_model(2))
    x = torch.randn(1, 1, 5, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"expected shape \(K, "):
        fm.jvp(x, torch.zeros(fm.d))
    with pytest.raises(ValueError, match="vjp cotangents"):
        fm.vjp(x, torch.zeros(2, 1, 1, 4, 4, dtype=torch.float64))

"""Prior products against dense Σ; Matérn closed form; g-prior; differentiability."""

from __future__ import annotations

import math

import pytest
import torch
from test_laplace_problems import one_thread  # noqa: F401
from torch import nn

from dip_uq.laplace import BlockPrior, ParameterSelection, matern_correlation


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.Conv2d(3, 2, 1), nn.Conv3d(2, 2, 3), nn.Linear(4, 3)
    ).double()


def _prior(kind="matern", scale=False):
    sel = ParameterSelection(_net(), blocks="layer")
    pr = BlockPrior(sel, kind, variance=1.0, lengthscale=0.7)
    with torch.no_grad():
        pr.log_variance.copy_(torch.linspace(-1.0, 0.5, sel.n_blocks))
        pr.log_lengthscale.copy_(torch.linspace(-0.5, 0.3, sel.n_blocks))
    if scale:
        pr.set_scale(
            torch.rand(sel.d, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.5
        )
    return pr


def _dense_reference(pr: BlockPrior) -> torch.Tensor:
    """Σ assembled entry by entry from the definition (slow, obviously correct)."""
    sel = pr.selection
    S = torch.zeros(sel.d, sel.d, dtype=torch.float64)
    var = pr.variances().detach()
    ell = pr.lengthscales().detach()
    for spec, b in zip(sel.specs, sel.block_of_param):
        taps = math.prod(spec.kernel) if spec.kernel else 1
        if pr.kinds[b] == "matern" and taps > 1:
            coords = torch.tensor(
                [
                    list(idx)
                    for idx in torch.cartesian_prod(*[torch.arange(k) for k in spec.kernel])
                    .reshape(taps, -1)
                    .tolist()
                ],
                dtype=torch.float64,
            )
            for f in range(spec.n_filters):
                base = spec.offset + f * taps
                for p in range(taps):
                    for q in range(taps):
                        r = float((coords[p] - coords[q]).norm())
                        S[base + p, base + q] = var[b] * math.exp(-r / ell[b]) + (
                            1e-6 if p == q else 0.0
                        )
        else:
            idx = torch.arange(spec.offset, spec.offset + spec.numel)
            S[idx, idx] = var[b]
    if pr.scale is not None:
        s = pr.scale
        S = s[:, None] * S * s[None, :]
    return S


@pytest.mark.parametrize("kind,scale", [("normal", False), ("matern", False), ("matern", True)])
def test_products_match_dense_covariance(kind, scale):
    pr = _prior(kind, scale)
    S = _dense_reference(pr)
    v = torch.randn(
        5, pr.selection.d, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    with torch.no_grad():
        torch.testing.assert_close(pr.cov_mv(v), v @ S)
        L = pr.sqrt_mv(torch.eye(pr.selection.d, dtype=torch.float64)).T  # columns L e_i
        torch.testing.assert_close(L @ L.T, S)
        torch.testing.assert_close(pr.sqrt_t_mv(v), v @ L)
        torch.testing.assert_close(pr.prec_mv(v), torch.linalg.solve(S, v.T).T)
        torch.testing.assert_close(pr.sqrt_inv_mv(v), torch.linalg.solve(L, v.T).T)
        torch.testing.assert_close(pr.logdet(), torch.linalg.slogdet(S)[1])
        quad = pr.block_quadratic(v)
        torch.testing.assert_close(quad.sum(-1), ((v @ torch.linalg.inv(S)) * v).sum(-1))


def test_matern_3d_correlation_closed_form():
    C = matern_correlation((3, 3, 3), torch.tensor(0.5, dtype=torch.float64))
    assert C.shape == (27, 27)
    # taps 0 = (0,0,0) and 26 = (2,2,2): distance 2√3
    assert math.isclose(float(C[0, 26]), math.exp(-2 * math.sqrt(3) / 0.5), rel_tol=1e-12)
    assert math.isclose(float(C[0, 1]), math.exp(-2.0), rel_tol=1e-12)


def test_logdet_and_products_are_differentiable_in_hyperparameters():
    pr = _prior("matern")

    lv = pr.log_variance.detach().clone().requires_grad_(True)

    def g(lv_, ll_):
        old = pr.log_variance, pr.log_lengthscale
        try:
            del pr.log_variance, pr.log_lengthscale
            pr.log_variance, pr.log_lengthscale = lv_, ll_
            v = torch.ones(1, pr.selection.d, dtype=torch.float64)
            return pr.logdet() + pr.cov_mv(v).sum() + pr.prec_mv(v).sum() * 1e-3
        finally:
            del pr.log_variance, pr.log_lengthscale
            pr.log_variance, pr.log_lengthscale = old

    ll = pr.log_lengthscale.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(g, (lv, ll))


def test_bad_hyperparameters_are_rejected():
    sel = ParameterSelection(_net())
    with pytest.raises(ValueError, match="variance must be positive"):
        BlockPrior(sel, variance=0.0)
    with pytest.raises(ValueError, match="lengthscale must be positive"):
        BlockPrior(sel, lengthscale=-1.0)
    with pytest.raises(ValueError, match="unknown prior kind"):
        BlockPrior(sel, kind="laplace")
    pr = BlockPrior(sel)
    with pytest.raises(ValueError, match="positive and finite"):
        pr.set_variances(torch.tensor(-1.0))
    with pytest.raises(ValueError, match="g-prior scale"):
        pr.set_scale(torch.ones(3))


@pytest.mark.parametrize("kind,scale", [("normal", False), ("matern", False), ("matern", True)])
def test_quadratic_from_moments_equals_the_mean_quadratic_and_its_gradient(kind, scale):
    """EM's lengthscale step works on per-block tap moments instead of K × d samples: the
    value and the hyperparameter gradients equal those of mean_k block_quadratic(v_k)
    (2D and 3D filters, 1×1 convs and a linear layer, with and without a g-prior)."""
    pr = _prior(kind, scale)
    v = torch.randn(
        7, pr.selection.d, generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    direct = pr.block_quadratic(v).mean(0)
    hyper = [pr.log_variance, pr.log_lengthscale]

    def grads(q):
        gs = torch.autograd.grad(q.sum(), hyper, allow_unused=True)
        return [torch.zeros_like(h) if g is None else g for g, h in zip(gs, hyper)]

    g_direct = grads(direct)
    via = pr.quadratic_from_moments(pr.second_moments(v))
    g_via = grads(via)
    torch.testing.assert_close(via, direct.detach())
    for a, b in zip(g_via, g_direct):
        torch.testing.assert_close(a, b)
    assert (float(g_direct[1].abs().sum()) > 0) == (kind == "matern")  # the check can fail

"""The public object: bad input, state, devices/dtypes, streaming statistics, predictives."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from test_laplace_problems import (
    MatrixOperator,
    blr,
    classifier,
    cnn_model,
    ct_like,
    mlp,
    one_thread,  # noqa: F401
)
from torch import nn

from dip_uq.laplace import Categorical, Gaussian, LinearisedLaplace, SampleBank, Welford, draw_noise
from dip_uq.laplace.solvers import functional_covariance


def _ct_parts(side=6, m=20):
    g = torch.Generator().manual_seed(0)
    model = cnn_model(2)
    z0 = torch.randn(1, 1, side, side, generator=g, dtype=torch.float64)
    op = MatrixOperator(
        torch.randn(m, side * side, generator=g, dtype=torch.float64), (1, side, side)
    )
    y = op(model(z0)).detach()
    return model, z0, op, y


def test_bad_input_gives_clear_errors():
    model, z0, op, y = _ct_parts()
    with pytest.raises(ValueError, match=r"targets: expected shape \(1, 20\)"):
        LinearisedLaplace(model, Gaussian(1.0, op), z0, y[:, :5])
    bad = y.clone()
    bad[0, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        LinearisedLaplace(model, Gaussian(1.0, op), z0, bad)
    z_bad = z0.clone()
    z_bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="inputs contain NaN"):
        LinearisedLaplace(model, Gaussian(1.0, op), z_bad, y)

    class NoAdjoint:
        def __call__(self, x):
            return op(x)

    with pytest.raises(TypeError, match=r"no callable \.T"):
        Gaussian(1.0, NoAdjoint())
    for value in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="noise variance must be positive"):
            Gaussian(value)
    with pytest.raises(ValueError, match="empty"):
        LinearisedLaplace(model, Gaussian(1.0, op), z0, y, params=lambda n, p, m: False)
    with pytest.raises(ValueError, match="prior variance must be positive"):
        LinearisedLaplace(model, Gaussian(1.0, op), z0, y, prior_variance=0.0)
    la = LinearisedLaplace(model, Gaussian(1.0, op), z0, y)
    with pytest.raises(ValueError, match="unknown solver"):
        la.sample(2, solver="gibbs")
    with pytest.raises(ValueError, match="number of samples"):
        la.sample(0, solver="cg")
    with pytest.raises(ValueError, match="cannot evaluate the inputs"):
        LinearisedLaplace(
            nn.Linear(3, 1).double(),
            Gaussian(1.0),
            torch.zeros(4, 5, dtype=torch.float64),
            torch.zeros(4, 1),
        )


def test_unmatched_operator_warns():
    model, z0, op, y = _ct_parts()
    op.matched = False
    with pytest.warns(UserWarning, match="not the exact transpose"):
        Gaussian(1.0, op)


def test_categorical_bad_labels_and_gaussian_only_features():
    la = classifier()
    X = la.inputs
    net = nn.Sequential(nn.Linear(4, 3)).double()
    with pytest.raises(ValueError, match="outside"):
        LinearisedLaplace(net, Categorical(), X, torch.full((X.shape[0],), 7))
    with pytest.raises(ValueError, match="integer shape"):
        LinearisedLaplace(net, Categorical(), X, torch.zeros(X.shape[0], 3))
    with pytest.raises(NotImplementedError, match="Gaussian"):
        la.fit_hyperparameters()


def test_batchnorm_model_in_train_mode_warns_and_is_not_mutated():
    torch.manual_seed(0)
    net = (
        nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 1))
        .double()
        .train()
    )
    X = torch.randn(20, 3, dtype=torch.float64)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.warns(UserWarning, match="train mode"):
        la = LinearisedLaplace(net, Gaussian(0.1), X, torch.zeros(20, 1, dtype=torch.float64))
    la.sample(4, "cg")
    assert net.training
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, state[k])


def test_state_dict_round_trip_and_mismatch():
    la = mlp(prior_variance=0.3)
    la.fit_hyperparameters(
        n_cycles=2, n_samples=16, solver="cg", generator=torch.Generator().manual_seed(0)
    )
    la.set_g_prior(n_probes=4, generator=torch.Generator().manual_seed(0))
    state = la.state_dict()
    fresh = mlp(prior_variance=1.0)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.prior.variances(), la.prior.variances())
    torch.testing.assert_close(fresh.likelihood.noise_var, la.likelihood.noise_var)
    torch.testing.assert_close(fresh.prior.scale, la.prior.scale)
    a = la.sample(3, "exact", torch.Generator().manual_seed(1)).samples
    b = fresh.sample(3, "exact", torch.Generator().manual_seed(1)).samples
    torch.testing.assert_close(a, b)
    other = blr()
    with pytest.raises(
        (ValueError, RuntimeError), match="parameter selection|size mismatch|Missing"
    ):
        other.load_state_dict(state)


def test_to_float32_runs_and_agrees_with_float64():
    la = mlp(prior_variance=0.3)
    g = torch.Generator().manual_seed(0)
    ref = la.sample(2048, "exact", g)
    la32 = mlp(prior_variance=0.3).to(torch.float32)
    assert la32.inputs.dtype == torch.float32
    res = la32.sample(2048, "cg", torch.Generator().manual_seed(0), tol=1e-5)
    assert res.samples.dtype == torch.float32
    v64 = (la.functional_samples(ref.samples) ** 2).mean(0)
    v32 = (la32.functional_samples(res.samples) ** 2).mean(0).double()
    assert float(((v32 - v64).abs() / v64).median()) < 0.1


def test_welford_matches_batch_statistics_and_merges():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 4, 5, generator=g, dtype=torch.float64) * 3 + 1
    acc = Welford()
    for chunk in x.split(37):
        acc.update(chunk)
    torch.testing.assert_close(acc.mean, x.mean(0))
    torch.testing.assert_close(acc.variance(), x.var(0))
    torch.testing.assert_close(acc.second_moment(), (x**2).mean(0))
    a, b = Welford().update(x[:100]), Welford().update(x[100:])
    torch.testing.assert_close(a.merge(b).variance(), x.var(0))
    with pytest.raises(ValueError, match="NaN"):
        Welford().update(torch.tensor([[float("nan")]]))
    with pytest.raises(ValueError, match="expected sample shape"):
        acc.update(torch.zeros(2, 3))


def test_sample_bank_saves_atomically_and_resumes(tmp_path):
    la = ct_like(side=6, n_meas=20, channels=2)
    bank = SampleBank(la.d, tmp_path / "bank.pt")
    g = torch.Generator().manual_seed(0)
    var = la.functional_variance(n_samples=40, solver="cg", generator=g, batch_size=16, bank=bank)
    assert len(bank) == 40
    bank.save()
    assert [p.name for p in tmp_path.iterdir()] == ["bank.pt"]  # no temp files left behind
    back = SampleBank.load(tmp_path / "bank.pt")
    torch.testing.assert_close(back.samples(), bank.samples())
    # the variance map is a function of the stored samples
    torch.testing.assert_close(var, (la.functional_samples(back.samples()) ** 2).mean(0))
    back.add(la.sample(8, "cg", g).samples)  # resume
    assert len(back) == 48
    with pytest.raises(ValueError, match="expected samples of shape"):
        back.add(torch.zeros(2, la.d + 1))


def test_classification_predictives():
    la = classifier()
    Xt = la.inputs[:7]
    z = la.sample(2048, "exact", torch.Generator().manual_seed(0)).samples
    p_mc = la.predict_proba(Xt, z, link="mc")
    p_pr = la.predict_proba(Xt, z, link="probit")
    p_map = torch.softmax(la.fmodel.output(Xt), -1)
    for p in (p_mc, p_pr):
        torch.testing.assert_close(p.sum(-1), torch.ones(7, dtype=p.dtype))
    # uncertainty pulls the prediction towards uniform: the max probability drops
    assert torch.all(p_pr.max(-1).values <= p_map.max(-1).values + 1e-12)
    assert float((p_mc - p_pr).abs().max()) < 0.05
    # probit's v_c is the exact marginal logit variance up to MC error
    J = la.fmodel.dense_jacobian(Xt)
    v_exact = functional_covariance(la.system(), J).diagonal().reshape(7, -1)
    v_mc = (la.functional_samples(z, Xt) ** 2).mean(0)
    assert float(((v_mc - v_exact).abs() / v_exact).median()) < 3 * math.sqrt(2 / 2048)
    with pytest.raises(ValueError, match="unknown link"):
        la.predict_proba(Xt, z, link="logit")


def test_regression_predictive_returns_mean_and_variance():
    la = mlp(prior_variance=0.3)
    Xt = torch.randn(5, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mu, var = la.predictive(
        Xt, n_samples=1024, solver="cg", generator=torch.Generator().manual_seed(0)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(mu, la.fmodel.net(Xt))
    exact = (
        functional_covariance(la.system(), la.fmodel.dense_jacobian(Xt)).diagonal().reshape(5, 2)
    )
    assert float(((var - exact).abs() / exact).max()) < 5 * math.sqrt(2 / 1024)


def test_accepts_a_ray_transform_operator():
    """The engine is CT-agnostic but takes the project's RayTransform as any A with A.T."""
    from operators import Parallel2D, RayTransform, VolumeGeometry

    vol = VolumeGeometry(shape=(8, 8))
    op = RayTransform(vol, Parallel2D.default(vol, n_angles=5), backend="torch").double()
    model = cnn_model(2)
    z0 = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = op(model(z0)).detach()
    assert y.shape[:2] == (1, 1)
    la = LinearisedLaplace(
        model, Gaussian(0.5, op), z0, y, params="conv_weights", prior_variance=0.1
    )
    g = torch.Generator().manual_seed(1)
    noise = draw_noise(la.system(), 4, g)
    ref = la.sample(4, "exact", noise=noise).samples
    res = la.sample(4, "cg", noise=noise, tol=1e-9)
    assert float((res.samples - ref).norm() / ref.norm()) < 1e-6
    var = la.functional_variance(n_samples=8, solver="cg", generator=g)
    assert var.shape == (1, 1, 8, 8) and torch.all(var > 0)

"""One engine under both doors: the front door (``Laplace`` over a DataLoader) and
``LinearisedLaplace`` (a tensor batch) run the same registered solvers on the same GGN.

Same model, data, prior, noise variance and seed → the same posterior samples, draw by draw;
the streamed GGN, noise and dense curvature equal the in-memory ones over any batching.
"""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from dip_uq.examples import MLP
from dip_uq.laplace import Categorical, Gaussian, LinearisedLaplace
from dip_uq.laplace.front import Laplace
from dip_uq.laplace.solvers import Noise, make_solver
from dip_uq.laplace.streaming import StreamingSystem

pytestmark = pytest.mark.usefixtures("one_thread")

VAR, NOISE_VAR = 0.5, 0.25


def _problem(kind: str, n: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    net = MLP(3, 3, (5,)).double().eval()
    with torch.no_grad():
        f = net(x)
    if kind == "regression":
        y = f + 0.5 * torch.randn(f.shape, generator=g, dtype=torch.float64)
    else:
        y = torch.distributions.Categorical(logits=2 * f).sample()
    return net, x, y


def _engine(net, x, y, kind):
    lik = Gaussian(noise_var=NOISE_VAR) if kind == "regression" else Categorical()
    ll = LinearisedLaplace(net, lik, x, y, blocks="layer")
    ll.prior.set_variances(VAR)
    return ll


def _front(net, x, y, kind, solver, opts, batch_size, n_samples=6, seed=7):
    la = Laplace(
        net, kind, prior="layerwise", prior_precision=1 / VAR, sigma_noise=NOISE_VAR**0.5,
        n_samples=n_samples, solver=solver, solver_opts=opts, curvature="network",
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    return la.fit(DataLoader(TensorDataset(x, y), batch_size=batch_size))


@pytest.mark.parametrize("kind", ["regression", "classification"])
@pytest.mark.parametrize(
    "solver,opts,rtol",
    [("exact", {}, 1e-9), ("cg", {"tol": 1e-11, "iterations": 400}, 1e-7)],
)
def test_both_doors_give_identical_samples(kind, solver, opts, rtol):
    """The front door's K fitted samples equal ``LinearisedLaplace.sample(K, solver, gen)``
    with the generator at the same seed (one batch, so ε is drawn in the same order): the
    in-memory cg is dual Matheron with a Nyström P⁻¹, the streamed one primal CG, so
    agreement is to the solves' tolerance, not bitwise."""
    net, x, y = _problem(kind)
    la = _front(net, x, y, kind, solver, opts, batch_size=len(x))
    ll = _engine(net, x, y, kind)
    ref = ll.sample(6, solver, torch.Generator().manual_seed(7), **opts).samples
    assert la.samples.shape == ref.shape == (6, ll.d)
    torch.testing.assert_close(la.samples, ref, rtol=rtol, atol=rtol * float(ref.abs().max()))


def test_identical_samples_are_not_trivially_equal():
    """The check above can fail: another seed gives other samples."""
    net, x, y = _problem("regression")
    la = _front(net, x, y, "regression", "exact", {}, batch_size=len(x), seed=8)
    ref = _engine(net, x, y, "regression").sample(6, "exact", torch.Generator().manual_seed(7))
    assert not torch.allclose(la.samples, ref.samples, rtol=1e-3)


@pytest.mark.parametrize("kind", ["regression", "classification"])
def test_streamed_system_equals_the_in_memory_one(kind):
    """Over 3 uneven minibatches: M v, the dense GGN, λ_max's ingredients and the exact
    factors agree with the tensor-batch system (dense oracle: GᵀG from dense_G)."""
    net, x, y = _problem(kind, n=22)
    ll = _engine(net, x, y, kind)
    mem = ll.system()
    lik = Gaussian(noise_var=NOISE_VAR) if kind == "regression" else Categorical()
    stream = StreamingSystem(
        ll.fmodel, lik, ll.prior, DataLoader(TensorDataset(x, y), batch_size=8)
    )
    stream.validate()
    assert (stream.n_data, stream.n_obs, stream.n_batches) == (22, mem.n_obs, 3)
    G = mem.dense_G()
    torch.testing.assert_close(stream.dense_ggn(), G.T @ G, rtol=1e-10, atol=1e-12)
    v = torch.randn(4, ll.d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(stream.ggn_mv(v), v @ (G.T @ G), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(stream.primal_mv(v), mem.primal_mv(v), rtol=1e-10, atol=1e-12)


def test_streamed_noise_has_the_ggn_as_covariance():
    """Gᵀε drawn batch by batch has covariance M (a statistical check that can fail: the
    empirical covariance of 4000 draws against the dense GGN, relative Frobenius error)."""
    net, x, y = _problem("classification", n=12)
    ll = _engine(net, x, y, "classification")
    stream = StreamingSystem(
        ll.fmodel, Categorical(), ll.prior, DataLoader(TensorDataset(x, y), batch_size=5)
    )
    stream.validate()
    k = 4000
    noise = stream.draw_noise(k, torch.Generator().manual_seed(2))
    emp = noise.gt_eps.T @ noise.gt_eps / k
    M = stream.dense_ggn()
    err = float((emp - M).norm() / M.norm())
    assert err < 4 * (2 / k) ** 0.5 * 3, err  # a few MC standard errors


def test_streamed_solvers_reach_the_exact_solution():
    """Primal cg and loader-minibatch sgd on the streamed system against exact factors of
    the same system, draw by draw (same Noise)."""
    net, x, y = _problem("regression", n=30)
    ll = _engine(net, x, y, "regression")
    stream = StreamingSystem(
        ll.fmodel, Gaussian(NOISE_VAR), ll.prior, DataLoader(TensorDataset(x, y), batch_size=10)
    )
    stream.validate()
    noise = stream.draw_noise(5, torch.Generator().manual_seed(3))
    exact = make_solver("exact").sample(stream, 5, noise=noise).samples
    cg = make_solver("cg", tol=1e-10, iterations=500).sample(stream, 5, noise=noise)
    assert cg.converged and "u" in cg.state
    torch.testing.assert_close(cg.samples, exact, rtol=1e-7, atol=1e-9)
    lr = 0.1 / (stream.lambda_max() + 1)  # the front door's minibatch default
    sgd = make_solver("sgd", iterations=3000, polyak=True, check_every=300, lr=lr).sample(
        stream, 5, noise=noise, generator=torch.Generator().manual_seed(4)
    )
    rel = (sgd.samples - exact).norm(dim=1) / exact.norm(dim=1)
    assert float(rel.max()) < 0.02, rel
    with pytest.raises(ValueError, match="loader's batch_size"):
        make_solver("sgd", batch_size=4).sample(stream, 5, noise=noise)
    with pytest.raises(ValueError, match="sdd is a dual solver"):
        make_solver("sdd").sample(stream, 5, noise=noise)
    with pytest.raises(ValueError, match="observation noise"):  # in memory, without ε
        make_solver("cg").sample(ll.system(), 5, noise=Noise(noise.xi, None, noise.gt_eps))


@pytest.mark.parametrize("solver,estimator", [("exact", "exact"), ("cg", "paired")])
def test_both_doors_run_the_same_em(solver, estimator):
    """One EM loop (``fit_em``) under both doors: with exact traces there is no Monte-Carlo
    draw, so the front door over a 3-batch loader and ``fit_em`` on the in-memory
    ``LinearisedLaplace`` follow the same per-block σ_b² and σ² trajectory to float64
    round-off; with cg and the paired γ̂ both start from the same ξ, ε (one batch, same
    seed) and agree to the solves' tolerance."""
    from dip_uq.laplace.em import fit_em

    net, x, y = _problem("regression", n=30)
    opts = {} if solver == "exact" else {"tol": 1e-11, "iterations": 400}
    batch = 10 if solver == "exact" else len(x)
    la = _front(net, x, y, "regression", solver, opts, batch_size=batch, n_samples=16)
    front = la.optimize_prior_precision("em", n_steps=4)
    ll = _engine(net, x, y, "regression")
    hist = fit_em(ll, 4, 16, solver, estimator=estimator, solver_opts=opts,
                  generator=torch.Generator().manual_seed(7))  # fmt: skip
    ref_prec = torch.stack([1.0 / v for v in hist.prior_variance])
    tol = 1e-8 if solver == "exact" else 1e-5
    torch.testing.assert_close(torch.stack(front["prior_precision"]).double(),
                               ref_prec.double(), rtol=tol, atol=0.0)  # fmt: skip
    assert front["sigma_noise"] == pytest.approx([v**0.5 for v in hist.noise_var], rel=tol)
    # EM moved the hyperparameters: the agreement is not that of two unchanged priors
    assert float((ref_prec[-1] * VAR - 1).abs().max()) > 0.1

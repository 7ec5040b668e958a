"""EM fixed points against the exact evidence maximiser; noise recovery; g-prior invariance."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_laplace_problems import blr, ct_like, one_thread  # noqa: F401
from torch import nn

from dip_uq.laplace import Gaussian, LinearisedLaplace
from dip_uq.laplace.em import fit_em, maximise_evidence
from dip_uq.laplace.solvers import functional_covariance


def _reference(la):
    ref = copy.deepcopy(la)
    maximise_evidence(ref)
    return ref.prior.variances().detach(), float(ref.likelihood.noise_var)


def _rel(a, b):
    return float(
        (torch.as_tensor(a) - torch.as_tensor(b)).abs().max() / torch.as_tensor(b).abs().max()
    )


def test_em_exact_estep_converges_to_evidence_maximiser_blr():
    la = blr(prior_variance=1.0, noise_var=1.0)
    var_ref, noise_ref = _reference(la)
    hist = fit_em(la, n_cycles=40, solver="exact", estimator="exact")
    assert _rel(hist.prior_variance[-1], var_ref) < 1e-5
    assert _rel(hist.noise_var[-1], noise_ref) < 1e-5
    # the evidence gradient vanishes at the fixed point
    for p in (la.prior.log_variance, la.likelihood.log_noise_var):
        p.requires_grad_(True)
    la.log_marginal_likelihood().backward()
    assert float(la.prior.log_variance.grad.abs().max()) < 1e-6
    assert abs(float(la.likelihood.log_noise_var.grad)) < 1e-6


@pytest.mark.parametrize("estimator", ["function", "weight"])
def test_sample_based_em_within_2_percent_blr(estimator):
    la = blr(prior_variance=1.0, noise_var=1.0)
    var_ref, noise_ref = _reference(la)
    g = torch.Generator().manual_seed(0)
    hist = fit_em(la, n_cycles=12, n_samples=1024, solver="cg", estimator=estimator, generator=g)
    assert _rel(hist.prior_variance[-1], var_ref) < 0.02
    assert _rel(hist.noise_var[-1], noise_ref) < 0.02
    assert len(hist.gamma) == 12 and all(hist.converged)


def _ct_small(full: bool = False):
    """(c)-type problem, conv weights in one Normal block: small d = 1296, d_y = 100;
    full d = 4896, d_y = 200."""
    size = (
        dict(side=16, n_meas=200, channels=16, prior_variance=0.02)
        if full
        else dict(side=12, n_meas=100, channels=8, prior_variance=0.05)
    )
    return ct_like(noise=0.1, noise_var=0.02, blocks="single", **size)


@pytest.mark.parametrize("size", ["small", pytest.param("full", marks=pytest.mark.slow)])
def test_em_fixed_point_ct_like(size):
    """(c): CNN + dense operator, conv weights under one Normal block; full: d ≈ 5k, d_y = 200."""
    la = _ct_small(full=size == "full")
    if size == "full":
        assert la.d == 4896 and la.system().n_obs == 200
    var_ref, noise_ref = _reference(la)
    exact = copy.deepcopy(la)
    hist = fit_em(exact, n_cycles=15, solver="exact", estimator="exact")
    assert _rel(hist.prior_variance[-1], var_ref) < 0.02
    assert _rel(hist.noise_var[-1], noise_ref) < 0.02
    g = torch.Generator().manual_seed(1)
    sampled = fit_em(
        la, n_cycles=10, n_samples=512, solver="cg", generator=g, solver_opts={"precond_rank": 200}
    )
    assert _rel(sampled.noise_var[-1], noise_ref) < 0.02
    assert _rel(sampled.prior_variance[-1], var_ref) < 0.02


def test_em_per_block_reaches_the_maximal_evidence():
    """Per-layer blocks (tied first, then per block): evidence maximisation may prune a block
    (σ_b² → 0, which EM approaches slowly), so compare evidence values, not variances."""
    la = ct_like(side=10, n_meas=80, channels=6, noise=0.1, prior_variance=0.05, noise_var=0.02)
    ref = copy.deepcopy(la)
    best = maximise_evidence(ref)
    start = la.log_marginal_likelihood().item()
    hist = fit_em(la, n_cycles=40, solver="exact", estimator="exact", tied_cycles=3)
    assert torch.allclose(
        hist.prior_variance[2], hist.prior_variance[2][0].expand(la.selection.n_blocks)
    )
    end = la.log_marginal_likelihood().item()
    assert best - end < 0.02 * (best - start) + 0.05


def test_noise_variance_recovered_on_simulated_data():
    la = blr(n=1000, p=20, noise=0.3, prior_variance=1.0, noise_var=1.0, seed=3)
    hist = fit_em(
        la, n_cycles=15, n_samples=256, solver="cg", generator=torch.Generator().manual_seed(0)
    )
    # σ̂² has relative sd ≈ √(2/(n − γ)) ≈ 4.5 %
    assert abs(hist.noise_var[-1] / 0.09 - 1) < 0.15
    assert abs(hist.noise_var[0] - 1.0) > 0.5  # it moved from the initial value


def _normed_net(scale_first: float = 1.0) -> nn.Module:
    torch.manual_seed(4)
    net = nn.Sequential(
        nn.Linear(3, 8), nn.LayerNorm(8, elementwise_affine=False), nn.Tanh(), nn.Linear(8, 2)
    ).double()
    with torch.no_grad():
        net[0].weight.mul_(scale_first)
        net[0].bias.mul_(scale_first)
    return net


def _predictive_var(scale_first: float, g_prior: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(30, 3, generator=g, dtype=torch.float64)
    y = torch.randn(30, 2, generator=g, dtype=torch.float64)
    la = LinearisedLaplace(_normed_net(scale_first), Gaussian(0.1), X, y, prior_variance=0.5)
    if g_prior:
        la.set_g_prior("ggn", n_probes=16, generator=torch.Generator().manual_seed(2))
    Xt = torch.randn(7, 3, generator=g, dtype=torch.float64)
    return functional_covariance(la.system(), la.fmodel.dense_jacobian(Xt)).diagonal()


def test_g_prior_makes_predictive_invariant_to_rescaling_before_normalisation():
    base = _predictive_var(1.0, True)
    scaled = _predictive_var(10.0, True)
    assert _rel(scaled, base) < 1e-3  # not exact: LayerNorm's eps = 1e-5 breaks scale invariance
    # without the g-prior the same rescaling changes the predictive a lot
    assert _rel(_predictive_var(10.0, False), _predictive_var(1.0, False)) > 0.1


def test_column_rms_g_prior_is_a_global_rescaling_of_the_ggn_variant():
    la = ct_like(side=8, n_meas=40, channels=4, noise_var=0.04)
    s1 = la.set_g_prior("ggn", n_probes=8, generator=torch.Generator().manual_seed(0))
    s2 = la.set_g_prior("column_rms", n_probes=8, generator=torch.Generator().manual_seed(0))
    ratio = s2 / s1
    torch.testing.assert_close(
        ratio, torch.full_like(ratio, math.sqrt(40 / 0.04)), rtol=1e-4, atol=0
    )


def test_matern_em_updates_lengthscales_and_improves_evidence():
    la = ct_like(
        side=8,
        n_meas=60,
        channels=4,
        noise=0.1,
        prior="matern",
        prior_variance=0.05,
        noise_var=0.05,
        lengthscale=0.3,
    )
    before = la.log_marginal_likelihood().item()
    hist = fit_em(
        la, n_cycles=6, n_samples=128, solver="cg", generator=torch.Generator().manual_seed(0)
    )
    after = la.log_marginal_likelihood().item()
    assert after > before
    assert not torch.allclose(hist.lengthscale[-1], torch.full_like(hist.lengthscale[-1], 0.3))


def test_em_rejects_bad_options():
    la = blr()
    with pytest.raises(ValueError, match="estimator"):
        fit_em(la, estimator="bogus")
    with pytest.raises(ValueError, match="needs solver='exact'"):
        fit_em(la, estimator="exact", solver="cg")
    with pytest.raises(ValueError, match="unknown solver"):
        fit_em(la, solver="magic")


class _SumOfLinear(nn.Module):
    """m linear maps of the same inputs, summed: every block has the same Jacobian, so the
    data fix only the blocks' sum and per-block effective dimensions are very noisy."""

    def __init__(self, p: int, m: int) -> None:
        super().__init__()
        self.parts = nn.ModuleList([nn.Linear(p, 1, bias=False) for _ in range(m)])

    def forward(self, x):
        return sum(part(x) for part in self.parts)


def test_function_space_em_noise_variance_unbiased_with_32_samples():
    """σ² from EM (function-space γ, 32 samples per cycle) averaged over seeds equals the exact
    evidence maximiser's. 16 blocks with n − γ ≈ 20: block estimates go negative (they are
    clipped for the per-block σ_b² update), and a bias of the total γ of ~1 would move σ² by
    ~5 %; the tolerance is 3 standard errors of the seed average plus 1 %."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 20, generator=g, dtype=torch.float64)
    y = X @ (0.5 * torch.randn(20, 1, generator=g, dtype=torch.float64))
    y = y + 0.3 * torch.randn(40, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    la = LinearisedLaplace(_SumOfLinear(20, 16).double(), Gaussian(1.0), X, y, prior_variance=1.0)
    assert la.selection.n_blocks == 16
    _, noise_ref = _reference(la)
    finals, clipped = [], False
    for seed in range(12):
        hist = fit_em(
            copy.deepcopy(la),
            n_cycles=10,
            n_samples=32,
            solver="exact",
            estimator="function",
            generator=torch.Generator().manual_seed(seed),
        )
        finals.append(hist.noise_var[-1])
        clipped |= any(float(gb.min()) <= 1e-6 for gb in hist.gamma)
    assert clipped  # the regime where per-block clipping would bias the total
    v = torch.tensor(finals, dtype=torch.float64)
    se = float(v.std()) / math.sqrt(len(finals))
    assert abs(float(v.mean()) - noise_ref) < 3 * se + 0.01 * noise_ref, (v, noise_ref)


def test_cg_em_builds_one_preconditioner_per_cycle_with_unchanged_results(monkeypatch):
    """EM's mode and sample solves share one Nyström build per cycle; with the default
    fixed-seed probes the trajectories equal those of per-solve builds exactly."""
    from dip_uq.laplace.solvers import cg

    calls = []
    real = cg.nystrom_preconditioner

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(cg, "nystrom_preconditioner", counting)
    opts = {"tol": 1e-8, "iterations": 200, "precond_rank": 20}
    hists = []
    for extra in ({}, {"precond": None}):  # None: let every solve build its own
        la = ct_like(side=10, n_meas=60, channels=4, noise=0.1, prior_variance=0.05)
        calls.clear()
        hists.append(
            fit_em(
                la,
                n_cycles=3,
                n_samples=8,
                solver="cg",
                generator=torch.Generator().manual_seed(0),
                solver_opts={**opts, **extra},
            )
        )
        hists[-1].builds = len(calls)
    shared, own = hists
    assert shared.builds == 3 and own.builds == 6
    for a, b in zip(shared.noise_var, own.noise_var):
        assert a == pytest.approx(b, rel=1e-10)
    torch.testing.assert_close(shared.prior_variance[-1], own.prior_variance[-1])


@pytest.mark.parametrize(
    "solver,opts",
    [
        ("cg", {"tol": 1e-10, "iterations": 300, "precond_rank": 20}),
        ("sgd", {"iterations": 150, "tol": 0.0, "precond": "lowrank", "precond_rank": 40}),
    ],
)
def test_em_in_sample_batches_equals_one_batch(solver, opts):
    """``sample_batch`` solves the same draws a few at a time (the peak memory of the smaller
    batch): γ̂, the Matérn tap moments and the warm starts are accumulated, so the trajectories
    equal those of one batch (Matérn blocks: the lengthscale step sees the same moments)."""
    hists = []
    for batch in (None, 3):
        la = ct_like(side=10, n_meas=60, channels=4, noise=0.1, prior_variance=0.05)
        la.prior.kinds = ["matern"] * len(la.prior.kinds)
        la.prior.__init__(la.selection, "matern", variance=0.05, lengthscale=0.3)
        hists.append(
            fit_em(
                la,
                n_cycles=3,
                n_samples=8,
                solver=solver,
                generator=torch.Generator().manual_seed(0),
                solver_opts=opts,
                sample_batch=batch,
            )
        )
    one, many = hists
    for a, b in zip(one.noise_var, many.noise_var):
        assert a == pytest.approx(b, rel=1e-6)
    torch.testing.assert_close(one.prior_variance[-1], many.prior_variance[-1], rtol=1e-6, atol=0)
    torch.testing.assert_close(one.lengthscale[-1], many.lengthscale[-1], rtol=1e-6, atol=0)
    assert not torch.allclose(one.lengthscale[-1], one.lengthscale[0] * 0 + 0.3)  # ℓ moved
    assert all(one.converged) or solver == "sgd"


def test_em_with_preconditioned_sgd_reaches_the_evidence_maximiser():
    """(c)-type problem: EM whose samples and mode come from the low-rank-preconditioned sgd
    lands on the exact evidence maximiser like EM with cg (λ and σ² within 2 %; with 256
    draws both solvers land 4.9 % off, the Monte-Carlo error of γ̂, identically)."""
    la = _ct_small()
    var_ref, noise_ref = _reference(la)
    hist = fit_em(
        la,
        n_cycles=10,
        n_samples=512,
        solver="sgd",
        generator=torch.Generator().manual_seed(1),
        solver_opts={"iterations": 200, "tol": 1e-6, "precond": "lowrank", "precond_rank": 100},
        sample_batch=128,
    )
    assert _rel(hist.noise_var[-1], noise_ref) < 0.02
    assert _rel(hist.prior_variance[-1], var_ref) < 0.02
    assert all(hist.converged)


def test_em_refreshing_the_preconditioner_builds_once_and_lands_on_the_same_fixed_point(
    monkeypatch,
):
    """``refresh_preconditioner``: one Nyström build in the first cycle, rescaled after;
    CG converges to the same tolerance either way, so the trajectories agree (Matérn
    blocks, so lengthscales move and the refresh is only approximate)."""
    from dip_uq.laplace.solvers import cg

    calls = []
    real = cg.nystrom_preconditioner

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(cg, "nystrom_preconditioner", counting)
    hists = []
    for refresh in (False, True):
        la = ct_like(side=10, n_meas=60, channels=4, noise=0.1, prior_variance=0.05)
        la.prior.__init__(la.selection, "matern", variance=0.05, lengthscale=0.3)
        calls.clear()
        h = fit_em(
            la,
            n_cycles=4,
            n_samples=8,
            solver="cg",
            generator=torch.Generator().manual_seed(0),
            solver_opts={"tol": 1e-10, "iterations": 300, "precond_rank": 20},
            refresh_preconditioner=refresh,
        )
        h.builds = len(calls)
        hists.append(h)
    own, refreshed = hists
    assert own.builds == 4 and refreshed.builds == 1
    assert refreshed.preconditioner is not None and "refresh" in refreshed.preconditioner.info
    for a, b in zip(own.noise_var, refreshed.noise_var):
        assert a == pytest.approx(b, rel=1e-6)
    torch.testing.assert_close(own.lengthscale[-1], refreshed.lengthscale[-1], rtol=1e-5, atol=0)
    assert all(refreshed.converged)


def test_noise_step_stays_bounded_when_gamma_hat_reaches_n_obs():
    """d > n_obs and almost noiseless data: γ ≈ n_obs, and 16-sample γ̂ overshoots n_obs
    often enough that σ² = r²/(n_obs − γ̂) jumps by 10⁵ (the 41,000-iteration protocol DIP);
    the floored denominator keeps every seed on the exact-γ fixed point."""
    la0 = blr(n=60, p=90, noise=0.02, prior_variance=1.0, noise_var=1.0)
    ref = copy.deepcopy(la0)
    noise_ref = fit_em(ref, n_cycles=200, solver="exact", estimator="exact").noise_var[-1]

    def run(margin, seed):
        la = copy.deepcopy(la0)
        g = torch.Generator().manual_seed(seed)
        return fit_em(
            la,
            n_cycles=10,
            n_samples=16,
            solver="exact",
            estimator="function",
            generator=g,
            noise_margin=margin,
        )

    unguarded = [run(0.0, s).noise_var[-1] for s in range(4)]
    assert max(unguarded) > 1e3 * noise_ref  # the failure the floor exists for
    for s in range(4):
        hist = run(3.0, s)
        assert _rel(hist.noise_var[-1], noise_ref) < 0.5
        assert "floored" in hist.noise_update and all(math.isfinite(v) for v in hist.noise_var)


def test_per_block_step_skips_blocks_whose_gamma_hat_is_unresolved():
    """Block b sees its inputs scaled by 1e-3 (γ_b ≈ 0.03 of 20): its 8-sample function-space
    share is noise around zero, and q_b/γ̂_b would be arbitrary (10⁶-10²⁰ in the demo).
    Such a block keeps its variance; the determined block a gets MacKay's update."""

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(20, 1, bias=False)
            self.b = nn.Linear(20, 1, bias=False)

        def forward(self, x):
            return self.a(x[:, :20]) + self.b(1e-3 * x[:, 20:])

    g = torch.Generator().manual_seed(0)
    X = torch.randn(100, 40, generator=g, dtype=torch.float64)
    w = 0.5 * torch.randn(20, 1, generator=g, dtype=torch.float64)
    y = X[:, :20] @ w + 0.1 * torch.randn(100, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    la0 = LinearisedLaplace(Two().double(), Gaussian(0.05), X, y, prior_variance=1.0)
    assert la0.selection.n_blocks == 2

    def one_cycle(margin):
        la = copy.deepcopy(la0)
        gen = torch.Generator().manual_seed(0)
        kw = dict(n_cycles=1, n_samples=8, solver="exact", tied_cycles=0, generator=gen)
        hist = fit_em(la, estimator="function", noise_margin=margin, **kw)
        return hist.prior_variance[-1], hist.gamma[-1]

    exact = fit_em(copy.deepcopy(la0), n_cycles=1, solver="exact", estimator="exact", tied_cycles=0)
    var, gam = one_cycle(3.0)
    assert float(var[1]) == 1.0  # unresolved: kept
    assert abs(float(gam[0]) - float(exact.gamma[-1][0])) < 2.0  # ≈ 20, resolved
    assert _rel(var[0], exact.prior_variance[-1][0]) < 0.1
    var0, _ = one_cycle(0.0)  # without the test the noise sets block b's variance
    assert float(var0[1]) != 1.0


@pytest.mark.parametrize("solver", ["sgd", "cg"])
def test_em_resumed_from_a_cycle_state_equals_an_uninterrupted_run(solver):
    """``on_cycle`` hands out what a resume needs; ``resume_from`` (hyperparameters restored
    by the caller) continues with the same probes and warm starts. sgd's warm start is
    u = L⁻¹z (prior-dependent), cg's the dual α."""
    la0 = blr(prior_variance=1.0, noise_var=1.0)
    opts = {"iterations": 300} if solver == "sgd" else {}
    kw = dict(n_cycles=4, n_samples=16, solver=solver, solver_opts=opts)
    ref = fit_em(copy.deepcopy(la0), generator=torch.Generator().manual_seed(1), **kw)

    states, hyper = [], []
    la = copy.deepcopy(la0)

    def keep(state):
        states.append(copy.deepcopy(state))
        hyper.append(copy.deepcopy((la.prior.log_variance, la.likelihood.log_noise_var)))

    fit_em(la, generator=torch.Generator().manual_seed(1), on_cycle=keep, **kw)
    assert [s["cycle"] for s in states] == [1, 2, 3, 4]
    la = copy.deepcopy(la0)
    with torch.no_grad():
        la.prior.log_variance.copy_(hyper[1][0])
        la.likelihood.log_noise_var.copy_(hyper[1][1])
    # another seed: the generator is rewound to the saved start of EM
    res = fit_em(la, generator=torch.Generator().manual_seed(9), resume_from=states[1], **kw)
    assert len(res.noise_var) == 4
    assert res.noise_var[-1] == pytest.approx(ref.noise_var[-1], rel=1e-10)
    torch.testing.assert_close(res.prior_variance[-1], ref.prior_variance[-1], rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="outside"):
        fit_em(copy.deepcopy(la0), resume_from={**states[1], "cycle": 5}, **kw)


def test_exact_estimator_learns_matern_lengthscales():
    """The exact E-step (dense traces for γ) also moves the Matérn lengthscales, from the
    posterior's tap moments of exact draws, towards a stationary point of the evidence."""
    la = ct_like(
        side=8,
        n_meas=60,
        channels=4,
        noise=0.1,
        prior="matern",
        prior_variance=0.05,
        noise_var=0.05,
        lengthscale=0.3,
    )

    def grad_log_ell():
        p = la.prior.log_lengthscale
        flag, p.grad = p.requires_grad, None
        p.requires_grad_(True)
        ev = la.log_marginal_likelihood()
        ev.backward()
        g = p.grad.detach().clone()
        p.requires_grad_(flag)
        p.grad = None
        return float(ev.detach()), g

    before, g0 = grad_log_ell()
    hist = fit_em(
        la,
        n_cycles=25,
        n_samples=256,
        solver="exact",
        estimator="exact",
        generator=torch.Generator().manual_seed(0),
    )
    after, g1 = grad_log_ell()
    matern = [b for b, k in enumerate(la.prior.kinds) if k == "matern"]
    assert matern and not torch.allclose(hist.lengthscale[-1][matern], torch.tensor(0.3).double())
    assert after > before
    assert float(g1[matern].abs().max()) < 0.2 * float(g0[matern].abs().max())


def test_a_single_block_is_never_frozen_by_an_unresolved_gamma():
    """One block has no tied scale to fall back on: with γ̂ within its Monte-Carlo error of
    zero, MacKay's step still moves it (σ² = q/γ, γ clipped at 1) instead of holding the
    starting variance, which froze front-door EM at λ = 1 on a digits seed."""
    from dip_uq.laplace.mstep import BlockGamma, mackay_update

    g = BlockGamma(
        torch.tensor([0.2], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)
    )
    var_old, q = torch.tensor([1.0], dtype=torch.float64), torch.tensor([4.0], dtype=torch.float64)
    new, gamma, unresolved, _ = mackay_update(
        var_old, q, g, torch.tensor([10.0]), tied=False, n_obs=50
    )
    assert bool(unresolved[0]) and gamma == 1.0
    assert float(new[0]) == 4.0  # q / max(γ, 1), not the held 1.0
    # two blocks: the unresolved one still keeps its variance
    g2 = BlockGamma(
        torch.tensor([0.2, 5.0], dtype=torch.float64), torch.tensor([0.5, 0.5], dtype=torch.float64)
    )
    new2, *_ = mackay_update(var_old.repeat(2), q.repeat(2), g2, torch.tensor([10.0, 10.0]),
                             tied=False, n_obs=50)  # fmt: skip
    assert float(new2[0]) == 1.0 and float(new2[1]) == 0.8

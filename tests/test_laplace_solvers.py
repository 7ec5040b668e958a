"""Solvers against exact dense posteriors (float64) on problems (a)-(d)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_laplace_problems import blr, classifier, ct_like, mlp, one_thread  # noqa: F401

from dip_uq.laplace import draw_noise
from dip_uq.laplace.solvers import functional_covariance


def _problem(name):
    if name == "blr":
        return blr(prior_variance=0.05, noise_var=0.3)
    if name == "mlp":
        return mlp(prior_variance=0.1)
    # moderate conditioning (λ_max(ĜᵀĜ) ~ 1e2-1e3) keeps the iterative solvers short
    if name == "ct":  # default runs: d = 1296, d_y = 100
        return ct_like(side=12, n_meas=100, channels=8, noise=0.1, prior_variance=0.05)
    if name == "ct_full":  # the size: d = 4896, d_y = 200 (slow)
        return ct_like(side=16, n_meas=200, channels=16, noise=0.1, prior_variance=0.02)
    return classifier(prior_variance=1.0)


def test_exact_blr_matches_closed_form():
    la = blr(prior_variance=0.5, noise_var=0.1)
    X = torch.cat([la.inputs, torch.ones(la.inputs.shape[0], 1, dtype=torch.float64)], 1)
    H = X.T @ X / 0.1 + torch.eye(X.shape[1], dtype=torch.float64) / 0.5
    mean = torch.linalg.solve(H, X.T @ la.targets[:, 0] / 0.1)
    # parameter order: weight (49) then bias (1), as in X
    res = la.linear_mode("exact")
    torch.testing.assert_close(res.samples[0], mean)
    cov = functional_covariance(la.system(), torch.eye(la.d, dtype=torch.float64))
    torch.testing.assert_close(cov, torch.linalg.inv(H))


def test_exact_classifier_matches_dense_softmax_ggn():
    la = classifier(prior_variance=1.0)
    J = la.fmodel.dense_jacobian(la.inputs).reshape(*la.inputs.shape[:1], -1, la.d)  # (n, C, d)
    # B_n by the closed-form product p⊙v − p(pᵀv) + 1e-6 v, column by column
    C = J.shape[1]
    eye = torch.eye(C, dtype=torch.float64)[:, None, :].expand(C, J.shape[0], C)
    B = la.likelihood.curvature_mv(eye).permute(1, 2, 0)  # (n, C, C)
    H = torch.einsum("nci,ncd,ndj->ij", J, B, J) + torch.eye(la.d, dtype=torch.float64)
    cov = functional_covariance(la.system(), torch.eye(la.d, dtype=torch.float64))
    torch.testing.assert_close(cov, torch.linalg.inv(H))


SOLVER_OPTS = {
    "sgd": dict(iterations=3000, tol=1e-6, momentum=0.9),
    "cg": dict(tol=1e-8, precond_rank=10),
    "sdd": dict(iterations=3000, tol=1e-6),
}


@pytest.mark.parametrize(
    "problem", ["blr", "mlp", "ct", "cls", pytest.param("ct_full", marks=pytest.mark.slow)]
)
@pytest.mark.parametrize("solver", ["sgd", "cg", "sdd"])
def test_solver_samples_equal_exact_draw_by_draw(problem, solver):
    """With shared noise all solvers target the same z; compare each draw to `exact`."""
    la = _problem(problem)
    system = la.system()
    g = torch.Generator().manual_seed(7)
    noise = draw_noise(system, 6, g)
    ref = la.sample(6, "exact", noise=noise).samples
    res = la.sample(6, solver, generator=g, noise=noise, **SOLVER_OPTS[solver])
    err = float((res.samples - ref).norm() / ref.norm())
    tol = 1e-6 if solver == "cg" else 2e-3
    assert err < tol, (err, res.iterations, res.residual)
    assert res.converged and res.iterations > 0 and len(res.trace) > 0
    # and the posterior mean θ_lin (regression only)
    if problem != "cls":
        m_ref = la.linear_mode("exact").samples[0]
        m = la.linear_mode(solver, **SOLVER_OPTS[solver]).samples[0]
        assert float((m - m_ref).norm() / m_ref.norm()) < tol


def test_sgd_minibatches_and_polyak_converge_near_exact():
    la = _problem("mlp")
    g = torch.Generator().manual_seed(1)
    noise = draw_noise(la.system(), 4, g)
    ref = la.sample(4, "exact", noise=noise).samples
    res = la.sample(4, "sgd", generator=g, noise=noise, batch_size=20, iterations=1500, polyak=True)
    assert float((res.samples - ref).norm() / ref.norm()) < 0.05


def test_sdd_minibatches_converge_to_exact():
    la = _problem("blr")
    g = torch.Generator().manual_seed(1)
    noise = draw_noise(la.system(), 4, g)
    ref = la.sample(4, "exact", noise=noise).samples
    res = la.sample(4, "sdd", generator=g, noise=noise, batch_size=50, iterations=3000, tol=1e-5)
    assert float((res.samples - ref).norm() / ref.norm()) < 1e-2


def _mc_check(samples_out: torch.Tensor, cov: torch.Tensor, k: int):
    """Per-output variances and the whole covariance against the exact one, with tolerances
    from Monte-Carlo theory (var of a K-sample variance = 2σ⁴/K)."""
    S = samples_out.T @ samples_out / k  # zero-mean samples
    rel = (S.diagonal() - cov.diagonal()).abs() / cov.diagonal()
    assert float(rel.median()) < 2.0 * math.sqrt(2 / k)
    assert float(rel.max()) < 5.5 * math.sqrt(2 / k)
    # covariance test along the top eigenvectors of C and random directions a:
    # aᵀSa / aᵀCa ~ χ²_K / K (relative sd √(2/K)); dropping the correlations must fail it
    evecs = torch.linalg.eigh(cov)[1][:, -5:].T
    rand = torch.randn(
        20, cov.shape[0], generator=torch.Generator().manual_seed(0), dtype=cov.dtype
    )
    dirs = torch.cat([evecs, rand / rand.norm(dim=1, keepdim=True)])

    def worst(c):
        return float(((dirs @ S * dirs).sum(1) / (dirs @ c * dirs).sum(1) - 1).abs().max())

    assert worst(cov) < 5 * math.sqrt(2 / k)
    assert worst(torch.diag(cov.diagonal())) > 5 * math.sqrt(2 / k)  # the test can fail


@pytest.mark.parametrize(
    "problem", ["mlp", "ct", "cls", pytest.param("ct_full", marks=pytest.mark.slow)]
)
def test_monte_carlo_moments_match_exact_posterior(problem):
    la = _problem(problem)
    k = 1024 if problem != "cls" else 2048
    system = la.system()
    J = la.fmodel.dense_jacobian(la.inputs)
    cov = functional_covariance(system, J)
    g = torch.Generator().manual_seed(11)
    solver = "cg" if problem.startswith("ct") else "exact"
    res = la.sample(k, solver, g, **({"precond_rank": 100} if solver == "cg" else {}))
    out = la.functional_samples(res.samples).reshape(k, -1)
    assert float(out.mean(0).abs().max()) < 5 * float(cov.diagonal().sqrt().max()) / math.sqrt(k)
    _mc_check(out, cov, k)


@pytest.mark.slow
@pytest.mark.parametrize("solver", ["sgd", "cg", "sdd"])
def test_4096_samples_per_output_variance_within_10_percent(solver):
    la = _problem("ct")  # the d ≈ 5k problem is covered draw by draw (slow) above
    k = 4096
    cov = functional_covariance(la.system(), la.fmodel.dense_jacobian(la.inputs))
    # a 10 % variance test needs only moderate solver accuracy
    opts = {
        "sgd": dict(iterations=800, tol=1e-4),
        "cg": dict(tol=1e-6),
        "sdd": dict(iterations=800, tol=1e-4),
    }
    res = la.sample(k, solver, torch.Generator().manual_seed(3), **opts[solver])
    out = la.functional_samples(res.samples).reshape(k, -1)
    var = (out**2).mean(0)
    assert float(((var - cov.diagonal()).abs() / cov.diagonal()).max()) < 0.10


def test_functional_variance_streams_and_matches_exact():
    la = _problem("ct")
    g = torch.Generator().manual_seed(5)
    var = la.functional_variance(
        n_samples=512, solver="cg", generator=g, batch_size=256, precond_rank=100
    )
    exact = functional_covariance(la.system(), la.fmodel.dense_jacobian(la.inputs)).diagonal()
    assert var.shape == (1, 1, 12, 12)
    rel = (var.reshape(-1) - exact).abs() / exact
    assert float(rel.median()) < 2 * math.sqrt(2 / 512)


def test_sgd_reports_decreasing_objective_and_divergence_is_an_error():
    la = _problem("blr")
    res = la.sample(4, "sgd", torch.Generator().manual_seed(0), iterations=400, tol=1e-8)
    obj = res.state["objective"]
    assert len(obj) == len(res.trace) and obj[-1] < obj[0]
    with pytest.raises(FloatingPointError, match="diverged"):
        la.sample(2, "sgd", torch.Generator().manual_seed(0), lr=10.0, iterations=2000)
    with pytest.raises(FloatingPointError, match="diverged"):
        la.sample(2, "sdd", torch.Generator().manual_seed(0), lr=10.0, iterations=2000)


# ---- the Nyström preconditioner: chunking, determinism, float32 robustness --------------
def _ct32(prior_variance: float):
    """The (c)-type problem in float32 (d = 1296, d_y = 100)."""
    from test_laplace_problems import MatrixOperator, cnn_model

    from dip_uq.laplace import Gaussian, LinearisedLaplace

    g = torch.Generator().manual_seed(0)
    model = cnn_model(8, 0).float()
    z0 = torch.randn(1, 1, 12, 12, generator=g)
    op = MatrixOperator(torch.randn(100, 144, generator=g) / 12, (1, 12, 12))
    with torch.no_grad():
        y = op(model(z0)) + 0.1 * torch.randn(1, 100, generator=g)
    return LinearisedLaplace(
        model,
        Gaussian(0.01, operator=op),
        z0,
        y,
        params="conv_weights",
        prior_variance=prior_variance,
    )


class _MatrixSystem:
    """Duck-typed system whose kernel GΣGᵀ is a given symmetric matrix (float32 products)."""

    def __init__(self, K: torch.Tensor, dtype=torch.float32):
        self.K, self.n_obs, self.dtype, self.device = K, K.shape[0], dtype, K.device
        self.calls: list[int] = []

    def gram_mv(self, a):
        self.calls.append(a.shape[0])
        return a @ self.K.to(a.dtype)

    def kernel_mv(self, a):
        return self.gram_mv(a) + a


def _spectrum(n: int, eigs: torch.Tensor) -> torch.Tensor:
    V, _ = torch.linalg.qr(
        torch.randn(n, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    )
    return (V * eigs) @ V.T


def test_nystrom_chunks_probe_vectors_and_is_deterministic_by_default():
    from dip_uq.laplace.solvers import nystrom_preconditioner

    K = _spectrum(60, torch.logspace(3, -3, 60, dtype=torch.float64))
    sys_a, sys_b = _MatrixSystem(K, torch.float64), _MatrixSystem(K, torch.float64)
    pa, lam_a = nystrom_preconditioner(sys_a, rank=40, oversample=10, chunk_size=16)
    pb, lam_b = nystrom_preconditioner(sys_b, rank=40, oversample=10, chunk_size=None)
    # probes in chunks, then one product of the top 8 eigenvectors (kept for refreshes)
    assert sys_a.calls == [16, 16, 16, 2, 8] and sys_b.calls == [50, 8]
    torch.testing.assert_close(lam_a, lam_b)  # same fixed-seed probes, chunked or not
    v = torch.randn(3, 60, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(pa(v), pb(v))
    # a different generator gives different probes (the default really is a fixed seed)
    _, lam_c = nystrom_preconditioner(sys_a, 40, 10, torch.Generator().manual_seed(5))
    assert not torch.equal(lam_c, lam_a)
    # the top eigenvalues are those of K (rank 40 of a fast-decaying spectrum)
    torch.testing.assert_close(
        lam_a[:10], torch.logspace(3, -3, 60, dtype=torch.float64)[:10], rtol=1e-3, atol=0
    )
    with pytest.raises(ValueError, match="chunk_size"):
        nystrom_preconditioner(sys_a, 10, chunk_size=0)


def test_nystrom_never_fails_on_an_indefinite_float32_kernel():
    """Round-off (or an unmatched adjoint) can make the probed core QᵀKQ indefinite beyond any
    sensible shift: the eigh fallback must still give a finite SPD preconditioner that helps."""
    from dip_uq.laplace.solvers import nystrom_preconditioner
    from dip_uq.laplace.solvers.cg import batched_pcg

    eigs = torch.logspace(4, -2, 80, dtype=torch.float64)
    eigs[-5:] = -100.0  # beyond the largest shift eps·‖Y‖_F·10³ ≈ 4
    K = _spectrum(80, eigs)
    system = _MatrixSystem(K)
    with pytest.raises(torch.linalg.LinAlgError):  # the plain Cholesky route fails here
        Q = torch.linalg.qr(torch.randn(80, 80, dtype=torch.float64))[0]
        torch.linalg.cholesky(0.5 * (Q.T @ K @ Q + (Q.T @ K @ Q).T))
    precond, lam = nystrom_preconditioner(system, rank=80, oversample=0)
    assert precond.info["method"] == "eigh"
    assert bool(torch.isfinite(lam).all()) and float(lam.min()) >= 0
    P = precond(torch.eye(80))
    assert float(torch.linalg.eigvalsh(0.5 * (P + P.T).double()).min()) > 0
    # it still preconditions the PSD part well: CG on K₊ + I converges much faster with it
    Kp = _spectrum(80, eigs.clamp_min(0)) + torch.eye(80, dtype=torch.float64)
    c = torch.randn(2, 80, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mv = lambda v: v @ Kp  # noqa: E731
    _, it_p, _ = batched_pcg(mv, c, lambda v: precond(v.float()).double(), tol=1e-6)
    _, it_0, _ = batched_pcg(mv, c, lambda v: v, tol=1e-6)
    assert it_p < it_0 / 2, (it_p, it_0)


def test_float32_preconditioned_cg_matches_float64():
    """Including a kernel far below the unit noise (σ_b² = 1e-10), where forming GΣGᵀQ as
    (GΣGᵀ + I)Q − Q in float32 made the Nyström core indefinite and its Cholesky fail."""
    from dip_uq.laplace.solvers import nystrom_preconditioner

    for pv in (0.05, 1e-10):
        la32 = _ct32(pv)
        la64 = copy.deepcopy(la32).double()
        la64.fmodel.net.double()
        s32, s64 = la32.system(), la64.system()
        assert s32.dtype == torch.float32 and s64.dtype == torch.float64
        _, lam32 = nystrom_preconditioner(s32, rank=90, oversample=10)
        _, lam64 = nystrom_preconditioner(s64, rank=90, oversample=10)
        top = slice(0, 20)
        assert float(((lam32[top] - lam64[top]).abs() / lam64[top]).max()) < 1e-3
        noise = draw_noise(s64, 4, torch.Generator().manual_seed(0))
        ref = la64.sample(4, "exact", noise=noise).samples
        noise32 = type(noise)(noise.xi.float(), noise.eps.float())
        res = la32.sample(4, "cg", noise=noise32, tol=1e-5, precond_rank=90)
        assert res.converged
        assert float((res.samples.double() - ref).norm() / ref.norm()) < 1e-4


@pytest.mark.parametrize("solver", ["sgd", "cg", "sdd"])
def test_callback_sees_current_samples_and_stops_the_run(solver):
    la = _problem("ct")
    g = torch.Generator().manual_seed(4)
    noise = draw_noise(la.system(), 3, g)
    ref = la.sample(3, "exact", noise=noise).samples
    seen: list[tuple[int, float]] = []

    def stop_at_1_percent(it, current):
        seen.append((it, float((current() - ref).norm() / ref.norm())))
        return seen[-1][1] < 0.01

    opts = {**SOLVER_OPTS[solver], "callback": stop_at_1_percent}
    if solver != "cg":
        opts["check_every"] = 5
    res = la.sample(3, solver, generator=g, noise=noise, **opts)
    assert seen and seen[-1][1] < 0.01 and all(e >= 0.01 for _, e in seen[:-1])
    assert res.iterations == seen[-1][0] < (3000 if solver != "cg" else 500)
    # the run stopped where the callback said so: the returned draws are the ones it saw
    assert abs(float((res.samples - ref).norm() / ref.norm()) - seen[-1][1]) < 1e-3


def test_cg_breakdown_freezes_the_row_with_a_warning():
    """pᵀAp ≤ 0 (an indefinite 'SPD' matrix, as float32 round-off can produce) must not turn
    into inf/NaN: that row keeps its last iterate and is reported unconverged; a healthy row
    solved in the same batch still converges."""
    from dip_uq.laplace.solvers.cg import batched_pcg

    eigs = torch.tensor([1.0, 2.0, -3.0, 4.0], dtype=torch.float64)
    bad = _spectrum(4, eigs)
    good = _spectrum(4, eigs.abs())
    c = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, -2.0, 0.5, 3.0]], dtype=torch.float64)

    def mv(v):  # row 0 sees the indefinite matrix, row 1 the SPD one
        return torch.stack([v[0] @ bad, v[1] @ good])

    with pytest.warns(RuntimeWarning, match="breakdown"):
        x, it, trace = batched_pcg(mv, c, lambda v: v, tol=1e-10, max_iter=50)
    assert bool(torch.isfinite(x).all()) and all(math.isfinite(t) for t in trace)
    torch.testing.assert_close(x[1], torch.linalg.solve(good, c[1]))
    assert trace[-1] > 1e-10  # row 0 is not claimed converged
    assert it < 50  # stops once only frozen rows are left


def test_sgd_auto_momentum_follows_the_conditioning():
    """momentum="auto" = (√κ−1)/(√κ+1), κ = λ_max + 1, clipped to [0.9, 0.999], is what the
    solver uses, and it converges to the exact samples of the same draws."""
    from dip_uq.laplace.solvers import get_solver
    from dip_uq.laplace.solvers.sgd import auto_momentum

    assert auto_momentum(0.0) == 0.9 and auto_momentum(1e12) == 0.999
    assert auto_momentum(99.0) == 0.9  # √κ = 10 → 9/11 < 0.9
    assert auto_momentum(1e4) == pytest.approx((math.sqrt(10001) - 1) / (math.sqrt(10001) + 1))
    la = ct_like(side=12, n_meas=100, channels=8, noise=0.02, prior_variance=1.0)
    system = la.system()
    noise = draw_noise(system, 4, torch.Generator().manual_seed(0))
    ref = get_solver("exact")(system, 4, noise=noise).samples
    gen = torch.Generator().manual_seed(5)
    res = get_solver("sgd")(
        system, 4, gen, noise=noise, iterations=3000, tol=0.0, momentum="auto", precond=None
    )
    lam = system.lambda_max(generator=torch.Generator().manual_seed(5))
    assert res.state["momentum"] == pytest.approx(auto_momentum(lam), rel=1e-6)
    assert res.state["momentum"] > 0.99  # κ ≈ 1.7e5 here
    assert float((res.samples - ref).norm() / ref.norm()) < 1e-3
    with pytest.raises(ValueError, match="momentum"):
        get_solver("sgd")(system, 1, noise=noise, iterations=1, momentum=1.5)


# ---- sgd's low-rank preconditioner (subspace iteration + Rayleigh–Ritz) ------------------
def _dense_primal(system) -> torch.Tensor:
    """(ĜᵀĜ + I) as a dense ``(d, d)`` matrix, column by column (small problems only)."""
    eye = torch.eye(system.d, dtype=system.dtype)
    return torch.cat([system.primal_mv(eye[i : i + 200]) for i in range(0, system.d, 200)])


@pytest.mark.parametrize("store", [False, True])
@torch.no_grad()
def test_lowrank_preconditioner_is_spd_and_clusters_the_spectrum(store):
    """P⁻¹ is symmetric with eigenvalues in (0, 1]; P⁻¹P has its spectrum in [~1, 1 + m]
    (m = first Ritz value left out) where P alone spans five decades; apply_ = apply."""
    from dip_uq.laplace.solvers import lowrank_preconditioner

    la = ct_like(side=12, n_meas=100, channels=8, noise=0.02, prior_variance=1.0)
    system = la.system()
    P = _dense_primal(system)
    pre = lowrank_preconditioner(system, rank=60, store=store)
    assert pre.rank == 60 and 0 < pre.missed < float(pre.ritz_values[-1])
    eye = torch.eye(system.d, dtype=system.dtype)
    Pinv = torch.cat([pre.apply(eye[i : i + 200]) for i in range(0, system.d, 200)])
    torch.testing.assert_close(Pinv, Pinv.T, atol=1e-9, rtol=0)
    e_inv = torch.linalg.eigvalsh(Pinv)
    assert float(e_inv.min()) > 0 and float(e_inv.max()) <= 1 + 1e-9
    # the preconditioned spectrum (of the similar SPD P^{-½} P P^{-½})
    w, V = torch.linalg.eigh(Pinv)
    half = (V * w.sqrt()) @ V.T
    spec = torch.linalg.eigvalsh(half @ P @ half)
    kappa_plain = float(torch.linalg.eigvalsh(P)[-1])  # λ_min(P) = 1
    assert kappa_plain > 1e5
    # m is a Ritz value, a lower bound of the eigenvalue it stands for: allow 2×
    assert float(spec.min()) > 0.99 and float(spec.max()) < 2 * (1 + pre.missed)
    assert float(spec.max()) / float(spec.min()) < kappa_plain / 100
    # Ritz values are lower bounds of the top eigenvalues of ĜᵀĜ (interlacing)
    top = torch.linalg.eigvalsh(P)[-60:].flip(0) - 1
    assert bool((pre.ritz_values <= top * (1 + 1e-8)).all())
    v = torch.randn(3, system.d, dtype=system.dtype, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(pre.apply_(v.clone()), pre.apply(v))
    assert pre.lambda_max() == pytest.approx(1.05 * float(spec.max()), rel=0.05)


def test_preconditioned_sgd_reaches_exact_samples_in_far_fewer_steps():
    """On a problem with κ ≈ 1.7e5 plain sgd is still 1e-2 away from the exact draws after
    1000 steps; with the rank-50 preconditioner 100 steps get within 1e-3, and the fixed
    point (the samples, the mean) is the same."""
    from dip_uq.laplace.solvers import get_solver, lowrank_preconditioner

    la = ct_like(side=12, n_meas=100, channels=8, noise=0.02, prior_variance=1.0)
    system = la.system()
    noise = draw_noise(system, 6, torch.Generator().manual_seed(0))
    ref = get_solver("exact")(system, 6, noise=noise).samples
    sgd = get_solver("sgd")

    def err(res):
        return float((res.samples - ref).norm() / ref.norm())

    plain = sgd(system, 6, noise=noise, iterations=1000, tol=0.0, precond=None)
    pre = lowrank_preconditioner(system, rank=50)
    fast = sgd(system, 6, noise=noise, iterations=100, tol=0.0, precond=pre)
    assert err(plain) > 1e-2 and err(fast) < 1e-3, (err(plain), err(fast))
    assert fast.state["lr"] > 50 * plain.state["lr"]  # the step 1/λ_max(P⁻¹P) is larger
    # the string option builds the same preconditioner (fixed-seed probes), also for the mean
    again = sgd(system, 6, noise=noise, iterations=100, tol=0.0, precond="lowrank", precond_rank=50)
    torch.testing.assert_close(again.samples, fast.samples)
    # the default ("auto") is the rank-200 (here: every direction) low-rank preconditioner
    default = sgd(system, 6, noise=noise, iterations=100, tol=0.0)
    full = sgd(system, 6, noise=noise, iterations=100, tol=0.0, precond="lowrank")
    torch.testing.assert_close(default.samples, full.samples)
    assert err(default) < 1e-3
    m_ref = la.linear_mode("exact").samples[0]
    m = la.linear_mode("sgd", iterations=300, tol=1e-9, precond="lowrank", precond_rank=50)
    assert float((m.samples[0] - m_ref).norm() / m_ref.norm()) < 1e-4


def test_preconditioned_sgd_bad_options():
    la = ct_like(side=12, n_meas=100, channels=8, noise=0.1, prior_variance=0.05)
    system = la.system()
    from dip_uq.laplace.solvers import get_solver, lowrank_preconditioner

    with pytest.raises(ValueError, match="precond must be"):
        get_solver("sgd")(system, 1, iterations=1, precond="nystrom")
    with pytest.raises(TypeError, match="precond must be"):
        get_solver("sgd")(system, 1, iterations=1, precond=3)
    with pytest.raises(ValueError, match="rank must be"):
        lowrank_preconditioner(system, rank=0)
    blr_la = blr(prior_variance=0.05, noise_var=0.3)
    with pytest.raises(ValueError, match="precond_store=True"):
        blr_la.sample(2, "sgd", iterations=5, batch_size=10, precond="lowrank")
    # with a stored V minibatches work and reach the exact draws
    bsys = blr_la.system()
    noise = draw_noise(bsys, 4, torch.Generator().manual_seed(0))
    ref = blr_la.sample(4, "exact", noise=noise).samples
    res = blr_la.sample(
        4,
        "sgd",
        torch.Generator().manual_seed(1),
        noise=noise,
        iterations=3000,
        tol=0.0,
        batch_size=100,
        precond="lowrank",
        precond_rank=20,
        precond_store=True,
        polyak=True,
    )
    assert float((res.samples - ref).norm() / ref.norm()) < 0.05
    # the default "auto" is plain sgd under minibatches
    auto = blr_la.sample(4, "sgd", noise=noise, iterations=2, batch_size=100)
    assert auto.state["precond"] is None


def test_refreshed_nystrom_equals_a_fresh_build_after_a_scale_change():
    """A tied prior-variance and noise change scales GΣGᵀ by c: the refreshed
    preconditioner (one batched kernel product) equals a rebuild at the new values."""
    from dip_uq.laplace.solvers import nystrom_preconditioner
    from dip_uq.laplace.solvers.cg import refreshed_preconditioner

    la = ct_like(side=12, n_meas=100, channels=8, noise=0.1, prior_variance=0.05)
    system = la.system()
    old, _ = nystrom_preconditioner(system, rank=30)
    la.prior.set_variances(la.prior.variances() * 3.0)
    la.likelihood.set_noise_var(float(la.likelihood.noise_var) * 0.5)
    system = la.system()
    fresh, lam = nystrom_preconditioner(system, rank=30)
    new = refreshed_preconditioner(system, old)
    assert new.info["refresh"] == pytest.approx(6.0, rel=1e-6)
    torch.testing.assert_close(new.lam, lam, rtol=1e-6, atol=1e-8)
    v = torch.randn(3, system.n_obs, dtype=system.dtype, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(new(v), fresh(v), rtol=1e-6, atol=1e-8)

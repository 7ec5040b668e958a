"""Hyperparameters and the classification mode of the :class:`~dip_uq.laplace.front.Laplace`
front door: its side of the one EM loop (docs/methods.md §3), the dense evidence
and its L-BFGS maximiser, and damped Newton for the softmax θ_lin. Functions of a fitted
``Laplace`` ``la``; the class's methods call them."""

from __future__ import annotations

import math
import warnings

import torch

from .evidence import lbfgs_maximise
from .mstep import BlockGamma, exact_gamma_from_precision, paired_block_gamma
from .solvers import Noise, SolverResult
from .solvers.exact import robust_cholesky

__all__ = ["StreamedEM", "block_gamma", "exact_evidence", "newton_mode", "run_em", "run_marglik"]


class StreamedEM:
    """The front door's side of :func:`~dip_uq.laplace.em.fit_em` (an
    :class:`~dip_uq.laplace.em.EMModel`): the fit's fixed ξ and Gᵀε (kept at unit noise, so a
    new σ² rescales them), θ_lin by one solve (Gaussian) or damped Newton (softmax, which
    with ``curvature="mode"`` moves the curvature point and redraws Gᵀε from its seed), and
    the Newton iterate's own warm start in u."""

    def __init__(self, la) -> None:
        self.la, self.prior = la, la.prior
        self.u_mode = getattr(la, "_u_mode", None)
        self.u_samp = getattr(la, "_u_samp", None)
        self.theta: torch.Tensor | None = None  # the last θ_lin
        self._power: float | None = None

    @property
    def noise_var(self) -> float:
        return self.la._noise_var()

    def set_noise_var(self, value: float) -> None:
        self.la.log_sigma2.fill_(math.log(value))

    def system(self):
        return self.la._system()

    def warm_starts(self):
        return None, (None if self.u_samp is None else [self.u_samp])

    def draws(self, system, n, generator) -> Noise:
        return Noise(self.la.xi, None, self.la.noise_t)

    def cycle_noise(self, system, base: Noise) -> Noise:
        la = self.la
        return Noise(base.xi, None, la.noise_t / math.sqrt(la._noise_var()))

    def precondition(self, engine, system):
        return self.la._engine_solver(system)

    def mode(self, system, active, init):
        la = self.la
        if init is None:  # the last θ_lin under the current prior (u of the fit at first)
            init = self.u_mode if self.theta is None else la._Linv(self.theta[None])
        if la.kind == "gaussian":
            c, _ = system.target_t()
            u, res = la._solve(system, la._Lt(c[None]), init)
        else:
            theta, u = newton_mode(la, system, init, None)
            res = SolverResult(theta[None], 0)
            if la.curvature == "mode":
                system = la._system()  # the curvature now sits at θ_lin
                la.noise_t = la._mode_noise(system)
                active = la._engine_solver(system)
        res.samples = la._L(u)
        self.u_mode, self.theta = u, res.samples[0]
        return res, system, active

    def noise_statistics(self, system, theta_lin):
        if self.la.kind != "gaussian":
            return None
        if self._power is None:
            y2 = sum(float((y.double() ** 2).sum()) for _, y in system.batches())
            self._power = y2 / max(system.n_obs, 1)
        return system.residual_ss(theta_lin), self._power


def _estimator(la) -> str:
    """γ̂ for the front door's EM: exact traces with the exact solver; one prior block: the
    function-space mean ‖G z‖² (one more pass; its Monte-Carlo error is 1.5-4× smaller
    than the paired one's for a scalar prior on the digits MLPs, benchmarks/README.md);
    several blocks: the paired estimate, by far the most precise per block."""
    if la._exact_traces:
        return "exact"
    return "function" if la.selection.n_blocks == 1 else "paired"


def run_em(la, n_cycles, fit_noise, tied, verbose) -> dict[str, list]:
    """The front door's EM: :func:`~dip_uq.laplace.em.fit_em` on :class:`StreamedEM`, with
    γ̂ from :func:`_estimator`; then θ_lin and the K samples at the
    final hyperparameters. Returns laplace-torch style per-cycle lists."""
    from .em import fit_em

    if n_cycles < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_cycles}")
    model = StreamedEM(la)
    exact = la._exact_traces

    def report(state: dict) -> None:
        model.u_samp = (state["sample_init"] or [model.u_samp])[0]
        if verbose:
            h = state["history"]
            print(
                f"EM {state['cycle']}/{n_cycles}: gamma={float(h['gamma'][-1].sum()):.1f} "
                f"lambda={la.prior_precision.tolist()} sigma={la.sigma_noise:.4g}"
            )

    hist = fit_em(
        model, n_cycles, la.n_samples, la._engine_solver(la._system()),
        estimator=_estimator(la), tied_cycles=tied, update_noise=fit_noise,
        update_lengthscale=False, on_cycle=report,
    )  # fmt: skip
    la._solve_all(la._Linv(model.theta[None]), model.u_samp)
    unresolved = hist.unresolved[-1]
    if la.selection.n_blocks > 1 and bool(unresolved.any()) and n_cycles > (tied or 0):
        blocks = unresolved.nonzero().flatten().tolist()
        why = (
            "have γ ≈ 0: the data do not use them, so the evidence is flat in their "
            "precision (it grows without bound; the predictive is unaffected)"
            if exact
            else f"have γ within 3 Monte-Carlo standard errors of zero with "
            f"{la.n_samples} samples: they kept their variance (raise n_samples, or "
            "use prior='scalar')"
        )
        warnings.warn(f"EM: prior block(s) {blocks} {why}", stacklevel=3)
    la.history = {
        "prior_precision": [1.0 / v for v in hist.prior_variance],
        "sigma_noise": [v**0.5 for v in hist.noise_var],
        "gamma": hist.gamma,
        "unresolved": hist.unresolved,
        "residual": [max(a, b) for a, b in zip(hist.mode_residual, hist.sample_residual)],
        "converged": hist.converged,
    }
    return la.history


def block_gamma(la) -> BlockGamma:
    """γ_b at the current hyperparameters: exact from the dense factor (solver='exact'),
    else the paired estimate from the fit's prior draws ξ and whitened samples u."""
    if la._exact_traces:
        return exact_gamma_from_precision(la._dense_chol(), la.selection.block_sum)
    u = la._Linv(la.samples)
    return paired_block_gamma(la.xi, u, la.selection.block_sum)


def run_marglik(la, fit_noise: bool, rounds: int) -> dict[str, list]:
    """Type-II ML on the dense evidence (:func:`exact_evidence`) by the one L-BFGS loop;
    classification alternates it with θ_lin (``rounds`` times, the Laplace evidence moves
    with its mode)."""
    params = [la.prior.log_variance]
    log_s2 = la.log_sigma2.detach().clone().requires_grad_(True)
    if la.kind == "gaussian" and fit_noise:
        params.append(log_s2)
    hist: dict[str, list] = {"log_marginal_likelihood": [], "prior_precision": []}
    for _ in range(max(1, rounds if la.kind == "categorical" else 1)):
        theta_fixed = la.theta_lin.double()
        lbfgs_maximise(lambda t=theta_fixed: la._exact_evidence(log_s2, t), params)
        with torch.no_grad():
            la.log_sigma2.copy_(log_s2.detach())
        la._solve_all()
        hist["log_marginal_likelihood"].append(float(la.log_marginal_likelihood()))
        hist["prior_precision"].append(la.prior_precision.clone())
    la.history = hist
    return hist


def exact_evidence(la, log_s2: torch.Tensor, theta_fixed: torch.Tensor) -> torch.Tensor:
    """Exact log evidence (dense, float64, differentiable in log σ_b², log σ²).

    Gaussian (exact for the affine tangent model): with l = diag L, P = l M₁ l/σ² + I,
    u = P⁻¹ l b₁/σ², θ = l u: −½ SS(θ)/σ² − ½‖u‖² − ½ log|P| − (n_obs/2) log 2πσ²,
    SS(θ) = c₀ − 2θᵀb₁ + θᵀM₁θ. Softmax (Laplace approximation of the linear model at a
    fixed θ_lin): Σ log p(y|θ_lin) − ½ θ_linᵀΣ⁻¹θ_lin − ½ log|P|."""
    dm = la._dense_M()
    std = la._coord_std()
    if la.kind == "gaussian":
        s2 = log_s2.exp()
        P = la._dense_P(s2, std)
        C, _ = robust_cholesky(P)
        bw = std * dm["b1"] / s2
        u = torch.cholesky_solve(bw[:, None], C)[:, 0]
        th = std * u
        ss = dm["c0"] - 2 * th @ dm["b1"] + th @ dm["M"] @ th
        n_obs = la.n_data * la.n_outputs
        return (
            -0.5 * ss / s2
            - 0.5 * u @ u
            - C.diagonal().log().sum()
            - 0.5 * n_obs * (math.log(2 * math.pi) + log_s2)
        )
    P = la._dense_P(None, std)
    C, _ = robust_cholesky(P)
    loglik = -la._system().categorical_loss(theta_fixed.to(la.fmodel.theta_star().dtype))
    return loglik - 0.5 * ((theta_fixed / std) ** 2).sum() - C.diagonal().log().sum()


def newton_mode(la, system, init, n_newton):
    """Damped Newton for the softmax θ_lin in whitened coordinates (from θ*, or ``init``),
    with a backtracking line search; returns (θ_lin, u)."""
    u = la._Linv(system.theta[None]) if init is None else init.clone()  # start at θ* (or warm)
    obj = system.categorical_loss(la._L(u)[0]) + 0.5 * float((u**2).sum())
    at_mode = la.curvature == "mode"
    for _ in range(la.newton_steps if n_newton is None else n_newton):
        if at_mode:
            la._set_curvature_point(la._L(u)[0])
            system = system.with_shift(la._shift())
        g_data, _ = system.categorical_grad(la._L(u)[0])
        g = la._Lt(g_data[None]) + u
        step, _ = la._solve(system, g, None)
        half_decrement = 0.5 * float((g * step).sum())
        if half_decrement < 1e-7 * max(abs(obj), 1.0):
            # quadratic region: the predicted decrease is below what a float32 objective
            # resolves, so a line search would reject the (good) full step
            u = u - step
            break
        t = 1.0
        for _ls in range(10):
            u_new = u - t * step
            obj_new = system.categorical_loss(la._L(u_new)[0]) + 0.5 * float((u_new**2).sum())
            if obj_new <= obj - 1e-4 * t * float((g * step).sum()):
                break
            t *= 0.5
        else:
            break
        decrease = obj - obj_new
        u, obj = u_new, obj_new
        if decrease < 1e-6 * max(abs(obj), 1.0):
            break
    if at_mode:
        la._set_curvature_point(la._L(u)[0])
    return la._L(u)[0], u

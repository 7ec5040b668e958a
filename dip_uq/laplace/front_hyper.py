"""Hyperparameters and the classification mode of the :class:`~dip_uq.laplace.front.Laplace`
front door: sample-based EM with the shared M-step (docs/methods.md §3), the dense evidence
and its L-BFGS maximiser, and damped Newton for the softmax θ_lin. Functions of a fitted
``Laplace`` ``la``; the class's methods call them."""

from __future__ import annotations

import math
import warnings

import torch

from .evidence import lbfgs_maximise
from .mstep import (
    BlockGamma,
    exact_gamma_from_precision,
    mackay_update,
    noise_update,
    paired_block_gamma,
)
from .solvers import SolverResult
from .solvers.exact import robust_cholesky

__all__ = ["block_gamma", "exact_evidence", "newton_mode", "run_em", "run_marglik"]


def run_em(la, n_cycles, fit_noise, tied, verbose) -> dict[str, list]:
    if n_cycles < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_cycles}")
    prior, sel = la.prior, la.selection
    nb = sel.n_blocks
    if tied is None:
        tied = min(2, n_cycles // 2) if nb > 1 else 0
    sizes = sel.block_sizes().to(prior.log_variance.device).double()
    n_obs = la.n_data * la.n_outputs
    hist: dict[str, list] = {
        "prior_precision": [],
        "sigma_noise": [],
        "gamma": [],
        "unresolved": [],
        "residual": [],
        "converged": [],
    }
    u_mode, u_samp = getattr(la, "_u_mode", None), getattr(la, "_u_samp", None)
    for cycle in range(n_cycles):
        if cycle > 0:
            info_m, info_s = la._solve_all(u_mode, u_samp)
        else:
            info_m = info_s = SolverResult(la.samples[:0], 0)
        theta_lin, z = la.theta_lin, la.samples
        g = la._block_gamma()
        with torch.no_grad():
            var_old = prior.variances().double()
            q_b = var_old * prior.block_quadratic(theta_lin[None].double())[0]
            new_var, gamma, unresolved, _ = mackay_update(
                var_old, q_b, g, sizes, tied=cycle < tied, n_obs=n_obs
            )
            z_old, th_old = z, theta_lin  # not modified in place below
            prior.set_variances(new_var.clamp_min(1e-30))
            if la.kind == "gaussian" and fit_noise:
                ss = la._system().residual_ss(theta_lin)
                floor = 1e-6 * ss / max(n_obs, 1) + 1e-30
                s2, _ = noise_update(ss, n_obs, gamma, g.total_se)
                la.log_sigma2.fill_(math.log(max(s2, floor)))
            # warm starts: the same θ under the new prior
            u_mode = la._Linv(th_old[None]).to(z.dtype)
            u_samp = la._Linv(z_old).to(z.dtype)
        hist["prior_precision"].append(la.prior_precision.clone())
        hist["sigma_noise"].append(la.sigma_noise)
        hist["gamma"].append(g.gamma.clone())
        hist["unresolved"].append(unresolved.clone())
        hist["residual"].append(max(info_m.residual, info_s.residual))
        hist["converged"].append(info_m.converged and info_s.converged)
        if verbose:
            print(
                f"EM {cycle + 1}/{n_cycles}: gamma={gamma:.1f} "
                f"lambda={la.prior_precision.tolist()} sigma={la.sigma_noise:.4g}"
            )
    la._solve_all(u_mode, u_samp)
    if nb > 1 and bool(unresolved.any()) and n_cycles > tied:
        blocks = unresolved.nonzero().flatten().tolist()
        why = (
            "have γ ≈ 0: the data do not use them, so the evidence is flat in their "
            "precision (it grows without bound; the predictive is unaffected)"
            if la.solver == "exact"
            else f"have γ within 3 Monte-Carlo standard errors of zero with "
            f"{la.n_samples} samples: they kept their variance (raise n_samples, or "
            "use prior='scalar')"
        )
        warnings.warn(f"EM: prior block(s) {blocks} {why}", stacklevel=3)
    la.history = hist
    return hist


def block_gamma(la) -> BlockGamma:
    """γ_b at the current hyperparameters: exact from the dense factor (solver='exact'),
    else the paired estimate from the fit's prior draws ξ and whitened samples u."""
    if la.solver == "exact":
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

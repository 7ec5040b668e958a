"""Hyperparameters by sample-based EM (docs/methods.md §3), and the exact type-II reference.

One cycle at the current (Σ, σ²):
  E-step (a) θ_lin = mode of the affine tangent model (prior mean 0), warm-started;
  E-step (b) K samples z_k ~ N(0, H⁻¹), fixed noise reused across cycles (the prior part
             Lξ rescales with the hyperparameters automatically), warm-started;
  M-step (MacKay) per block b: γ_b = effective dimension, σ_b² = q_b / γ_b with
             q_b = σ_b² θ_lin,bᵀ Σ_b⁻¹ θ_lin,b (= ‖θ_lin,b‖² for a Normal block, in w
             coordinates under a g-prior); noise σ² = ‖y − ŷ_lin‖² / (n_obs − γ).
Effective dimension estimators (γ = Σ_b γ_b):
  ``"function"``: γ_b = mean_k z_{k,b}ᵀ (GᵀG z_k)_b, unbiased for Σ_{i∈b}(H⁻¹M)_ii, whose sum
                 is mean_k ‖G z_k‖² (preferred when d ≫ γ);
  ``"weight"``:   γ_b = d_b − mean_k z_{k,b}ᵀ Σ_b⁻¹ z_{k,b};
  ``"paired"``:   γ_b = mean_k (‖ξ_{k,b}‖² − z_{k,b}ᵀ Σ_b⁻¹ z_{k,b}) with ξ_k the prior draw of
                 z_k (θ₀ = L ξ_k): the same expectation, and per block by far the smallest
                 Monte-Carlo error (where the data do not act, z ≈ L ξ and the terms cancel);
  ``"exact"``:    dense traces (only with ``solver="exact"``); the Matérn lengthscale step
                 then takes the posterior's tap moments from ``n_samples`` exact draws.
The first ``tied_cycles`` cycles use one shared σ² (Σ q_b / Σ γ_b), then per block.
EM fixed points are stationary points of the exact evidence (checked against
:func:`maximise_evidence` in the tests).

:func:`fit_em` is the one EM loop of the package. What differs between the two doors is
behind :class:`EMModel`: :class:`InMemoryEM` (a :class:`LinearisedLaplace`, fixed ε, the mode
by one solve) and the front door's streamed model (``front_hyper.StreamedEM``: a DataLoader,
Gᵀε at unit noise, the softmax mode by Newton).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Protocol

import torch

from .evidence import lbfgs_maximise
from .mstep import BlockGamma, mackay_update, noise_update
from .solvers import Noise, SolverResult, draw_noise, get_solver, make_solver
from .solvers.registry import Solver
from .solvers.system import GGNSystem

__all__ = ["ESTIMATORS", "EMHistory", "EMModel", "InMemoryEM", "fit_em", "maximise_evidence"]

#: effective-dimension estimators (module docstring)
ESTIMATORS = ("function", "weight", "paired", "exact")


@dataclass
class EMHistory:
    """Per-cycle trajectories: prior variances σ_b² ``(n_blocks,)``, noise σ², γ_b, lengthscales,
    and the solvers' final relative residuals and converged flags."""

    prior_variance: list[torch.Tensor] = field(default_factory=list)
    lengthscale: list[torch.Tensor] = field(default_factory=list)
    noise_var: list[float] = field(default_factory=list)
    gamma: list[torch.Tensor] = field(default_factory=list)
    mode_residual: list[float] = field(default_factory=list)
    sample_residual: list[float] = field(default_factory=list)
    converged: list[bool] = field(default_factory=list)
    iterations: list[tuple[int, int]] = field(default_factory=list)  # (mode, samples) per cycle
    #: σ² step per cycle: "mackay" (r²/(n_obs − γ̂)) or "floored" (denominator at its floor)
    noise_update: list[str] = field(default_factory=list)
    #: blocks whose γ_b was not resolved from zero, per cycle (with several blocks they kept
    #: their variance)
    unresolved: list[torch.Tensor] = field(default_factory=list)
    #: the solver's :attr:`~dip_uq.laplace.solvers.Solver.refreshable` of the last cycle
    #: (cg's preconditioner, with ``refresh_preconditioner``), for reuse
    preconditioner: object = field(default=None, repr=False, compare=False)


class EMModel(Protocol):
    """What :func:`fit_em` needs from a posterior; both doors provide one.

    ``prior`` is the :class:`~dip_uq.laplace.priors.BlockPrior` EM updates in place;
    ``noise_var`` the likelihood's σ² (1.0 without one). The system a cycle's :meth:`mode`
    returns is the next cycle's (it references the prior and likelihood, so it follows their
    updates). Optional ``warm_starts()`` → (mode init, [sample init]) for a fresh start."""

    prior: object
    noise_var: float

    def system(self) -> GGNSystem:
        """The GGN at the current hyperparameters."""

    def draws(self, system: GGNSystem, n: int, generator: torch.Generator | None) -> Noise:
        """The fixed sample noise reused by every cycle."""

    def cycle_noise(self, system: GGNSystem, base: Noise) -> Noise:
        """The fixed draws expressed at this cycle's hyperparameters."""

    def precondition(self, engine: Solver, system: GGNSystem) -> Solver:
        """The cycle's solver, shared by its mode and sample solves."""

    def mode(
        self, system: GGNSystem, active: Solver, init
    ) -> tuple[SolverResult, GGNSystem, Solver]:
        """θ_lin (``.samples[0]``) with the system and solver the samples use (a softmax mode
        may move the curvature point)."""

    def noise_statistics(self, system: GGNSystem, theta_lin: torch.Tensor):
        """(‖y − ŷ_lin‖², mean y²) for the σ² step, or None when there is no σ² to learn."""

    def set_noise_var(self, value: float) -> None: ...


class InMemoryEM:
    """:class:`EMModel` of a :class:`~dip_uq.laplace.posterior.LinearisedLaplace` (Gaussian):
    fixed ξ and ε, θ_lin by one solve against the whitened targets."""

    def __init__(self, la) -> None:
        self.la, self.lik = la, la._gaussian("EM")
        self.prior = la.prior

    @property
    def noise_var(self) -> float:
        return float(self.lik.noise_var)

    def set_noise_var(self, value: float) -> None:
        self.lik.set_noise_var(value)

    def system(self) -> GGNSystem:
        return self.la.system()

    def draws(self, system, n, generator) -> Noise:
        return draw_noise(system, n, generator)

    def cycle_noise(self, system, base: Noise) -> Noise:
        return base  # ε is whitened: G carries the current σ

    def precondition(self, engine: Solver, system) -> Solver:
        return engine.precondition(system)

    def mode(self, system, active, init):
        res = get_solver(active)(system, 1, target=self.la.whitened_targets(system), init=init)
        return res, system, active

    def noise_statistics(self, system, theta_lin):
        la = self.la
        with torch.no_grad():
            r2 = float(((la.targets - la.linear_prediction(theta_lin)).double() ** 2).sum())
            power = float((la.targets.double() ** 2).mean())
        return r2, power


def fit_em(
    la,
    n_cycles: int = 10,
    n_samples: int = 256,
    solver: str | Solver = "cg",
    *,
    estimator: str = "function",
    tied_cycles: int | None = None,
    update_noise: bool = True,
    update_lengthscale: bool = True,
    noise_floor: float = 1e-6,
    generator: torch.Generator | None = None,
    solver_opts: dict | None = None,
    sample_batch: int | None = None,
    refresh_preconditioner: bool = False,
    noise_margin: float = 3.0,
    on_cycle: Callable[[dict], None] | None = None,
    resume_from: dict | None = None,
) -> EMHistory:
    """Run ``n_cycles`` of EM on ``la`` (a :class:`LinearisedLaplace` with a Gaussian
    likelihood, or any :class:`EMModel`), updating its prior variances (and noise variance,
    Matérn lengthscales) in place.

    ``solver`` is a name or a :class:`~dip_uq.laplace.solvers.Solver`, made once with
    ``solver_opts`` (:func:`~dip_uq.laplace.solvers.make_solver`: unknown options raise).
    ``tied_cycles`` defaults to ``min(2, n_cycles // 2)`` when there are several blocks.
    ``noise_floor`` is relative to mean(y²). ``sample_batch`` solves the ``n_samples``
    draws that many at a time (same draws, same result, less peak memory): only the M-step
    statistics and the warm starts are kept across batches. Every cycle shares one
    :meth:`~dip_uq.laplace.solvers.Solver.precondition` between its mode and sample solves.
    ``refresh_preconditioner`` (cg; the other solvers build as usual): build the Nyström
    preconditioner in the first cycle only and rescale it to each later cycle's
    hyperparameters with one batched kernel product
    (:func:`~dip_uq.laplace.solvers.cg.refreshed_preconditioner`): exact for a tied scale
    change, approximate when lengthscales move, which costs CG iterations but never accuracy.
    ``noise_margin``: the denominator of MacKay's σ² = r²/(n_obs − γ̂) is floored at that
    many Monte-Carlo standard errors of γ̂ (from the spread of the per-sample estimates;
    exact γ has none), so estimator noise near γ ≈ n_obs cannot blow σ² up;
    ``hist.noise_update`` records "floored" where it acted.
    ``on_cycle(state)`` is called after every cycle with what a resume needs besides the
    hyperparameters in ``la`` (cycle count, history, warm starts, the generator's state at
    the start of EM); ``resume_from=state`` (with ``la``'s hyperparameters restored by the
    caller) continues from that cycle: the same probes (the generator is rewound to its
    state at the start), the same warm starts, so the result is that of an uninterrupted
    run (cg's ``refresh_preconditioner`` rebuilds its preconditioner once).
    Returns the :class:`EMHistory`.
    """
    model = la if hasattr(la, "cycle_noise") else InMemoryEM(la)
    engine = make_solver(solver, **(solver_opts or {}))
    batch = _checked_batch(estimator, engine, n_cycles, n_samples, sample_batch)
    prior = model.prior
    if tied_cycles is None:
        tied_cycles = min(2, n_cycles // 2) if prior.selection.n_blocks > 1 else 0
    system = model.system()
    if generator is not None and (resume_from or {}).get("generator") is not None:
        generator.set_state(resume_from["generator"])  # the same probes as the first run
    gen_start = generator.get_state() if generator is not None else None
    base = model.draws(system, n_samples, generator) if estimator != "exact" else None
    hist, mode_init, sample_init, first = _resumed(resume_from, n_cycles, model)
    matern = [b for b, k in enumerate(prior.kinds) if k == "matern"]
    need_moments = bool(matern and update_lengthscale)
    sampling = dict(estimator=estimator, batch=batch, n_samples=n_samples)
    sampling.update(generator=generator, need_moments=need_moments)

    for _cycle in range(first, n_cycles):
        # one preconditioner (exact: dense factors) per cycle for the mode and sample solves;
        # its default probes are fixed-seed: the one each solve would build, same results
        if refresh_preconditioner:
            active = engine.refresh(system, hist.preconditioner)
            hist.preconditioner = active.refreshable
        else:
            active = model.precondition(engine, system)
        mode_res, system, active = model.mode(system, active, mode_init)
        theta_lin = mode_res.samples[0]
        noise = model.cycle_noise(system, base) if base is not None else None
        gamma_b, mc, sample_res, moments, sample_init = _e_step_samples(
            system, active, sample_init, noise=noise, **sampling
        )
        gamma_b, new_var, new_noise, how, unresolved = _m_step(
            model, system, theta_lin, gamma_b, mc, _cycle < tied_cycles, noise_margin
        )
        if need_moments:
            _lengthscale_mstep(prior, theta_lin, moments, matern)
        prior.set_variances(new_var.clamp_min(1e-30).to(prior.log_variance.dtype))
        if update_noise and new_noise is not None:
            model.set_noise_var(max(new_noise[0], noise_floor * max(new_noise[1], 1e-30)))
        # warm start for the next cycle (sgd: u = L⁻¹θ_lin under the new prior)
        mode_init = active.warm_start(prior, mode_res, theta_lin[None])
        _record(hist, model, gamma_b, mode_res, sample_res, how, unresolved)
        if on_cycle is not None:
            on_cycle(_snapshot(_cycle + 1, gen_start, hist, mode_init, sample_init))
    return hist


def _checked_batch(estimator, engine, n_cycles: int, n_samples: int, sample_batch) -> int:
    """Validate EM's arguments before any work; returns the sample batch size."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; use one of {ESTIMATORS}")
    if estimator == "exact" and not engine.exact_traces:
        raise ValueError("estimator='exact' needs solver='exact'")
    if n_cycles < 1:
        raise ValueError(f"n_cycles must be >= 1, got {n_cycles}")
    batch = n_samples if sample_batch is None else int(sample_batch)
    if batch < 1:
        raise ValueError(f"sample_batch must be >= 1, got {sample_batch}")
    return batch


def _snapshot(cycle: int, gen_start, hist: EMHistory, mode_init, sample_init) -> dict:
    """What ``resume_from`` needs besides the hyperparameters: the cycle count, the
    generator's state at the start of EM, the history, the warm starts and the factors of
    a preconditioner carried to the next cycle (so a resumed run refreshes the same one and
    ends bit for bit where an uninterrupted run ends)."""
    from .solvers.cg import preconditioner_state

    return {
        "cycle": cycle,
        "generator": gen_start,
        "history": {
            f.name: list(getattr(hist, f.name)) for f in fields(hist) if f.name != "preconditioner"
        },
        "mode_init": mode_init,
        "sample_init": sample_init,
        "preconditioner": preconditioner_state(hist.preconditioner),
    }


def _e_step_samples(
    system, active, inits, *, estimator, noise, batch, n_samples, generator, need_moments
):
    """E-step (b): returns (γ̂_b, the Monte-Carlo statistics of :func:`_sample_statistics`
    or None for exact γ, the combined sample result or None, the prior's tap moments of the
    draws or None, the next cycle's sample warm starts)."""
    if estimator != "exact":
        mc, sample_res, inits = _sample_statistics(
            system, active, noise, inits, batch, estimator, need_moments
        )
        return mc["gamma_b"], mc, sample_res, mc["moments"], inits
    moments = None
    if need_moments:
        # the lengthscale step needs the posterior's tap moments: exact draws from the
        # dense factors (γ stays exact; only the moments carry Monte-Carlo error)
        draws = get_solver(active)(system, n_samples, generator).samples
        moments = system.prior.second_moments(draws)
    return active.block_gamma(system), None, None, moments, inits


def _resumed(resume_from: dict | None, n_cycles: int, model):
    """(history, mode warm start, sample warm starts, first cycle) to continue from
    ``resume_from`` (a fresh start when None: the model's own warm starts, if it has any)."""
    if resume_from is None:
        mode_init, sample_init = getattr(model, "warm_starts", lambda: (None, None))()
        return EMHistory(), mode_init, sample_init, 0
    first = int(resume_from["cycle"])
    if not 0 <= first <= n_cycles:
        raise ValueError(f"resume_from is at cycle {first}, outside 0..n_cycles={n_cycles}")
    hist = EMHistory(**resume_from["history"])
    if resume_from.get("preconditioner") is not None:
        from .solvers.cg import preconditioner_from_state

        hist.preconditioner = preconditioner_from_state(resume_from["preconditioner"])
    return hist, resume_from["mode_init"], resume_from["sample_init"], first


def _m_step(model, system, theta_lin, gamma_b, mc, tied: bool, noise_margin: float):
    """MacKay's updates (:func:`~dip_uq.laplace.mstep.mackay_update`) from θ_lin and γ̂_b
    (``mc``: the Monte-Carlo statistics of :func:`_sample_statistics`, None for exact γ):
    returns (γ_b clipped per block, new σ_b² ``(n_blocks,)``, (new σ², mean y²) or None,
    "mackay" or "floored", the unresolved-block mask). Changes nothing in ``model``."""
    prior = model.prior
    sizes = prior.selection.block_sizes().to(prior.log_variance.device).double()
    g = mc["gamma"] if mc is not None else BlockGamma(gamma_b, torch.zeros_like(gamma_b))
    with torch.no_grad():
        var_old = prior.variances().double()
        q_b = var_old * prior.block_quadratic(theta_lin[None])[0].double()
        new_var, gamma, unresolved, gamma_b = mackay_update(
            var_old, q_b, g, sizes, tied=tied, n_obs=system.n_obs, margin=noise_margin
        )
        stats = model.noise_statistics(system, theta_lin)
        if stats is None:
            return gamma_b, new_var, None, "none", unresolved
        # γ̂ within its Monte-Carlo error of n_obs (a DIP that fits its data): r²/(n_obs − γ̂)
        # is a ratio of two small numbers, and a few units of error in γ̂ sent σ² up 1000x
        # on a protocol image; the denominator is floored at noise_margin standard errors
        new_noise, how = noise_update(stats[0], system.n_obs, gamma, g.total_se, noise_margin)
    return gamma_b, new_var, (new_noise, stats[1]), how, unresolved


def _record(hist: EMHistory, model, gamma_b, mode_res, sample_res, how, unresolved) -> None:
    """Append the cycle's hyperparameters and solver diagnostics to ``hist``."""
    prior = model.prior
    hist.prior_variance.append(prior.variances().detach().clone())
    hist.lengthscale.append(prior.lengthscales().detach().clone())
    hist.noise_var.append(float(model.noise_var))
    hist.gamma.append(gamma_b.detach().clone())
    hist.mode_residual.append(mode_res.residual)
    hist.sample_residual.append(sample_res.residual if sample_res is not None else 0.0)
    hist.converged.append(mode_res.converged and (sample_res is None or sample_res.converged))
    hist.noise_update.append(how)
    hist.unresolved.append(unresolved.detach().clone())
    hist.iterations.append(
        (mode_res.iterations, sample_res.iterations if sample_res is not None else 0)
    )


def _sample_statistics(system, active, noise, inits, batch, estimator, need_moments):
    """E-step (b) in batches of ``batch`` draws: returns (stats, combined result, warm starts).

    stats: ``gamma_b`` = mean_k of the per-sample block estimates (function space: block sums
    of z ⊙ GᵀG z; weight space: d_b − z_bᵀΣ_b⁻¹z_b; paired: ‖ξ_b‖² − z_bᵀΣ_b⁻¹z_b),
    ``gamma_per_sample`` those estimates ``(n, n_blocks)``, ``gamma`` the
    :class:`~dip_uq.laplace.mstep.BlockGamma` with their standard errors, ``moments`` the
    prior's tap moments of z (Matérn lengthscale step). Warm starts for the next
    cycle: ``active.warm_start`` per batch (sgd: u = L⁻¹z, cg/sdd: the dual α).
    """
    prior, solve = system.prior, get_solver(active)
    n = noise.xi.shape[0]
    mom, per_sample = None, []  # per-sample block estimates γ̂_k,b: their spread is the MC error
    residual, converged, its, next_inits = 0.0, True, 0, []
    for i, start in enumerate(range(0, n, batch)):
        sl = slice(start, min(start + batch, n))
        part = Noise(*(None if t is None else t[sl] for t in (noise.xi, noise.eps, noise.gt_eps)))
        init = inits[i] if inits is not None else None
        res = solve(system, part.xi.shape[0], noise=part, init=init)
        z = res.samples
        with torch.no_grad():
            if estimator == "function":
                per_sample.append(prior.selection.block_sum(z * system.ggn_mv(z)).double())
            else:  # γ̂_k,b = d_b (weight) or ‖ξ_k,b‖² (paired) − z_bᵀΣ_b⁻¹z_b
                qk = prior.block_quadratic(z).double()
                if estimator == "paired":
                    ref = prior.selection.block_sum(part.xi.double() ** 2)
                else:
                    ref = prior.selection.block_sizes().to(qk)
                per_sample.append(ref - qk)
            if need_moments:
                m = prior.second_moments(z)
                k = z.shape[0]
                if mom is None:
                    mom = {"diag": m["diag"] * k, "filters": [f * k for f in m["filters"]]}
                else:
                    mom["diag"] = mom["diag"] + m["diag"] * k
                    mom["filters"] = [a + f * k for a, f in zip(mom["filters"], m["filters"])]
            next_inits.append(active.warm_start(prior, res, z))
        residual, converged = max(residual, res.residual), converged and res.converged
        its = max(its, res.iterations)
        del z, res
    per = torch.cat(per_sample)  # (n, n_blocks)
    if mom is not None:
        mom = {"diag": mom["diag"] / n, "filters": [f / n for f in mom["filters"]]}
    g = BlockGamma.from_samples(per)
    stats = {"gamma_b": g.gamma, "gamma": g, "moments": mom, "gamma_per_sample": per}
    combined = SolverResult(torch.empty(0), its, [], converged, residual)
    keep = next_inits if next_inits and all(x is not None for x in next_inits) else None
    return stats, combined, keep


def _lengthscale_mstep(prior, theta_lin, m_z, blocks, steps: int = 30, lr: float = 0.05) -> None:
    """EM M-step for Matérn ℓ_b: maximise −½ E[θ_bᵀΣ_b⁻¹θ_b] − ½ log|Σ_b| with
    E[θθᵀ] ≈ θ_lin θ_linᵀ + mean_k z_k z_kᵀ (``m_z``: the prior's tap moments of the z_k),
    over log ℓ_b only (σ_b² by MacKay)."""
    mask = torch.zeros_like(prior.log_lengthscale, dtype=torch.bool)
    mask[blocks] = True
    # E[θθᵀ] enters only through per-block tap moments: a few numbers per block, not K × d
    m_lin = prior.second_moments(theta_lin.detach()[None])
    start = prior.log_lengthscale.detach().clone()
    free = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([free], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        with torch.no_grad():
            prior.log_lengthscale.copy_(torch.where(mask, free, start))
        prior.log_lengthscale.grad = None
        q = prior.quadratic_from_moments(m_lin) + prior.quadratic_from_moments(m_z)
        loss = 0.5 * q.sum() + 0.5 * prior.logdet()
        loss.backward()
        free.grad = torch.where(mask, prior.log_lengthscale.grad, torch.zeros_like(free))
        opt.step()
    with torch.no_grad():
        prior.log_lengthscale.copy_(torch.where(mask, free, start).detach())
    prior.log_lengthscale.grad = None


def maximise_evidence(la, max_iter: int = 100, fit_noise: bool = True) -> float:
    """Exact type-II maximum likelihood (small Gaussian problems): L-BFGS in float64 over the
    per-block log σ_b² (and log σ²) of the exact evidence log p(y | σ_b², σ²)
    (:func:`~dip_uq.laplace.evidence.lbfgs_maximise`); updates ``la`` in place and returns
    the maximised log evidence."""
    lik = la._gaussian("the exact evidence maximiser")
    AJ = la.dense_observation_jacobian()
    params = [la.prior.log_variance] + ([lik.log_noise_var] if fit_noise else [])
    return lbfgs_maximise(
        lambda: la.log_marginal_likelihood(AJ),
        params,
        max_iter=max_iter,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
    )

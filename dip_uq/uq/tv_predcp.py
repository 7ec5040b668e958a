"""Exact type-II hyperparameter optimisation for small problems (docs/methods.md §5).

``"mll"``: maximise the exact log evidence log N(ỹ; 0, A J Σ Jᵀ Aᵀ + σ² I) (dense, float64)
by L-BFGS over the prior log variances (one shared value when ``tied``, else one per block),
Matérn log lengthscales (per block) and the noise log σ².
``"tv-map"``: type-II MAP, the same objective plus the TV-PredCP hyperprior on every Matérn
block's lengthscale: with κ_b(ℓ_b) = E_{θ_b ~ N(0, Σ_b)} TV(x* + J_b θ_b),
−log p(ℓ_b) = λ_TV κ_b − log|∂κ_b/∂log ℓ_b|, λ_TV = scale · d_y · γ. κ_b is a Monte-Carlo
average over fixed standard-normal draws (reparameterised: θ_b = L_b ξ, so κ_b is
differentiable in log ℓ_b); the log-Jacobian term uses a second derivative (autograd with
``create_graph``). Small problems only: the dense Jacobian J is formed once.
"""

from __future__ import annotations

import torch

from ..laplace.evidence import lbfgs_maximise

__all__ = ["maximise_type2"]


def tv_predcp_penalty(la, J: torch.Tensor, lam: float, xi: torch.Tensor) -> torch.Tensor:
    """Σ_b [λ κ_b − log|∂κ_b/∂log ℓ_b|] over Matérn blocks (see module docstring).

    ``J`` is the dense Jacobian ``(n_vox, d)``, ``xi`` fixed draws ``(K, d)``; differentiable
    in the prior hyperparameters (needs ``prior.log_lengthscale.requires_grad``)."""
    from ..dip.tv import tv

    prior, sel = la.prior, la.selection
    with torch.no_grad():
        x_star = la.fmodel.output(la.inputs).double()
    shape = tuple(x_star.shape)
    total = torch.zeros((), dtype=torch.float64)
    index = sel.block_index
    for b, kind in enumerate(prior.kinds):
        if kind != "matern":
            continue
        theta = prior.sqrt_mv(xi * (index == b).to(xi.dtype))  # block-diagonal: stays in b
        imgs = x_star + (theta @ J.T).reshape(xi.shape[0], *shape)
        kappa = tv(imgs, ndim=len(shape)) / xi.shape[0]
        (dk,) = torch.autograd.grad(kappa, prior.log_lengthscale, create_graph=True)
        total = total + lam * kappa - torch.log(dk[b].abs() + 1e-30)
    return total


def maximise_type2(
    la,
    *,
    tv: dict | None = None,
    tied: bool = True,
    max_iter: int = 200,
    n_draws: int = 16,
    generator: torch.Generator | None = None,
) -> dict:
    """Exact type-II ML (``tv=None``) or TV-PredCP type-II MAP (``tv={"weight": γ,
    "scale": s}``) on ``la`` (a Gaussian :class:`LinearisedLaplace`), in place.

    Returns trajectories ``{"objective": [...], "noise_var": [...]}`` per L-BFGS evaluation.
    """
    extra = None
    if tv is not None:
        if not any(k == "matern" for k in la.prior.kinds):
            raise ValueError("hyper='tv-map' needs Matérn blocks (prior='matern')")
        with torch.no_grad():
            J = la.fmodel.dense_jacobian(la.inputs).double()
        xi = torch.randn(n_draws, la.d, generator=generator, dtype=torch.float64)
        lam = float(tv.get("scale", 1.0)) * la.targets.numel() * float(tv["weight"])

        def extra():
            return tv_predcp_penalty(la, J, lam, xi)

    lik = la._gaussian("exact type-II maximum likelihood")
    AJ = la.dense_observation_jacobian()
    prior = la.prior
    targets = [prior.log_variance, lik.log_noise_var]
    free = [
        prior.log_variance.detach()[:1].clone() if tied else prior.log_variance.detach().clone(),
        lik.log_noise_var.detach().clone(),
    ]
    if any(k == "matern" for k in prior.kinds):
        targets.append(prior.log_lengthscale)
        free.append(prior.log_lengthscale.detach().clone())
    trace: dict[str, list] = {"objective": [], "noise_var": []}

    # box for the line search's trial points (log scale): outside it Matérn factors and the
    # evidence Cholesky break down; the objective is flat there, so L-BFGS turns back
    bounds = [(-20.0, 10.0), (-30.0, 10.0), (-5.0, 3.0)]

    def objective() -> torch.Tensor:
        """log p(y | η) − penalty at η = clamp(free), loaded into ``targets`` by copy; its
        gradient reaches ``free`` straight through the clamp (summed over blocks when
        ``tied``). The final, no-grad evaluation leaves η̂ loaded and the trace alone."""
        with torch.no_grad():
            for t, f, (lo, hi) in zip(targets, free, bounds):
                t.copy_(f.clamp(lo, hi).expand_as(t))
        with torch.enable_grad():  # the TV penalty differentiates κ_b inside
            value = la.log_marginal_likelihood(AJ)
            if extra is not None:
                value = value - extra()
        if not torch.is_grad_enabled():
            return value.detach()
        grads = torch.autograd.grad(value, targets, allow_unused=True)
        trace["objective"].append(-float(value.detach()))
        trace["noise_var"].append(float(lik.noise_var.detach()))
        through = value.detach()
        for t, f, g in zip(targets, free, grads):
            g = torch.zeros_like(t) if g is None else g
            g = g.sum().reshape(1) if (f.numel() == 1 and t.numel() > 1) else g
            through = through + ((f - f.detach()) * g).sum()  # adds 0, gradient g
        return through

    flags = [p.requires_grad for p in targets]
    try:
        for t in targets:
            t.requires_grad_(True)
        lbfgs_maximise(
            objective, free, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12
        )
    finally:
        for p, f in zip(targets, flags):
            p.requires_grad_(f)
            p.grad = None
    return trace

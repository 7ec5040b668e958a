"""Exact type-II hyperparameter optimisation for small problems (methods §5).

``"mll"``: maximise the exact log evidence log N(ỹ; 0, A J Σ Jᵀ Aᵀ + σ² I) (dense, float64)
by L-BFGS over the prior log variances (one shared value when ``tied``, else one per block),
Matérn log lengthscales (per block) and the noise log σ².
The TV-PredCP hyperprior (``"tv-map"``) is not implemented yet and raises a clear error.
"""

from __future__ import annotations

import torch

__all__ = ["maximise_type2"]


def maximise_type2(la, *, tv: dict | None = None, tied: bool = True, max_iter: int = 200) -> dict:
    """Exact type-II ML on ``la`` (a Gaussian :class:`LinearisedLaplace`), in place.

    Returns trajectories ``{"objective": [...], "noise_var": [...]}`` per L-BFGS evaluation.
    """
    if tv is not None:
        raise NotImplementedError(
            "hyper='tv-map' (TV-PredCP hyperprior) is not implemented yet; use 'em' or 'mll'"
        )
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
    free = [f.requires_grad_(True) for f in free]
    flags = [p.requires_grad for p in targets]
    opt = torch.optim.LBFGS(
        free,
        lr=1.0,
        max_iter=max_iter,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
    )
    trace: dict[str, list] = {"objective": [], "noise_var": []}

    def load() -> None:
        with torch.no_grad():
            for t, f in zip(targets, free):
                t.copy_(f.expand_as(t))

    def closure():
        for f in free:
            f.grad = None
        load()
        for t in targets:
            t.requires_grad_(True)
            t.grad = None
        loss = -la.log_marginal_likelihood(AJ)
        loss.backward()
        for t, f in zip(targets, free):
            g = t.grad if t.grad is not None else torch.zeros_like(t)
            f.grad = g.sum().reshape(1) if (f.numel() == 1 and t.numel() > 1) else g.clone()
        trace["objective"].append(float(loss.detach()))
        trace["noise_var"].append(float(lik.noise_var))
        return loss.detach()

    try:
        opt.step(closure)
        load()
    finally:
        for p, f in zip(targets, flags):
            p.requires_grad_(f)
            p.grad = None
    return trace

"""Dense type-II maximum likelihood: L-BFGS on an exact log evidence (docs/methods.md §3).

For a model small enough to form the evidence densely, e.g. the linear-Gaussian one
log p(y | η) = log N(ỹ; 0, A J Σ(η) Jᵀ Aᵀ + σ² I), the hyperparameters are
η̂ = argmax_η log p(y | η) over unconstrained log-hyperparameters η = (log σ_b², log σ², …),
which keeps every variance positive. This is the reference that EM's fixed points are
checked against; :func:`lbfgs_maximise` is the one loop its callers share.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["lbfgs_maximise"]


def lbfgs_maximise(
    objective: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    *,
    max_iter: int = 100,
    tolerance_grad: float = 1e-7,
    tolerance_change: float = 1e-9,
) -> float:
    """Maximise ``objective()`` (a scalar tensor, differentiable in ``params``) in place.

    One ``torch.optim.LBFGS`` step (lr 1, strong-Wolfe line search, up to ``max_iter``
    iterations) on −F(η) with F = ``objective``; ``params`` are leaf tensors that F reads
    (e.g. ``[prior.log_variance, log_s2]`` with F = ``lambda: la._exact_evidence(log_s2,
    θ_fixed)``). ``tolerance_grad`` bounds max|∂F/∂η| and ``tolerance_change`` the change in
    F or η for termination (torch's defaults here). Each param's ``requires_grad`` is switched
    on for the search and restored afterwards, and its ``.grad`` cleared, also when
    ``objective`` raises.

    Returns F(η̂) as a float, evaluated once more at the final η̂ under ``torch.no_grad``.
    """
    params = list(params)
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.LBFGS(
            params,
            lr=1.0,
            max_iter=max_iter,
            line_search_fn="strong_wolfe",
            tolerance_grad=tolerance_grad,
            tolerance_change=tolerance_change,
        )

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = -objective()
            loss.backward()
            return loss.detach()

        opt.step(closure)
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
            p.grad = None
    with torch.no_grad():
        return float(objective())

"""Low-rank preconditioner for the primal system (Ĝᵀ Ĝ + I) u = b (sample-then-optimise).

The DIP's whitened Jacobian spreads the curvature of ĜᵀĜ over five or more decades, and the
stable SGD step 1/λ_max leaves its middle directions untouched for thousands of steps. The
large eigenvalues live in a subspace of dimension ≤ n_obs that randomised subspace iteration
finds in observation space:

1. Y = ĜĜᵀ Ω (Ω Gaussian ``(n_obs, s)``, s = rank + oversample), Q = orth(Y);
2. Rayleigh–Ritz: QᵀĜĜᵀQ = S Θ Sᵀ, Ritz vectors Ũ = Q S, values Θ (descending, ≥ 0).

Because ŨᵀĜĜᵀŨ = Θ *exactly* (not only approximately, as for a Nyström factor), the primal
directions V = Ĝᵀ Ũ Θ^{-½} are orthonormal, and

    P⁻¹ = I − V diag(c) Vᵀ = I − Ĝᵀ Ũ diag(c / Θ) Ũᵀ Ĝ,   c_i = 1 − (1 + m)/(1 + Θ_i),

with m the first Ritz value left out, is symmetric positive definite by construction
(eigenvalues (1 + m)/(1 + Θ_i) ∈ (0, 1] on V, 1 elsewhere) whatever the accuracy of the
subspace: preconditioning never changes the fixed point, so the samples stay exact draws of
N(0, H⁻¹) at convergence. P⁻¹(ĜᵀĜ + I) has eigenvalues near 1 + m on V (not 1: the top
directions are where a start at the prior draw ξ is most wrong, and the step 1/λ_max must
clear them in a few steps, as in Frangella et al.'s scaling of Nyström preconditioners) and
1 + μ ≤ 1 + m elsewhere.

``apply`` is matrix-free (one JVP and one VJP per product, memory of a K-sample batch) or,
with ``store=True``, keeps V ``(d, r)`` (one VJP pass to build, then a d×r matmul).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .cg import PRECOND_SEED as _SEED
from .cg import _chunked, _probe_setup  # shared with cg's Nyström build
from .system import LinearSystem

__all__ = ["LowRankPreconditioner", "lowrank_preconditioner", "preconditioned_lambda_max"]


class LowRankPreconditioner:
    """P⁻¹ for (ĜᵀĜ + I) from Ritz pairs (Ũ ``(n_obs, r)``, Θ ``(r,)``) of ĜĜᵀ.

    It is tied to the system's hyperparameters at build time (the matrix-free product uses
    the current Ĝ): rebuild it when they change.
    ``apply(v)`` maps ``(K, d)`` to ``(K, d)``; ``ritz_values`` (float64, descending) are
    lower bounds of the top eigenvalues of ĜᵀĜ; ``missed`` is the largest Ritz value left
    out (an estimate of the first eigenvalue the preconditioner does not cover).
    """

    def __init__(
        self,
        system: LinearSystem,
        U: torch.Tensor,
        theta: torch.Tensor,
        missed: float,
        store: bool,
        chunk_size: int | None,
    ) -> None:
        self.system = system
        self.ritz_values = theta
        self.missed = missed
        self.rank = int(theta.numel())
        self._lam_max: float | None = None
        self._U = U.to(system.dtype)
        c = (1.0 - (1.0 + missed) / (1.0 + theta)).clamp_min(0.0)  # on V
        self._coef = (c / theta).to(system.dtype)  # on Ũᵀ Ĝ v
        self._V = None
        if store and self.rank > 0:
            # V = Ĝᵀ Ũ Θ^{-½}, built a chunk of columns at a time; V ``(r, d)``
            V = _chunked(system.Ghat_t, self._U.T.contiguous(), chunk_size)
            self._V = V * theta.rsqrt().to(system.dtype)[:, None]
            self._vcoef = c.to(system.dtype)

    def lambda_max(self, generator: torch.Generator | None = None) -> float:
        """λ_max(P⁻¹(ĜᵀĜ + I)) by :func:`preconditioned_lambda_max`, computed once."""
        if self._lam_max is None:
            self._lam_max = preconditioned_lambda_max(self.system, self.apply, generator=generator)
        return self._lam_max

    @torch.no_grad()
    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """P⁻¹ v for ``v`` ``(K, d)``."""
        if self.rank == 0:
            return v
        if self._V is not None:
            return v - ((v @ self._V.T) * self._vcoef) @ self._V
        w = self.system.Ghat(v) @ self._U  # (K, r) = Ũᵀ Ĝ v
        return v - self.system.Ghat_t((w * self._coef) @ self._U.T)

    @torch.no_grad()
    def apply_(self, v: torch.Tensor) -> torch.Tensor:
        """P⁻¹ v computed in place in ``v`` (returns ``v``)."""
        if self.rank == 0:
            return v
        if self._V is not None:
            return v.sub_(((v @ self._V.T) * self._vcoef) @ self._V)
        w = self.system.Ghat(v) @ self._U
        return v.sub_(self.system.Ghat_t((w * self._coef) @ self._U.T))

    __call__ = apply

    def __repr__(self) -> str:
        top = float(self.ritz_values[0]) if self.rank else 0.0
        return (
            f"LowRankPreconditioner(rank={self.rank}, top={top:.3g}, "
            f"missed={self.missed:.3g}, stored={self._V is not None})"
        )


def lowrank_preconditioner(
    system: LinearSystem,
    rank: int = 200,
    oversample: int = 10,
    generator: torch.Generator | None = None,
    *,
    chunk_size: int | None = 32,
    store: bool = False,
) -> LowRankPreconditioner:
    """Randomised subspace iteration (one power step) + Rayleigh–Ritz on ĜĜᵀ; see the module.

    Costs 2·s kernel products ĜĜᵀq (s = min(rank + oversample, n_obs)), applied
    ``chunk_size`` probes at a time. Without a ``generator`` the probes come from a
    fixed-seed generator, so the preconditioner is deterministic. Ritz values below
    1e-12·Θ_max are dropped (directions ĜĜᵀ does not see).
    """
    generator, s = _probe_setup(system, rank, oversample, generator, chunk_size)

    def kernel(a: torch.Tensor) -> torch.Tensor:  # rows of a ``(s, n_obs)``, float64 out
        return system.gram_mv(a.to(system.dtype)).double()

    with torch.no_grad():
        omega = torch.randn(
            system.n_obs, s, generator=generator, dtype=torch.float64, device=system.device
        )
        Y = _chunked(kernel, omega.T, chunk_size).T
        if not bool(torch.isfinite(Y).all()):
            raise ValueError(
                "sgd preconditioner: the kernel product ĜĜᵀΩ has NaN or inf entries "
                "(non-finite Jacobian products or hyperparameters)"
            )
        Q, _ = torch.linalg.qr(Y)
        Z = _chunked(kernel, Q.T, chunk_size).T
        # Rayleigh–Ritz in float64; ŨᵀĜĜᵀŨ = Θ holds to the kernel's own round-off
        T = Q.T @ Z
        theta, S = torch.linalg.eigh(0.5 * (T + T.T))
        theta, S = theta.flip(0), S.flip(1)
        keep = theta > 1e-12 * float(theta.abs().max().clamp_min(1e-300))
        theta, S = theta[keep], S[:, keep]
        missed = float(theta[rank]) if theta.numel() > rank else 0.0
        theta, S = theta[:rank], S[:, :rank]
        U = Q @ S
    return LowRankPreconditioner(system, U, theta, missed, store, chunk_size)


def preconditioned_lambda_max(
    system: LinearSystem,
    precond: Callable[[torch.Tensor], torch.Tensor],
    iterations: int = 20,
    generator: torch.Generator | None = None,
) -> float:
    """Power-iteration estimate of λ_max(P⁻¹(ĜᵀĜ + I)) (padded by 5%).

    P⁻¹(ĜᵀĜ + I) is similar to the SPD P^{-½}(ĜᵀĜ + I)P^{-½}, so its eigenvalues are real
    and positive and the growth ‖P⁻¹(ĜᵀĜ + I)v‖/‖v‖ of the iterate converges to λ_max.
    The start vector comes from ``generator`` (a fixed-seed one when None).
    """
    if generator is None:  # deterministic by default, like the probes
        generator = torch.Generator(device=system.device).manual_seed(_SEED)
    v = torch.randn(1, system.d, generator=generator, dtype=system.dtype, device=system.device)
    lam = 1.0
    with torch.no_grad():
        for _ in range(iterations):
            v = v / v.norm()
            w = precond(system.primal_mv(v))
            lam = float(w.norm())
            v = w
    return 1.05 * max(lam, 1.0)

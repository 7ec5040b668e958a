"""Observation-space Matheron samples with batched preconditioned CG (methods §2.2).

z = Lξ + ΣGᵀα with (GΣGᵀ + I) α = ε − GLξ (whitened, unit noise). The preconditioner is a
randomised Nyström approximation U Λ Uᵀ of GΣGᵀ (rank r + oversampling), inverted by
Woodbury: P⁻¹ v = v + U((Λ + 1)⁻¹ − 1)Uᵀ v.
"""

from __future__ import annotations

import torch

from .system import LinearSystem, Noise, SolverResult, draw_noise

__all__ = ["sample_cg", "nystrom_preconditioner"]


def nystrom_preconditioner(
    system: LinearSystem, rank: int = 200, oversample: int = 10, generator=None
):
    """Randomised Nyström eigendecomposition of GΣGᵀ; returns ``v -> P⁻¹ v`` on ``(K, n_obs)``."""
    s = min(rank + oversample, system.n_obs)
    with torch.no_grad():
        omega = torch.randn(
            system.n_obs, s, generator=generator, dtype=torch.float64, device=system.device
        )
        Q, _ = torch.linalg.qr(omega)
        Y = (system.kernel_mv(Q.T.to(system.dtype)).double() - Q.T).T  # (GΣGᵀ) Q, (n_obs, s)
        nu = torch.finfo(system.dtype).eps * float(Y.norm())
        Yn = Y + nu * Q
        C = torch.linalg.cholesky(0.5 * (Q.T @ Yn + Yn.T @ Q))
        B = torch.linalg.solve_triangular(C, Yn.T, upper=False).T
        U, S, _ = torch.linalg.svd(B, full_matrices=False)
        lam = (S**2 - nu).clamp_min(0.0)[:rank]
        U = U[:, :rank]
        coef = (1.0 / (lam + 1.0) - 1.0).to(system.dtype)
        U = U.to(system.dtype)

    def apply(v: torch.Tensor) -> torch.Tensor:
        return v + ((v @ U) * coef) @ U.T

    return apply, lam


def batched_pcg(matvec, c, precond, x0=None, tol=1e-6, max_iter=500):
    """Solve A x = c for each row of ``c`` ``(K, n)``; returns x, iterations, residual trace."""
    x = torch.zeros_like(c) if x0 is None else x0.clone()
    cnorm = c.norm(dim=1).clamp_min(1e-30)
    r = c - matvec(x) if x0 is not None else c.clone()
    z = precond(r)
    p = z.clone()
    rz = (r * z).sum(1)
    trace = [float((r.norm(dim=1) / cnorm).max())]
    it = 0
    for it in range(1, max_iter + 1):
        if trace[-1] < tol:
            it -= 1
            break
        Ap = matvec(p)
        pAp = (p * Ap).sum(1)
        active = (r.norm(dim=1) / cnorm) >= tol
        alpha = torch.where(active, rz / pAp.clamp_min(1e-300), torch.zeros_like(rz))
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * Ap
        trace.append(float((r.norm(dim=1) / cnorm).max()))
        z = precond(r)
        rz_new = (r * z).sum(1)
        beta = torch.where(active, rz_new / rz.clamp_min(1e-300), torch.zeros_like(rz))
        p = z + beta[:, None] * p
        rz = rz_new
    return x, it, trace


def sample_cg(
    system: LinearSystem,
    n: int = 1,
    generator: torch.Generator | None = None,
    *,
    target: torch.Tensor | None = None,
    noise: Noise | None = None,
    init: torch.Tensor | None = None,
    tol: float = 1e-6,
    max_iter: int = 500,
    precond_rank: int = 200,
    oversample: int = 10,
) -> SolverResult:
    """Matheron samples (or the mean ΣGᵀ(GΣGᵀ + I)⁻¹r) by preconditioned CG.

    ``precond_rank = 0`` disables the preconditioner. ``init`` warm-starts α ``(K, n_obs)``.
    """
    if target is None:
        noise = noise or draw_noise(system, n, generator)
    with torch.no_grad():
        c, theta_p = system.dual_rhs(noise, target)
        if precond_rank > 0:
            precond, _ = nystrom_preconditioner(system, precond_rank, oversample, generator)
        else:
            precond = lambda v: v  # noqa: E731
        alpha, it, trace = batched_pcg(system.kernel_mv, c, precond, init, tol, max_iter)
        theta = theta_p + system.prior.cov_mv(system.Gt(alpha))
    return SolverResult(theta, it, trace, trace[-1] < tol, trace[-1], {"alpha": alpha})

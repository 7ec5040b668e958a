"""Exact dense references (docs/methods.md §2.4): float64, Cholesky with jitter escalation.

Primal when d ≤ n_obs (factor Ĝᵀ Ĝ + I, size d), dual otherwise (factor Ĝ Ĝᵀ + I, size
n_obs). Both are ≥ I, so jitter is only a guard against round-off in huge problems.
"""

from __future__ import annotations

import torch

from .system import GGNSystem, LinearSystem, Noise, SolverResult, draw_noise

__all__ = [
    "robust_cholesky",
    "sample_exact",
    "dense_factors",
    "functional_covariance",
    "exact_block_gamma",
]


def robust_cholesky(a: torch.Tensor, max_tries: int = 8) -> tuple[torch.Tensor, float]:
    """Cholesky of symmetric ``a``; adds jitter 1e-10·mean(diag)·10^k until it succeeds."""
    jitter = 0.0
    base = float(a.detach().diagonal().abs().mean()) or 1.0
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    for k in range(max_tries):
        L, info = torch.linalg.cholesky_ex(a + jitter * eye)
        if int(info) == 0:
            return L, jitter
        jitter = base * 1e-10 * 10**k
    raise torch.linalg.LinAlgError(
        f"Cholesky failed even with jitter {jitter:.3g}: matrix not positive definite"
    )


def dense_factors(system: GGNSystem, mode: str = "auto") -> dict:
    """Dense Ĝ = G L ``(n_obs, d)`` and the Cholesky of the smaller Gram matrix (float64).

    A streamed source has no dense G: its factors are primal, from the dense GGN M
    (P = Lᵀ M L + I; ``"G"`` and ``"Ghat"`` are None)."""
    if system.streaming:
        if mode == "dual":
            raise ValueError("exact mode 'dual' needs the data in memory; use 'primal'")
        with torch.no_grad():
            ML = system.prior.sqrt_t_mv(system.dense_ggn())  # rows of M L (M symmetric)
            gram = system.prior.sqrt_t_mv(ML.T.contiguous())
            gram = 0.5 * (gram + gram.T) + torch.eye(system.d, dtype=gram.dtype, device=gram.device)
        chol, jitter = robust_cholesky(gram)
        return {"G": None, "Ghat": None, "chol": chol, "mode": "primal", "jitter": jitter}
    with torch.no_grad():
        G = system.dense_G()
        Gh = system.prior.sqrt_t_mv(G)  # rows gᵢᵀ L
    if mode == "auto":
        mode = "primal" if system.d <= system.n_obs else "dual"
    if mode == "primal":
        gram = Gh.T @ Gh + torch.eye(system.d, dtype=Gh.dtype, device=Gh.device)
    elif mode == "dual":
        gram = Gh @ Gh.T + torch.eye(system.n_obs, dtype=Gh.dtype, device=Gh.device)
    else:
        raise ValueError(f"exact mode must be 'auto', 'primal' or 'dual', got {mode!r}")
    chol, jitter = robust_cholesky(gram)
    return {"G": G, "Ghat": Gh, "chol": chol, "mode": mode, "jitter": jitter}


def sample_exact(
    system: LinearSystem,
    n: int = 1,
    generator: torch.Generator | None = None,
    *,
    target: torch.Tensor | None = None,
    noise: Noise | None = None,
    mode: str = "auto",
    factors: dict | None = None,
    init: torch.Tensor | None = None,
) -> SolverResult:
    """``init`` is accepted for interface symmetry and ignored. Exact samples z = L u, u = (ĜᵀĜ + I)⁻¹(ξ + Ĝᵀε) ~ N(0, H⁻¹), or the mean H⁻¹Gᵀr."""
    f = factors or dense_factors(system, mode)
    Gh, C = f["Ghat"], f["chol"]
    if target is not None:
        xi, eps = None, system._target(target).double()
    else:
        noise = noise or draw_noise(system, n, generator)
        if noise.eps is None:  # a streamed source: b = ξ + Lᵀ Gᵀε, primal factors
            b = system.primal_b(noise).double()
            u = torch.cholesky_solve(b.T, C).T
            with torch.no_grad():
                z = system.prior.sqrt_mv(u)
            info = {"mode": "primal", "jitter": f["jitter"], "factors": f}
            return SolverResult(z.to(system.dtype), 0, [], True, 0.0, info)
        xi, eps = noise.xi.double(), noise.eps.double()
    if f["mode"] == "primal":
        b = eps @ Gh if xi is None else xi + eps @ Gh
        u = torch.cholesky_solve(b.T, C).T
    else:
        c = eps if xi is None else eps - xi @ Gh.T
        u = torch.cholesky_solve(c.T, C).T @ Gh
        if xi is not None:
            u = u + xi
    with torch.no_grad():
        z = system.prior.sqrt_mv(u)
    info = {"mode": f["mode"], "jitter": f["jitter"], "factors": f}
    return SolverResult(
        z.to(system.dtype), iterations=0, trace=[], converged=True, residual=0.0, state=info
    )


def functional_covariance(
    system: LinearSystem, Jx: torch.Tensor, factors: dict | None = None
) -> torch.Tensor:
    """Exact posterior covariance of J_x θ for a dense ``Jx`` ``(m, d)``: J_x H⁻¹ J_xᵀ (float64)."""
    f = factors or dense_factors(system)
    Gh, C = f["Ghat"], f["chol"]
    with torch.no_grad():
        JL = system.prior.sqrt_t_mv(Jx.double())  # rows J_x L
    if f["mode"] == "primal":
        return JL @ torch.cholesky_solve(JL.T, C)
    cross = JL @ Gh.T  # J_x Σ Gᵀ
    return JL @ JL.T - cross @ torch.cholesky_solve(cross.T, C)


def exact_block_gamma(system: LinearSystem, factors: dict | None = None) -> torch.Tensor:
    """Exact effective dimension per block, γ_b = Σ_{i∈b} (H⁻¹ M)_ii ``(n_blocks,)`` (float64).

    Uses H⁻¹Gᵀ = L(ĜᵀĜ + I)⁻¹Ĝᵀ = LĜᵀ(ĜĜᵀ + I)⁻¹, so only ``(n_obs, d)`` arrays are formed.
    """
    f = factors or dense_factors(system)
    Gh, C, G = f["Ghat"], f["chol"], f["G"]
    if G is None:  # streamed: γ_b = Σ_{i∈b} (1 − (P⁻¹)_ii), L block-diagonal
        return system.prior.selection.block_sum((1.0 - torch.cholesky_inverse(C).diagonal())[None])[
            0
        ]
    with torch.no_grad():
        if f["mode"] == "primal":
            rows = torch.cholesky_solve(Gh.T, C).T
        else:
            rows = torch.cholesky_solve(Gh, C)
        GHinv = system.prior.sqrt_mv(rows)  # (n_obs, d) = G H⁻¹
        diag = (GHinv * G).sum(0)
    return system.prior.selection.block_sum(diag)

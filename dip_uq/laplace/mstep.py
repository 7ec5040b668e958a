"""The M-step of sample-based EM (docs/methods.md §3), shared by every door.

Given the E-step's statistics at the current hyperparameters (the linear model's mode θ_lin
and, per prior block b, the effective dimension γ_b with its Monte-Carlo standard error),
MacKay's updates are

    σ_b² = q_b / γ_b,   q_b = θ_lin,bᵀ R_b⁻¹ θ_lin,b   (Σ_b = σ_b² R_b),
    σ²   = r² / (n_obs − γ),  γ = Σ_b γ_b.

A block whose γ_b is not resolved (within ``margin`` standard errors of zero) keeps its
variance for the cycle: q_b/γ_b is then a ratio of noise and has sent variances to 1e±30.
The paired estimator of γ_b (:func:`paired_block_gamma`) makes most blocks resolved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "BlockGamma",
    "exact_gamma_from_precision",
    "mackay_update",
    "noise_update",
    "paired_block_gamma",
]


@dataclass
class BlockGamma:
    """γ_b per block ``(n_blocks,)``, the Monte-Carlo standard error of each and of their sum
    (zeros when exact)."""

    gamma: torch.Tensor
    se: torch.Tensor
    total_se: float = 0.0

    @classmethod
    def from_samples(cls, per: torch.Tensor) -> BlockGamma:
        """From per-sample block estimates ``(K, n_blocks)`` (their spread is the error)."""
        k = per.shape[0]
        if k < 2:
            inf = torch.full_like(per[0], float("inf"))
            return cls(per.mean(0), inf, float("inf"))
        return cls(per.mean(0), per.std(0) / k**0.5, float(per.sum(1).std() / k**0.5))


def paired_block_gamma(xi: torch.Tensor, u: torch.Tensor, block_sum) -> BlockGamma:
    """γ_b from K posterior samples paired with the prior draws that made them.

    With prior-whitened coordinates θ = L u (L block-diagonal), a sample
    u = P⁻¹(ξ + Ĝᵀε), P = I + ĜᵀĜ, and its prior draw ξ ~ N(0, I):
    γ_b = d_b − tr(P⁻¹)_bb = E[‖ξ_b‖² − ‖u_b‖²]. Pairing each u with its own ξ cancels the
    prior directions the data do not touch (there u ≈ ξ), so the per-block variance is far
    below that of the function-space estimate z_bᵀ(Mz)_b, whose cross-block terms dominate
    small blocks. ``xi``, ``u``: ``(K, d)``; ``block_sum``: ``(K, d) -> (K, n_blocks)``.
    """
    return BlockGamma.from_samples(block_sum((xi.double() ** 2) - (u.double() ** 2)))


def exact_gamma_from_precision(chol_P: torch.Tensor, block_sum) -> BlockGamma:
    """Exact γ_b = d_b − tr(P⁻¹)_bb from the Cholesky factor of the whitened precision
    P = I + ĜᵀĜ ``(d, d)`` (dense references)."""
    diag = torch.cholesky_inverse(chol_P).diagonal()
    gamma = block_sum((1.0 - diag)[None].double())[0]
    return BlockGamma(gamma, torch.zeros_like(gamma))


def mackay_update(
    var_old: torch.Tensor,
    q: torch.Tensor,
    g: BlockGamma,
    sizes: torch.Tensor,
    *,
    tied: bool,
    n_obs: int,
    margin: float = 3.0,
) -> tuple[torch.Tensor, float, torch.Tensor, torch.Tensor]:
    """New block variances, the total γ, the mask of unresolved blocks and the γ_b used.

    ``var_old``, ``q``, ``sizes``: ``(n_blocks,)``. The total γ is clipped to
    [1, min(d, n_obs − 1)] after summing: clipping each block at 0 first would turn the
    estimator's zero-mean noise in poorly determined blocks into a positive bias, and
    γ ≤ rank M ≤ n_obs keeps σ² = r²/(n_obs − γ) finite when unconverged samples overshoot.
    Each γ_b is clipped to [10⁻⁶, d_b] for its own update. ``tied``: one variance
    Σ q_b / γ for all blocks (always so for a single block). With several blocks, a block
    is unresolved when γ_b ≤ ``margin`` standard errors (exact γ: when γ_b ≤ 0) and keeps
    its variance.
    """
    d = float(sizes.sum())
    gamma = float(g.gamma.sum().clamp(1.0, float(max(1, min(d, n_obs - 1)))))
    unresolved = g.gamma <= margin * g.se if bool((g.se > 0).any()) else g.gamma <= 0
    gb = torch.minimum(g.gamma.clamp_min(1e-6), sizes)
    if tied or var_old.numel() == 1:
        # one block has no other block to lean on: holding its variance when γ̂ is not
        # resolved from zero froze EM at its starting prior on some seeds; the total γ,
        # clipped at 1, bounds the step instead
        new = (q.sum() / gamma).expand_as(var_old)
    else:
        new = torch.where(unresolved, var_old, q / gb)
    return new, gamma, unresolved, gb


def noise_update(r2: float, n_obs: int, gamma: float, gamma_se: float, margin: float = 3.0):
    """σ² = r²/(n_obs − γ) with the denominator floored at ``margin`` standard errors of γ
    (and at 1): when the model fits its data, γ ≈ n_obs and the ratio is noise over noise.
    Returns (σ², "mackay" or "floored")."""
    denom = max(n_obs - gamma, margin * gamma_se, 1.0)
    return r2 / denom, ("mackay" if denom == max(n_obs - gamma, 1.0) else "floored")

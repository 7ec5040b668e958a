"""The image-space term of the predictive: the voxelwise variance that the measurement noise
leaves in a data-regularised least-squares reconstruction (``docs/methods.md`` §6.2).

    δ_i = Var[(R ε)_i],   R = (AᵀA + α I)⁻¹ Aᵀ,   ε ~ N(0, σ² I)
        = σ² Σ_j V_ij² s_j² / (s_j² + α)²          (A = U diag(s) Vᵀ)

``α`` is chosen from the data by the discrepancy principle (the Tikhonov reconstruction of
``y`` leaves the misfit the noise predicts, :func:`operators.iterative.discrepancy_tikhonov`):
the smooth counterpart of the truncated SVD at the discrepancy rank. Matrix-free: ``K``
reconstructions of pure noise ``u_k = R ε_k`` (batched CG on the normal equations) give the
unbiased estimate ``δ̂_i = mean_k u_{k,i}²``, whose relative error per voxel is
``sqrt(2/K)``; the same ``u_k`` projected by a held-out operator give that term's variance
at the held-out measurements. Works unchanged in 3D.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from operators.iterative import cg_normal, discrepancy_tikhonov

__all__ = ["NoiseTerm", "image_noise_term"]


@dataclass
class NoiseTerm:
    """The image-space term and how it was computed.

    Attributes:
        variance: δ̂ per voxel, the volume's shape.
        alpha: the Tikhonov weight (discrepancy principle).
        noise_var: σ² used.
        n_probes: K, the number of noise reconstructions averaged.
        heldout_variance: Var[(A_h u)_j] per held-out measurement ``(n_h,)`` (flattened held-out
            sinogram order), when a held-out operator was given.
        converged: every CG solve reached its tolerance (whether the discrepancy crossing
            was bracketed is ``diagnostics["discrepancy_bracketed"]``).
        diagnostics: CG iterations and residuals, the discrepancy misfit and target.
    """

    variance: torch.Tensor
    alpha: float
    noise_var: float
    n_probes: int
    heldout_variance: torch.Tensor | None = None
    converged: bool = True
    diagnostics: dict[str, Any] = field(default_factory=dict)


def image_noise_term(
    y: torch.Tensor,
    op: Any,
    noise_var: float,
    *,
    n_probes: int = 64,
    batch: int = 16,
    heldout_op: Any = None,
    alpha: float | None = None,
    tol: float = 1e-3,
    max_iter: int = 1000,
    generator: torch.Generator | None = None,
) -> NoiseTerm:
    """δ̂ for the measurements ``y`` ``(*op.range_shape)`` of ``op`` with noise variance
    ``noise_var`` = σ² (sinogram units²).

    ``alpha`` skips the discrepancy search. ``n_probes`` noise reconstructions are solved
    ``batch`` at a time (memory ∝ ``batch`` × 4 volumes). ``heldout_op``: an operator on the
    same volume whose measurements were left out of the fit; its variance of ``A_h u`` is
    returned for calibration. ``generator`` draws the noise.
    """
    if int(n_probes) < 2:
        raise ValueError(f"n_probes must be >= 2 (a variance from one draw), got {n_probes}")
    if int(batch) < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if not (math.isfinite(noise_var) and noise_var > 0):
        raise ValueError(f"noise_var must be positive and finite, got {noise_var}")
    y = torch.as_tensor(y)
    diag: dict[str, Any] = {}
    if alpha is None:
        disc = discrepancy_tikhonov(
            y, op, noise_var, tol=tol, max_iter=max_iter, generator=generator
        )
        alpha = disc.alpha
        diag.update(
            discrepancy_misfit=disc.misfit,
            discrepancy_target=disc.target,
            discrepancy_bracketed=disc.bracketed,
            discrepancy_iterations=disc.info.iterations if disc.info else None,
            discrepancy_refine_iterations=disc.refine.iterations if disc.refine else None,
        )
    elif not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be positive and finite, got {alpha}")
    sd = math.sqrt(noise_var)
    acc = torch.zeros(tuple(op.domain_shape), dtype=torch.float64, device=y.device)
    acc_h = None
    worst, iters, done = 0.0, [], 0
    with torch.no_grad():
        while done < n_probes:
            k = min(int(batch), int(n_probes) - done)
            eps = sd * torch.randn(
                (k, *op.range_shape), generator=generator, dtype=y.dtype, device=y.device
            )
            u, info = cg_normal(op, op.T(eps), alpha=alpha, tol=tol, max_iter=max_iter)
            acc += u.double().pow(2).sum(0)
            if heldout_op is not None:
                uh = heldout_op(u).reshape(k, -1).double().pow(2).sum(0)
                acc_h = uh if acc_h is None else acc_h + uh
            worst = max(worst, max(info.residual))
            iters.append(info.iterations)
            done += k
    converged = worst <= tol
    diag.update(cg_iterations=iters, cg_residual=worst)
    return NoiseTerm(
        variance=(acc / n_probes).to(y.dtype),
        alpha=float(alpha),
        noise_var=float(noise_var),
        n_probes=int(n_probes),
        heldout_variance=None if acc_h is None else (acc_h / n_probes),
        converged=converged,
        diagnostics=diag,
    )

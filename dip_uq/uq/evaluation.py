"""Evaluating a CT uncertainty map against a ground truth, and the dense truncated-SVD
references of docs/methods.md §6 (small images).

:func:`evaluate_uq` gives every metric of docs/methods.md §6.4 for a
:class:`~dip_uq.uq.result.UQResult`; :func:`discrepancy_rank` and
:func:`backprojected_noise_delta` assemble the operator densely.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import require_finite
from ..metrics import (
    _same_shape,
    _t,
    ause,
    calibration_curve,
    coverage,
    exact_test_log_likelihood,
    gaussian_nll,
    patch_log_likelihood,
    psnr,
    rmse,
    ssim,
    std_error_correlation,
    zscore_stats,
)

__all__ = ["evaluate_uq", "discrepancy_rank", "backprojected_noise_delta"]


def _dense_svd(operator) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors ``U`` ``(n_obs, r)`` and singular values ``s`` (descending) of
    the operator assembled densely in float64 (small images only)."""
    shape = tuple(operator.domain_shape)
    n = math.prod(shape)
    if n > 20000:
        raise ValueError(
            f"the backprojected-noise delta assembles A densely: {n} voxels is too many"
        )
    eye = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    with torch.no_grad():
        A = operator(eye).reshape(n, -1).T.double()  # (n_obs, n_vox)
    U, s, _ = torch.linalg.svd(A, full_matrices=False)
    return U, s


def discrepancy_rank(y, operator, noise_var: float, *, tau: float = 1.0) -> int:
    """Rank of the truncated-SVD reconstruction chosen by Morozov's discrepancy principle: the
    smallest ``k`` with ``‖y − A x_k‖² ≤ τ² n_obs σ²``, ``x_k`` the least-squares solution on
    the top ``k`` singular directions (``‖y − A x_k‖² = ‖y‖² − Σ_{j≤k} (u_jᵀ y)²``).

    These are the directions the data determine above the noise level: the subspace on which
    the backprojected-noise correction δ is computed (docs/methods.md §6.4). ``y`` has the operator's
    range shape; ``noise_var`` is σ_y² (the true one in benchmarks with a ground truth).
    Returns the numerical rank when even that leaves a larger residual.
    """
    y = _t(y).double()
    if tuple(y.shape) != tuple(operator.range_shape):
        raise ValueError(
            f"y must have the operator's range shape {tuple(operator.range_shape)}, "
            f"got {tuple(y.shape)}"
        )
    if not (math.isfinite(noise_var) and noise_var > 0):
        raise ValueError(f"noise_var must be positive and finite, got {noise_var}")
    U, s = _dense_svd(operator)
    r = int((s > s[0] * max(s.shape) * torch.finfo(torch.float64).eps).sum())
    c = U[:, :r].T @ y.reshape(-1)
    resid = float(y.pow(2).sum()) - torch.cumsum(c**2, 0)  # residual after k = 1..r
    below = torch.nonzero(resid <= tau**2 * y.numel() * noise_var).flatten()
    return int(below[0]) + 1 if below.numel() else r


def backprojected_noise_delta(
    operator, noise_var: float, *, rank: int | None = None, rcond: float | None = None
) -> float:
    """δ = σ² mean diag((AᵀA)⁺_k) (docs/methods.md §6.4): the voxel variance that white sinogram noise of
    variance σ² = ``noise_var`` leaves in the least-squares reconstruction restricted to the
    top ``k`` singular directions of ``A`` (``mean diag = Σ_{j≤k} s_j⁻² / n_vox``).

    The truncation must be chosen, because sparse-view operators have singular values down to
    ~1e-4 s_max whose s⁻² would swamp every predictive: ``rank=k`` (use
    :func:`discrepancy_rank` for the directions the data determine; the same ``k`` for every
    method compared), or ``rcond`` (keep ``s > rcond · s_max``). ``A`` is assembled densely.
    """
    if (rank is None) == (rcond is None):
        raise ValueError(
            "backprojected_noise_delta: choose the truncation with exactly one of rank= "
            "(e.g. discrepancy_rank(y, operator, noise_var)) or rcond="
        )
    if not (math.isfinite(noise_var) and noise_var > 0):
        raise ValueError(f"noise_var must be positive and finite, got {noise_var}")
    _, s = _dense_svd(operator)
    n = math.prod(tuple(operator.domain_shape))
    if rank is not None:
        if not 1 <= int(rank) <= s.numel():
            raise ValueError(f"rank must be in [1, {s.numel()}], got {rank}")
        kept = s[: int(rank)]
    else:
        kept = s[s > float(rcond) * s[0]]
    if kept.numel() == 0 or float(kept[-1]) == 0.0:
        raise ValueError("backprojected_noise_delta: the truncation keeps a zero singular value")
    return float(noise_var) * float((kept**-2).sum()) / n


def _predictive_covariance(result) -> torch.Tensor:
    """The dense covariance of the predictive: the stored (weight-posterior) covariance times
    its scale, plus the other components' scaled variances on the diagonal."""
    cov = _t(result.covariance).double()
    comps = getattr(result, "components", None) or {}
    if not comps:
        return cov
    scales = getattr(result, "variance_scales", {}) or {}
    cov = scales.get("weights", 1.0) * cov
    for c, v in comps.items():
        if c != "weights":
            cov = cov + torch.diag(scales.get(c, 1.0) * _t(v).double().reshape(-1))
    return cov


def evaluate_uq(
    result,
    ground_truth,
    *,
    delta: float = 0.0,
    patch_sizes: Sequence[int] = (1, 2, 10),
    shrinkage: float = 0.0,
    levels: Sequence[float] = (0.5, 0.9, 0.95),
) -> dict:
    """Every metric of docs/methods.md §6.4 for a :class:`~dip_uq.UQResult` against ``ground_truth``.

    Predictive: N(mean, Σ + δI) with Σ the result's dense ``covariance`` when present (exact
    test log-likelihood; scaled by the weights' variance scale, plus the other components on
    the diagonal), else diagonal std². Patch log-likelihoods use the stored samples
    (``keep_samples=True``); without samples the predictive is treated as diagonal (exact for
    the σ²-baselines, whose covariance is diagonal). Returns a JSON-ready dict.
    """
    x = _t(ground_truth).double()
    mean, std = _t(result.mean).double(), _t(result.std).double()
    _same_shape(x, mean, "evaluate_uq")
    for name, t in (("the ground truth", x), ("the result's mean", mean), ("its std", std)):
        require_finite(t, f"evaluate_uq: {name}")  # a NaN would make every score nan silently
    if not (math.isfinite(delta) and delta >= 0):
        raise ValueError(f"evaluate_uq: delta must be a finite variance >= 0, got {delta!r}")
    std_pred = (std**2 + delta).sqrt()
    out: dict = {
        "psnr": psnr(mean, x),
        "ssim": ssim(mean, x) if x.ndim == 2 else None,
        "rmse": rmse(x, mean),
        "coverage": {str(k): v for k, v in coverage(x, mean, std_pred, levels=levels).items()},
        "zscore": zscore_stats(x, mean, std_pred),
        "std_error_correlation": std_error_correlation(x, mean, std_pred),
        "ause": ause((x - mean).abs(), std_pred),
        "delta": float(delta),
    }
    lev, obs = calibration_curve(x, mean, std_pred)
    out["calibration"] = {"expected": lev.tolist(), "observed": obs.tolist()}
    diag_ll = -gaussian_nll(x, mean, std_pred**2)
    if getattr(result, "covariance", None) is not None:
        out["test_log_likelihood"] = exact_test_log_likelihood(
            x, mean, _predictive_covariance(result), delta=delta
        )
    else:
        out["test_log_likelihood"] = diag_ll
    patch = {}
    samples = getattr(result, "samples", None)
    for p in patch_sizes:
        if any(int(p) > n for n in x.shape):
            continue
        if samples is None or int(p) == 1:
            patch[str(p)] = (
                diag_ll
                if samples is None
                else patch_log_likelihood(x, mean, samples, patch_size=1, delta=delta)
            )
        else:
            patch[str(p)] = patch_log_likelihood(
                x, mean, samples, patch_size=int(p), shrinkage=shrinkage, delta=delta
            )
    out["patch_log_likelihood"] = patch
    # the oracle baseline: one std for every voxel, the RMSE (chosen with the truth)
    out["constant_std_log_likelihood"] = -0.5 * (
        1.0 + math.log(2 * math.pi * max(out["rmse"] ** 2, 1e-300))
    )
    return out

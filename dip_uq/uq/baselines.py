"""Uncertainty baselines evaluated like the linearised DIP (docs/methods.md §6.4).

- :func:`dip_noise_baseline`: a point DIP reconstruction with the predictive N(x*, δI),
  δ = σ² mean diag((AᵀA)⁺_k) on the top-k singular directions (see
  :func:`~dip_uq.uq.evaluation.backprojected_noise_delta`), for σ² = 1 or the learned noise variance.
- :func:`dip_mcdo`: DIP-MCDO, a U-Net with dropout p after every 3×3 conv block, trained as a
  DIP; predictive mean and std from Monte-Carlo dropout passes.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .evaluation import backprojected_noise_delta
from .result import UQResult

__all__ = ["dip_noise_baseline", "dip_mcdo"]


def dip_noise_baseline(
    mean: torch.Tensor,
    operator: Any,
    noise_var: float = 1.0,
    *,
    delta: float | None = None,
    rank: int | None = None,
    rcond: float | None = None,
) -> UQResult:
    """Predictive N(mean, δI) with δ = ``noise_var`` · mean diag((AᵀA)⁺_k) (unless ``delta``),
    the truncation given by ``rank`` or ``rcond`` (use the same one as for the methods you
    compare with, e.g. :func:`~dip_uq.uq.evaluation.discrepancy_rank` at the true noise level).

    ``mean`` is the DIP image (volume shape). The dense covariance δI is stored for images up
    to 4096 voxels so that exact test log-likelihoods treat every method alike.
    """
    mean = torch.as_tensor(mean).detach()
    if tuple(mean.shape) != tuple(operator.domain_shape):
        raise ValueError(
            f"mean shape {tuple(mean.shape)} does not match the volume {tuple(operator.domain_shape)}"
        )
    if delta is None:
        delta = backprojected_noise_delta(operator, noise_var, rank=rank, rcond=rcond)
    if not (math.isfinite(delta) and delta > 0):
        raise ValueError(f"delta must be positive and finite, got {delta}")
    n = mean.numel()
    cov = delta * torch.eye(n, dtype=torch.float64) if n <= 4096 else None
    return UQResult(
        mean=mean,
        std=torch.full_like(mean, math.sqrt(delta)),
        noise_var=float(noise_var),
        covariance=cov,
        diagnostics={"method": "dip_noise_baseline", "delta": float(delta)},
    )


def dip_mcdo(
    y: torch.Tensor,
    operator: Any,
    *,
    tv_weight: float,
    iterations: int,
    dropout: float = 0.05,
    n_samples: int = 128,
    net: str = "small",
    net_overrides: dict | None = None,
    lr: float = 1e-4,
    generator: torch.Generator | None = None,
    progress: bool = True,
    **fit_opts,
) -> UQResult:
    """DIP-MCDO: fit a dropout U-Net (``dropout`` after every 3×3 conv) as a DIP, then
    ``n_samples`` MC-dropout passes; mean = MC mean, std = MC std, samples centred at the mean.
    ``net_overrides`` replace preset fields (e.g. ``{"channels": (16, 16, 16)}``)."""
    from ..dip import UNet, fit_dip, mc_dropout_samples

    if not 0 < dropout < 1:
        raise ValueError(f"dropout must be in (0, 1), got {dropout}")
    ndim = len(tuple(operator.domain_shape))
    model = UNet.from_preset(
        net, ndim=ndim, generator=generator, dropout=dropout, **dict(net_overrides or {})
    )
    res = fit_dip(
        y,
        operator,
        net=model,
        tv_weight=tv_weight,
        iterations=iterations,
        lr=lr,
        generator=generator,
        progress=progress,
        **fit_opts,
    )
    s = mc_dropout_samples(res.net, res.input, n_samples, generator=generator)
    s = s.reshape(n_samples, *operator.domain_shape).double()
    m = s.mean(0)
    centred = s - m
    return UQResult(
        mean=m.to(res.image.dtype),
        std=centred.pow(2).mean(0).sqrt().to(res.image.dtype),
        noise_var=float("nan"),
        samples=centred.to(res.image.dtype),
        covariance=(centred.reshape(n_samples, -1).T @ centred.reshape(n_samples, -1)) / n_samples
        if m.numel() <= 4096
        else None,
        diagnostics={"method": "dip_mcdo", "dropout": dropout, "n_samples": n_samples},
    )

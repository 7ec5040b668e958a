"""The shared L-BFGS evidence maximiser against closed-form Gaussian maximum likelihood."""

from __future__ import annotations

import math

import pytest
import torch

from dip_uq.laplace.evidence import lbfgs_maximise


def _gaussian_loglik(y: torch.Tensor, log_v: torch.Tensor) -> torch.Tensor:
    """Σ_i log N(y_i; 0, v) with v = exp(log_v) (broadcast over the last axis of ``y``)."""
    n = y.shape[-1]
    return (-0.5 * n * (math.log(2 * math.pi) + log_v) - 0.5 * (y**2).sum(-1) / log_v.exp()).sum()


def test_one_variance_matches_the_closed_form():
    """y_i ~ N(0, v): v̂ = mean y², max log p = −(n/2)(log 2πv̂ + 1)."""
    y = 3.0 * torch.randn(200, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    log_v = torch.zeros((), dtype=torch.float64)
    best = lbfgs_maximise(
        lambda: _gaussian_loglik(y, log_v), [log_v], tolerance_grad=1e-10, tolerance_change=1e-14
    )
    v_hat = float((y**2).mean())
    assert float(log_v.exp()) == pytest.approx(v_hat, rel=1e-8)
    assert best == pytest.approx(-0.5 * y.numel() * (math.log(2 * math.pi * v_hat) + 1), rel=1e-12)
    assert not log_v.requires_grad and log_v.grad is None


def test_several_params_and_flags_restored():
    """Two groups with their own variance, as two params (one already requiring grad)."""
    g = torch.Generator().manual_seed(1)
    y = torch.randn(2, 150, generator=g, dtype=torch.float64) * torch.tensor([[0.1], [5.0]])
    a = torch.zeros(1, dtype=torch.float64)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    lbfgs_maximise(lambda: _gaussian_loglik(y, torch.cat([a, b])), [a, b], max_iter=200)
    v_hat = (y**2).mean(-1)
    assert torch.cat([a, b]).exp().tolist() == pytest.approx(v_hat.tolist(), rel=1e-5)
    assert (a.requires_grad, b.requires_grad) == (False, True)
    assert a.grad is None and b.grad is None


def test_flags_restored_when_the_objective_raises():
    a = torch.zeros(3, dtype=torch.float64)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    calls = []

    def objective():
        calls.append(None)
        if len(calls) == 3:  # inside the line search, after gradients were written
            raise RuntimeError("evidence broke down")
        return -((a - 1.0) ** 2).sum() - ((b + 2.0) ** 2).sum()

    with pytest.raises(RuntimeError, match="evidence broke down"):
        lbfgs_maximise(objective, [a, b])
    assert len(calls) == 3
    assert (a.requires_grad, b.requires_grad) == (False, True)
    assert a.grad is None and b.grad is None

"""Observation models and their whitening maps (docs/methods.md §1).

Every likelihood exposes a *whitening* W with WᵀW = B (the GGN curvature in output space):
the engine's core operator is G = W J, so the GGN is M = GᵀG and the whitened model has unit
noise. This keeps one code path for regression, CT and classification, and never forms B⁻¹.

- :class:`Gaussian`: y = A f(θ) + ε, ε ~ N(0, σ² I); W = σ⁻¹ A (A = I when no operator).
- :class:`Categorical`: B_n = diag(p_n) − p_n p_nᵀ + 1e-6 I at the network's probabilities;
  W_n = L_nᵀ with L_n L_nᵀ = B_n (Cholesky, float64).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from operators.base import check_operator

__all__ = ["Gaussian", "Categorical", "class_probabilities"]


class Gaussian(nn.Module):
    """Gaussian observations y = A f + ε with noise variance σ² (log-parametrised).

    Args:
        noise_var: σ² > 0.
        operator: optional linear map acting on the trailing dims of f (any leading batch
            dims), with ``.T`` its adjoint. ``None`` means multi-output regression (A = I).
    """

    kind = "gaussian"

    def __init__(self, noise_var: float = 1.0, operator: Any | None = None) -> None:
        super().__init__()
        _check_positive("noise variance", noise_var)
        if operator is not None:
            check_operator(operator, shapes=False)
        self.operator = operator
        self.log_noise_var = nn.Parameter(
            torch.tensor(math.log(noise_var), dtype=torch.float64), requires_grad=False
        )

    @property
    def noise_var(self) -> torch.Tensor:
        return self.log_noise_var.exp()

    def set_noise_var(self, value: float | torch.Tensor) -> None:
        _check_positive("noise variance", float(value))
        with torch.no_grad():
            self.log_noise_var.fill_(math.log(float(value)))

    def observe(self, f: torch.Tensor) -> torch.Tensor:
        """A f (identity without operator)."""
        return f if self.operator is None else self.operator(f)

    def observe_t(self, u: torch.Tensor) -> torch.Tensor:
        """Aᵀ u."""
        return u if self.operator is None else self.operator.T(u)

    def setup(self, f_star: torch.Tensor, y: torch.Tensor) -> None:
        """Check that y matches A f(θ*)'s shape and is finite."""
        pred = self.observe(f_star)
        if tuple(pred.shape) != tuple(y.shape):
            raise ValueError(
                f"targets: expected shape {tuple(pred.shape)} (= A f(x)), got {tuple(y.shape)}"
            )
        if not torch.all(torch.isfinite(y)):
            raise ValueError("targets contain NaN or inf")

    def whiten(self, f_tangent: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """W u = σ⁻¹ A u for output-space tangents ``(K, *f.shape)``."""
        return self.observe(f_tangent) / self.noise_var.to(f_tangent.dtype).sqrt()

    def whiten_t(self, w: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Wᵀ w = σ⁻¹ Aᵀ w."""
        return self.observe_t(w) / self.noise_var.to(w.dtype).sqrt()

    def whitened_residual(self, y: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """σ⁻¹ (y − pred) for observation-space prediction ``pred``."""
        return (y - pred) / self.noise_var.to(y.dtype).sqrt()


class Categorical(nn.Module):
    """Softmax classification; curvature B_n = diag(p_n) − p_n p_nᵀ + jitter·I.

    Logits have shape ``(n, C)`` and targets are class indices ``(n,)``.
    """

    kind = "categorical"

    def __init__(self, jitter: float = 1e-6) -> None:
        super().__init__()
        _check_positive("jitter", jitter)
        self.jitter = jitter
        self.register_buffer("probs", None)
        self.register_buffer("chol", None)

    def setup(self, f_star: torch.Tensor, y: torch.Tensor) -> None:
        """Store p = softmax(f(x; θ*)) (the network's logits, docs/methods.md §1) and chol(B_n)."""
        if f_star.dim() != 2:
            raise ValueError(
                f"categorical logits: expected shape (n, C), got {tuple(f_star.shape)}"
            )
        if y is not None:
            if y.shape != f_star.shape[:1] or y.dtype not in (torch.int64, torch.int32):
                raise ValueError(
                    f"class targets: expected integer shape ({f_star.shape[0]},), got {tuple(y.shape)} {y.dtype}"
                )
            if y.min() < 0 or y.max() >= f_star.shape[1]:
                raise ValueError(f"class targets outside [0, {f_star.shape[1]})")
        p = torch.softmax(f_star.double(), dim=-1)
        self.probs = p.to(f_star.dtype)
        B = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        B = B + self.jitter * torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
        self.chol = torch.linalg.cholesky(B).to(f_star.dtype)

    def _L(self, idx, dtype):
        if self.chol is None:
            raise RuntimeError("Categorical.setup(logits, y) has not been called")
        L = self.chol if idx is None else self.chol[idx]
        return L.to(dtype)

    def curvature_mv(self, u: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """B u = p⊙u − p(pᵀu) + jitter·u in closed form, ``u`` ``(K, n, C)``."""
        p = (self.probs if idx is None else self.probs[idx]).to(u.dtype)
        return p * u - p * (p * u).sum(-1, keepdim=True) + self.jitter * u

    def whiten(self, f_tangent: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """W u = L_nᵀ u_n per datum."""
        return torch.einsum("nij,kni->knj", self._L(idx, f_tangent.dtype), f_tangent)

    def whiten_t(self, w: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Wᵀ w = L_n w_n."""
        return torch.einsum("nij,knj->kni", self._L(idx, w.dtype), w)


def _check_positive(what: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{what} must be positive and finite, got {value}")


def class_probabilities(f: torch.Tensor, jz: torch.Tensor, link: str = "probit") -> torch.Tensor:
    """Predictive class probabilities ``(n, C)`` from the logits f ``(n, C)`` and the
    linearised logit perturbations J z_k ``(K, n, C)`` of K posterior samples.

    ``"mc"``: mean_k softmax(f + J z_k); ``"probit"``: softmax(f·κ), κ = (1 + π/8 v)^{-½} with
    v = mean_k (J z_k)² (the probit approximation of the Gaussian-softmax integral)."""
    if link == "mc":
        return torch.softmax(f[None] + jz, dim=-1).mean(0)
    if link == "probit":
        v = (jz**2).mean(0)
        return torch.softmax(f / torch.sqrt(1 + math.pi / 8 * v), dim=-1)
    raise ValueError(f"unknown link {link!r}; use 'probit' or 'mc'")

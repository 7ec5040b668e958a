"""The linearised deep image prior as a model of the Laplace engine: the U-Net's output as a
volume, its conv weights grouped by U-Net block under the prior of docs/methods.md §4, the
Gaussian likelihood through the CT operator (docs/methods.md §1, §5), and dense references
for small problems.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..laplace import Gaussian, LinearisedLaplace
from ..laplace.evidence import lbfgs_maximise
from ..laplace.solvers import dense_factors, functional_covariance
from ..laplace.solvers.sgd import auto_momentum
from .config import PRIORS

__all__ = [
    "VolumeModel",
    "unet_block_of",
    "build_laplace",
    "exact_image_covariance",
    "tied_evidence_maximiser",
    "hyper_state",
    "load_hyper_state",
    "sgd_momentum",
]


class VolumeModel(nn.Module):
    """f(z₀; θ) with output reshaped to the volume ``(H, W)`` / ``(D, H, W)`` for the operator."""

    def __init__(self, net: nn.Module, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.net = net
        self.shape = tuple(shape)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).reshape(self.shape)


def unet_block_of(name: str) -> str:
    """U-Net block of a parameter name (``net.`` prefix ignored): ``inc``, ``outc``, or the
    first two components (``down.0``, ``up.1``, ``skip.0``)."""
    parts = name.split(".")
    if parts and parts[0] == "net":
        parts = parts[1:]
    if parts[0] in ("inc", "outc") or len(parts) < 3:
        return parts[0]
    return ".".join(parts[:2])


def build_laplace(
    net: nn.Module,
    z0: torch.Tensor,
    y: torch.Tensor,
    operator: Any,
    *,
    prior: str = "matern",
    noise_var: float = 1.0,
    prior_variance: float = 1.0,
    lengthscale: float = 0.1,
    g_prior_probes: int = 64,
    generator: torch.Generator | None = None,
) -> LinearisedLaplace:
    """The linearised-DIP posterior object: conv weights of ``net`` under a per-block prior,
    Gaussian likelihood through ``operator``; ``z0`` ``(1, C, *volume)`` is the net input."""
    if prior not in PRIORS:
        raise ValueError(f"unknown prior {prior!r}; use one of {PRIORS}")
    domain = tuple(operator.domain_shape)
    with torch.no_grad():
        out = net(z0)
    if out.numel() != math.prod(domain):
        raise ValueError(
            f"network output shape {tuple(out.shape)} does not match the operator's volume "
            f"{domain} (expected (1, 1, {', '.join(map(str, domain))}))"
        )
    model = VolumeModel(net, domain)
    # block kind: Matérn for blocks holding a k×k filter with k > 1, Normal otherwise
    has_filter: dict[str, bool] = {}
    for mname, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            b = unet_block_of(f"{mname}.weight")
            taps = math.prod(m.weight.shape[2:])
            has_filter[b] = has_filter.get(b, False) or taps > 1
    kind = (
        (lambda b: "matern" if has_filter.get(b, False) else "normal")
        if prior == "matern"
        else "normal"
    )
    la = LinearisedLaplace(
        model,
        Gaussian(noise_var, operator),
        z0,
        y,
        params="conv_weights",
        blocks=unet_block_of,
        prior=kind,
        prior_variance=prior_variance,
        lengthscale=lengthscale,
    )
    if prior == "g-prior":
        la.set_g_prior("ggn", n_probes=g_prior_probes, generator=generator)
    return la


def exact_image_covariance(la: LinearisedLaplace) -> torch.Tensor:
    """Dense posterior covariance of the image, J H⁻¹ Jᵀ ``(n_vox, n_vox)`` in float64
    (small problems: forms the dense Jacobian and the exact factors)."""
    system = la.system()
    with torch.no_grad():
        J = la.fmodel.dense_jacobian(la.inputs)
    return functional_covariance(system, J, dense_factors(system))


def tied_evidence_maximiser(
    la: LinearisedLaplace, max_iter: int = 200
) -> tuple[float, float, float]:
    """Exact type-II ML over one shared prior variance v and σ² (small problems; a reference
    for EM and MLL), at the prior's current block shapes: Σ = v Σ₁ with Σ₁ the prior at v = 1.

    With K₀ = (AJ) Σ₁ (AJ)ᵀ = U S Uᵀ (float64, dense) and c = Uᵀỹ, ỹ = y − A x* + AJ θ*,
    log p(y) = −½ Σ_i [c_i² / (v s_i + σ²) + log(v s_i + σ²)] − (n/2) log 2π, maximised
    over (log v, log σ²) by L-BFGS (one eigendecomposition, then O(n) per evaluation).
    Returns (v, σ², log evidence); ``la`` is not modified.
    """
    lik = la._gaussian("the tied evidence maximiser")
    v_now = la.prior.variances().detach().double()
    if not torch.allclose(v_now, v_now[0].expand_as(v_now), rtol=1e-6):
        raise ValueError("tied_evidence_maximiser needs one shared prior variance (tied=True)")
    AJ = la.dense_observation_jacobian()
    with torch.no_grad():
        pred = lik.observe(la.fmodel.output(la.inputs)).reshape(-1).double()
        ytil = la.targets.reshape(-1).double() - pred + AJ @ la.theta_star().double()
        K0 = AJ @ la.prior.cov_mv(AJ).T.double() / v_now[0]
        S, U = torch.linalg.eigh(0.5 * (K0 + K0.T))
        S = S.clamp_min(0.0)
        c2 = (U.T @ ytil) ** 2
    logs = torch.tensor(
        [math.log(float(v_now[0])), math.log(float(lik.noise_var))], dtype=torch.float64
    )

    def log_evidence() -> torch.Tensor:  # without the constant −(n/2) log 2π
        k = logs[0].exp() * S + logs[1].exp()
        return -0.5 * (c2 / k + k.log()).sum()

    ev = lbfgs_maximise(log_evidence, [logs], max_iter=max_iter)
    v, nv = logs.exp()
    return float(v), float(nv), ev - 0.5 * S.numel() * math.log(2 * math.pi)


def hyper_state(la: LinearisedLaplace) -> dict:
    return {
        "log_variance": la.prior.log_variance.detach().clone(),
        "log_lengthscale": la.prior.log_lengthscale.detach().clone(),
        "log_noise_var": la.likelihood.log_noise_var.detach().clone(),
        "scale": None if la.prior.scale is None else la.prior.scale.clone(),
    }


def load_hyper_state(la: LinearisedLaplace, st: dict) -> None:
    with torch.no_grad():
        la.prior.log_variance.copy_(st["log_variance"])
        la.prior.log_lengthscale.copy_(st["log_lengthscale"])
        la.likelihood.log_noise_var.copy_(st["log_noise_var"])
    la.prior.set_scale(st.get("scale"))


def sgd_momentum(la: LinearisedLaplace) -> float:
    """Nesterov momentum for the primal sgd solver from the condition number of its objective,
    κ = λ_max(ĜᵀĜ) + 1 (the prior part is the identity): the optimal heavy-ball value
    (√κ − 1)/(√κ + 1), clipped to [0.9, 0.999]. A fixed 0.9 needs ~κ/10 steps for directions
    of intermediate curvature, and DIP Jacobians have κ ~ 1e5-1e6."""
    gen = torch.Generator(device=la.inputs.device).manual_seed(0)  # deterministic estimate
    return auto_momentum(la.system().lambda_max(generator=gen))

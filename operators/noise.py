"""Measurement noise models for simulated sinograms.

* :func:`add_gaussian_noise` -- the sparse-view literature's "relative" white noise: a
  noise level ``rel = 0.05`` ("5 % noise") means ``std = 0.05 * mean(|A x|)``, not 5 % of
  the image range.
* :func:`add_poisson_noise` -- photon-counting noise on the transmitted intensity, returned
  as post-log data (the LoDoPaB-CT model).

Both take a ``torch.Generator`` and are deterministic under a seed. Random numbers are drawn
on the generator's device and moved to the data's device when the two differ.
"""

from __future__ import annotations

import math

import torch

__all__ = ["add_gaussian_noise", "add_poisson_noise", "LODOPAB_PHOTONS", "LODOPAB_MU_MAX"]

#: LoDoPaB-CT: mean photon count per detector bin without an object.
LODOPAB_PHOTONS = 4096.0
#: LoDoPaB-CT: attenuation (1/m) of the image value 1; observations are divided by it.
LODOPAB_MU_MAX = 81.35858


def _check_data(y: torch.Tensor, name: str) -> None:
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name}: y must be a torch.Tensor, got {type(y).__name__}")
    if not y.is_floating_point():
        raise TypeError(f"{name}: y must be a floating-point tensor, got dtype {y.dtype}")
    if y.numel() == 0:
        raise ValueError(f"{name}: y is empty (shape {tuple(y.shape)})")
    if not torch.isfinite(y).all():
        raise ValueError(f"{name}: y contains NaN or infinite values")


def _device_of(generator: torch.Generator | None, y: torch.Tensor) -> torch.device:
    return generator.device if generator is not None else y.device


def add_gaussian_noise(
    y: torch.Tensor, *, rel: float = 0.05, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, float]:
    """White Gaussian noise of relative level ``rel``: ``y + std * eps``, ``eps ~ N(0, I)``.

    ``std = rel * mean(|y|)``, the mean taken over the whole tensor (all batch entries
    together). Returns the noisy data (same shape, dtype and device as ``y``) and ``std``.
    """
    _check_data(y, "add_gaussian_noise")
    rel = float(rel)
    if not (rel >= 0 and math.isfinite(rel)):
        raise ValueError(f"add_gaussian_noise: rel must be finite and >= 0, got {rel}")
    std = rel * float(y.abs().mean(dtype=torch.float64))
    eps = torch.randn(y.shape, generator=generator, dtype=y.dtype, device=_device_of(generator, y))
    return y + std * eps.to(y.device), std


def add_poisson_noise(
    y: torch.Tensor,
    *,
    photons: float,
    mu_max: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Post-log Poisson noise on line integrals ``y`` (the LoDoPaB-CT model).

    With ``s = mu_max`` (or 1 if ``None``) the physical line integral is ``s * y``, the
    expected count ``N0 * exp(-s * y)`` with ``N0 = photons`` per bin, and

        counts ~ Poisson(N0 exp(-s y)),   counts = 0  ->  0.1,   y_noisy = -log(counts / N0) / s.

    To first order ``y_noisy`` has mean ``y`` and variance ``exp(s y) / (N0 s^2)``.
    LoDoPaB-CT uses ``photons = 4096`` and ``mu_max = 81.35858`` (images normalised to
    [0, 1], lengths in metres). Returns a tensor with the shape, dtype and device of ``y``.
    """
    _check_data(y, "add_poisson_noise")
    photons = float(photons)
    if not (photons > 0 and math.isfinite(photons)):
        raise ValueError(f"add_poisson_noise: photons must be finite and > 0, got {photons}")
    scale = 1.0 if mu_max is None else float(mu_max)
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"add_poisson_noise: mu_max must be finite and > 0, got {mu_max}")
    dev = _device_of(generator, y)
    # float64 rates: exp(-s y) over a wide dynamic range, and Poisson sampling precision.
    rate = photons * torch.exp(-scale * y.detach().to(device=dev, dtype=torch.float64))
    counts = torch.poisson(rate, generator=generator)
    counts = torch.where(counts > 0, counts, torch.full_like(counts, 0.1))
    out = -torch.log(counts / photons) / scale
    return out.to(device=y.device, dtype=y.dtype)

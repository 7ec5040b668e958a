"""EDIP: supervised pretraining of the DIP U-Net on simulated random ellipses/ellipsoids.

Barbano et al.'s "educated" DIP starts from a network that already maps the analytic
reconstruction of a scan to the image. :func:`pretrain_edip` simulates ``n_images`` random
phantoms ``x_k`` (ellipses in 2D, ellipsoids in 3D, values in ``[0, value_scale]``) with the
**same operator** as the target scan, measurements ``y_k = A x_k + noise`` (relative
Gaussian noise) and inputs ``z_k = FBP/FDK(y_k)``, then minimises the mean squared error
``mean_k ||f(z_k; theta) - x_k||^2`` with Adam over random minibatches. The result is saved
with :func:`save_pretrained` and reused by ``fit_dip(net=path)`` (or ``load_pretrained``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .checkpoint import CheckpointError, atomic_save, load_checkpoint
from .unet import UNet, UNetConfig, build_unet

__all__ = ["PretrainResult", "pretrain_edip", "save_pretrained", "load_pretrained"]

_FORMAT = "dip-uq/pretrained-unet/1"


@dataclass
class PretrainResult:
    """``net`` (trained, eval mode) and the minibatch ``loss_history`` (float64)."""

    net: nn.Module
    loss_history: torch.Tensor


def _phantoms(shape: tuple[int, ...], n: int, generator: torch.Generator | None) -> torch.Tensor:
    from operators.phantoms import random_ellipses, random_ellipsoids

    make = random_ellipses if len(shape) == 2 else random_ellipsoids
    return torch.stack([make(shape, generator=generator) for _ in range(n)])


def pretrain_edip(
    operator: Any,
    *,
    net: str | UNetConfig | dict | nn.Module | None = None,
    n_images: int = 64,
    iterations: int = 500,
    batch_size: int = 4,
    lr: float = 1e-4,
    noise_rel: float = 0.05,
    value_scale: float = 1.0,
    generator: torch.Generator | None = None,
    save_path: str | os.PathLike | None = None,
    progress: bool = True,
) -> PretrainResult:
    """Pretrain a U-Net on simulated scans of random ellipses (2D) / ellipsoids (3D).

    Args:
        operator: the scan's operator (``domain_shape`` = volume, ``range_shape`` = sinogram).
        net: as in ``fit_dip`` (default: the ``small`` preset).
        n_images: size of the simulated training set (generated once, up front).
        iterations: Adam steps; each uses ``batch_size`` images drawn from ``generator``.
        noise_rel: relative Gaussian noise level of the simulated data (docs/methods.md §5).
        value_scale: phantom values are in ``[0, value_scale]``; match your images' range.
        save_path: write the pretrained network there (atomically) when given.
    """
    from operators.analytic import analytic_reconstruction
    from operators.noise import add_gaussian_noise

    for name, v in (("n_images", n_images), ("iterations", iterations), ("batch_size", batch_size)):
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be positive, got {lr!r}")
    domain = tuple(operator.domain_shape)
    model = build_unet(net, ndim=len(domain), generator=generator)
    model.train()
    with torch.no_grad():
        x = _phantoms(domain, int(n_images), generator) * float(value_scale)
        x = x.to(next(model.parameters()).dtype)
        y = torch.stack(
            [add_gaussian_noise(operator(xi), rel=noise_rel, generator=generator)[0] for xi in x]
        )
        z = torch.stack([analytic_reconstruction(yi, operator) for yi in y])
    x, z = x.unsqueeze(1), z.unsqueeze(1)  # (N, 1, *domain)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = torch.empty(int(iterations), dtype=torch.float64)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=int(iterations), desc="EDIP pretraining", leave=False)
    try:
        for it in range(int(iterations)):
            idx = torch.randint(0, x.shape[0], (int(batch_size),), generator=generator)
            opt.zero_grad(set_to_none=True)
            loss = (model(z[idx]) - x[idx]).pow(2).mean()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses[it] = loss.item()
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    model.eval()
    if save_path is not None:
        save_pretrained(
            model, save_path, meta={"n_images": int(n_images), "iterations": int(iterations)}
        )
    return PretrainResult(net=model, loss_history=losses)


def save_pretrained(net: UNet, path: str | os.PathLike, *, meta: dict | None = None) -> None:
    """Save a :class:`UNet`'s config and weights atomically (reload with ``load_pretrained``)."""
    if not hasattr(net, "config"):
        raise TypeError("save_pretrained needs a dip_uq UNet (it stores the config)")
    atomic_save(
        {
            "format": _FORMAT,
            "config": net.config.to_dict(),
            "state_dict": net.state_dict(),
            "meta": dict(meta or {}),
        },
        path,
    )


def load_pretrained(path: str | os.PathLike) -> UNet:
    """Rebuild a :class:`UNet` saved by :func:`save_pretrained`."""
    ck = load_checkpoint(path)
    if ck.get("format") != _FORMAT:
        raise CheckpointError(f"{path}: not a pretrained U-Net file (format {ck.get('format')!r})")
    net = UNet(UNetConfig(**ck["config"]))
    net.load_state_dict(ck["state_dict"])
    return net

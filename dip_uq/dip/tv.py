"""Anisotropic total variation and its analytic subgradient, 2D and 3D.

For an image ``x`` with spatial axes ``a = 1 .. ndim`` (the trailing ``ndim`` dimensions),

    TV(x) = sum_a sum_{i : i + e_a inside} |x[i + e_a] - x[i]|,

a sum over all neighbour pairs (no averaging, no boundary padding: a boundary voxel simply
has fewer pairs). Leading dimensions (batch, channels) are summed over as well.

The subgradient used is ``g = sum_a D_a^T sign(D_a x)`` with ``sign(0) = 0`` (the minimum-norm
choice where a difference vanishes), ``D_a`` the forward difference along axis ``a``. It is
what autograd returns for ``tv`` (``d|t|/dt = sign(t)``), and it is available in closed form
for code that needs it without a graph (the TV-PredCP hyperprior).
"""

from __future__ import annotations

import torch

__all__ = ["tv", "tv_subgradient"]


def _spatial_ndim(x: torch.Tensor, ndim: int | None) -> int:
    if ndim is None:
        if x.ndim not in (2, 3):
            raise ValueError(
                f"tv: cannot infer the spatial dimensions of a tensor of shape "
                f"{tuple(x.shape)}; pass ndim=2 or ndim=3"
            )
        return x.ndim
    if ndim not in (2, 3):
        raise ValueError(f"tv: ndim must be 2 or 3, got {ndim}")
    if x.ndim < ndim:
        raise ValueError(f"tv: a {ndim}D TV needs at least {ndim} dims, got shape {tuple(x.shape)}")
    return ndim


def tv(x: torch.Tensor, *, ndim: int | None = None) -> torch.Tensor:
    """Anisotropic TV of ``x`` (shape ``(..., H, W)`` or ``(..., D, H, W)``): the sum of
    ``|x[i + e_a] - x[i]|`` over all neighbour pairs along the last ``ndim`` axes and over all
    leading dimensions. ``ndim`` defaults to ``x.ndim`` for 2D/3D tensors. Returns a scalar."""
    nd = _spatial_ndim(x, ndim)
    total = x.new_zeros(())
    for axis in range(x.ndim - nd, x.ndim):
        total = total + torch.diff(x, dim=axis).abs().sum()
    return total


def tv_subgradient(x: torch.Tensor, *, ndim: int | None = None) -> torch.Tensor:
    """The subgradient ``sum_a D_a^T sign(D_a x)`` of :func:`tv` (same shape as ``x``).

    Per axis: voxel ``i`` receives ``-sign(x[i+1] - x[i])`` from its forward pair and
    ``+sign(x[i] - x[i-1])`` from its backward pair; boundary voxels lack one of the two.
    """
    nd = _spatial_ndim(x, ndim)
    g = torch.zeros_like(x)
    for axis in range(x.ndim - nd, x.ndim):
        s = torch.sign(torch.diff(x, dim=axis))
        n = x.shape[axis]
        if n < 2:
            continue
        g.narrow(axis, 0, n - 1).sub_(s)  # pairs (i, i+1) pull voxel i
        g.narrow(axis, 1, n - 1).add_(s)  # ... and push voxel i+1
    return g

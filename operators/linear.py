"""Geometry-free linear operators given by an explicit sparse matrix.

For ray sets that are not a standard projection geometry (e.g. the Walnut single-slice
sub-problem, one detector row per (angle, column)), a ``MatrixOperator`` offers the same
contract as ``RayTransform``: ``op(x)``, ``op.T(y)`` (exact transpose, ``matched = True``),
leading batch dims, ``domain_shape``/``range_shape``, ``norm()``; autograd works through
``torch.sparse.mm``.
"""

from __future__ import annotations

import math

import torch

from .base import OperatorBase, check_device

__all__ = ["MatrixOperator"]


class MatrixOperator(OperatorBase):
    """A linear operator given by a sparse matrix: ``(..., *domain_shape) ->
    (..., *range_shape)``, ``op.T`` its exact transpose (``matched = True``).

    ``matrix``: torch sparse COO ``(prod(range_shape), prod(domain_shape))``."""

    matched = True

    def __init__(
        self,
        matrix: torch.Tensor,
        domain_shape: tuple[int, ...],
        range_shape: tuple[int, ...],
    ) -> None:
        super().__init__()
        m, n = math.prod(range_shape), math.prod(domain_shape)
        if tuple(matrix.shape) != (m, n):
            raise ValueError(
                f"matrix shape {tuple(matrix.shape)} does not match range {range_shape} x "
                f"domain {domain_shape} = ({m}, {n})"
            )
        self.matrix = matrix.coalesce()
        self.domain_shape = tuple(domain_shape)
        self.range_shape = tuple(range_shape)
        self._csr: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _mats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (like.dtype, like.device)
        if key not in self._csr:
            a = self.matrix.to(dtype=like.dtype, device=like.device)
            self._csr[key] = (a, a.t().coalesce())
        return self._csr[key]

    def _apply(self, t: torch.Tensor, which: int, shape_in: tuple, shape_out: tuple):
        check_device(t, "input", "MatrixOperator")
        k = len(shape_in)
        if t.ndim < k or tuple(t.shape[-k:]) != shape_in:
            raise ValueError(f"expected input (..., {shape_in}), got {tuple(t.shape)}")
        lead = t.shape[:-k]
        flat = t.reshape(-1, math.prod(shape_in)).t()
        out = torch.sparse.mm(self._mats(t)[which], flat.contiguous())
        return out.t().reshape(*lead, *shape_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``A x``."""
        return self._apply(x, 0, self.domain_shape, self.range_shape)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``A^T y``."""
        return self._apply(y, 1, self.range_shape, self.domain_shape)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_csr"] = {}  # per-device caches are rebuilt on demand
        return state

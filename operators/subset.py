"""Operators restricted to a subset of projection views: the fit/held-out split that
calibration without ground truth rests on.

Sinogram orders (``docs/conventions.md``): 2D ``(angles, detector)`` has its views on axis 0,
3D ``(detector_rows, angles, detector_cols)`` on axis 1. ``take_views(op, views)`` returns an
operator whose range holds only those views: for a :class:`~operators.RayTransform` a new
transform on ``geometry[views]`` (the backend never computes the other views); for any other
operator with ``op(x)``/``op.T(y)`` a :class:`ViewSubset` wrapper (forward, then select;
adjoint: zero-fill, then ``op.T``), exact for any linear ``op``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .base import OperatorBase
from .transform import RayTransform

__all__ = ["view_axis", "take_views", "select_views", "ViewSubset"]


def view_axis(range_shape: Sequence[int]) -> int:
    """Index of the view axis in a sinogram of ``range_shape``: 0 in 2D ``(angles, det)``,
    1 in 3D ``(rows, angles, cols)``."""
    nd = len(tuple(range_shape))
    if nd == 2:
        return 0
    if nd == 3:
        return 1
    raise ValueError(
        f"cannot tell the view axis of a sinogram of shape {tuple(range_shape)}: expected "
        "2D (angles, detector) or 3D (detector_rows, angles, detector_cols)"
    )


def _views(views: Sequence[int], n_views: int) -> list[int]:
    sel = [int(v) for v in views]
    if not sel:
        raise ValueError("the view selection is empty")
    bad = [v for v in sel if not 0 <= v < n_views]
    if bad:
        raise IndexError(f"views {bad} out of range for {n_views} views")
    if len(set(sel)) != len(sel):
        raise ValueError("the view selection repeats views")
    return sel


def select_views(y: torch.Tensor, views: Sequence[int], range_shape: Sequence[int]) -> torch.Tensor:
    """The views ``views`` of a sinogram ``y`` ``(..., *range_shape)`` (leading dims kept)."""
    rs = tuple(range_shape)
    ax = view_axis(rs)
    sel = _views(views, rs[ax])
    idx = torch.as_tensor(sel, device=y.device)
    return y.index_select(y.dim() - len(rs) + ax, idx)


def take_views(op: Any, views: Sequence[int]) -> Any:
    """``op`` restricted to the projection views ``views`` (in the given order)."""
    rs = tuple(op.range_shape)
    sel = _views(views, rs[view_axis(rs)])
    if isinstance(op, RayTransform):
        return RayTransform(op.volume, op.geometry[sel], backend=op._requested, **op._options)
    return ViewSubset(op, sel)


class ViewSubset(OperatorBase):
    """``op`` followed by the selection of some views; ``.T`` zero-fills the other views and
    applies ``op.T`` (the exact transpose of the restricted map when ``op.T`` is exact)."""

    def __init__(self, op: Any, views: Sequence[int]) -> None:
        super().__init__()
        rs = tuple(op.range_shape)
        self._axis = view_axis(rs)
        self.views = _views(views, rs[self._axis])
        object.__setattr__(self, "op", op)  # not a submodule: no parameter sharing surprises
        self.domain_shape = tuple(op.domain_shape)
        shape = list(rs)
        shape[self._axis] = len(self.views)
        self.range_shape = tuple(shape)
        self._full = rs

    @property
    def matched(self) -> bool:
        return bool(getattr(self.op, "matched", False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return select_views(self.op(x), self.views, self._full)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        lead = tuple(y.shape[: y.dim() - len(self.range_shape)])
        full = y.new_zeros(*lead, *self._full)
        idx = torch.as_tensor(self.views, device=y.device)
        full = full.index_copy(len(lead) + self._axis, idx, y)
        return self.op.T(full)

    def extra_repr(self) -> str:
        return f"views={len(self.views)} of {self._full[self._axis]}, op={type(self.op).__name__}"

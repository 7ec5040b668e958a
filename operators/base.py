"""The operator contract every layer relies on, its small base class and its one checker.

A *linear operator* here is anything with ``op(x)`` (``(..., *domain_shape) ->
(..., *range_shape)``), an adjoint ``op.T(y)``, the two shapes as tuples, and optionally
``matched`` (whether ``op.T`` is the exact transpose; assumed when absent) and ``norm()``.
:class:`LinearOperator` states it as a protocol; :class:`OperatorBase` gives implementations
the shared parts (the ``.T`` view, pickling, a cached power-iteration norm);
:func:`check_operator` is the one validation every layer calls; :func:`power_norm` the one
power iteration.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from .adjoint_view import AdjointView

__all__ = ["LinearOperator", "OperatorBase", "check_operator", "check_device", "power_norm"]


@runtime_checkable
class LinearOperator(Protocol):
    """``op(x)``, ``op.T(y)``, ``domain_shape``, ``range_shape`` (and ``matched``, ``norm``)."""

    domain_shape: tuple[int, ...]
    range_shape: tuple[int, ...]

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    @property
    def T(self) -> Any: ...  # noqa: N802


def power_norm(
    op: Any,
    *,
    iterations: int = 100,
    tol: float = 1e-7,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float64,
) -> float:
    """``‖A‖₂`` by power iteration on ``AᵀA`` (stops when the estimate changes by less than
    ``tol`` relative), with tensors on ``device`` in ``dtype``; the start vector is drawn in
    float64 on the CPU from ``generator`` (fixed seed 0 when ``None``)."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    x = torch.randn(tuple(op.domain_shape), generator=g, dtype=torch.float64)
    x = (x / x.norm()).to(dtype=dtype, device=device)
    lam = 0.0
    with torch.no_grad():
        for _ in range(int(iterations)):
            z = op.T(op(x))
            new = float(z.double().norm())
            if new == 0.0:
                return 0.0
            x = z / new
            if abs(new - lam) <= tol * new:
                return math.sqrt(new)
            lam = new
    return math.sqrt(lam)


class OperatorBase(nn.Module):
    """Base of the package's operators: subclasses set ``domain_shape`` and ``range_shape``
    and implement ``forward`` and ``adjoint``; they get ``.T`` (an
    :class:`~operators.adjoint_view.AdjointView`, ``op.T.T is op``), pickling that drops the
    view, and :meth:`norm` (power iteration, cached per device and dtype)."""

    matched: bool = True

    def __init__(self) -> None:
        super().__init__()
        object.__setattr__(self, "_adjoint_view", AdjointView(self))
        object.__setattr__(self, "_norms", {})

    @property
    def T(self) -> AdjointView:  # noqa: N802 - mathematical notation
        """The adjoint as a module: ``op.T(y)``; ``op.T.T is op``."""
        return self._adjoint_view

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def norm(
        self,
        *,
        iterations: int = 100,
        tol: float = 1e-7,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float64,
        recompute: bool = False,
    ) -> float:
        """``‖A‖₂`` by :func:`power_norm` (cached per device and dtype)."""
        key = (str(torch.device(device)), str(dtype))
        if recompute or key not in self._norms:
            self._norms[key] = power_norm(
                self, iterations=iterations, tol=tol, generator=generator, device=device,
                dtype=dtype,
            )  # fmt: skip
        return self._norms[key]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_adjoint_view", None)
        state["_norms"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        object.__setattr__(self, "_adjoint_view", AdjointView(self))


def check_device(t: torch.Tensor, what: str, where: str) -> None:
    """Refuse a tensor without data: a ``meta`` tensor has a shape and a dtype but no values,
    so no operator can apply to it (``where`` names the consumer, ``what`` the tensor)."""
    if t.device.type == "meta":
        raise ValueError(
            f"{what} is on device 'meta' (a shape without data), but {where} computes on a "
            "device with data (cpu or cuda): create or load the tensor on cpu or cuda"
        )


def check_operator(
    op: Any, *, matched: str = "warn", shapes: bool = True
) -> tuple[tuple[int, ...], ...] | None:
    """Validate the contract and return ``(domain_shape, range_shape)`` (``shapes=False``:
    only ``op(x)`` and ``op.T(y)`` are required, and ``None`` is returned).

    Raises ``TypeError`` naming what is missing (a callable ``op``, a callable ``op.T``,
    integer shapes). For an operator whose ``matched`` is False, ``matched="warn"`` warns,
    ``"require"`` raises ``ValueError`` (dual solvers, Matheron samples and exact posteriors
    assume an exact transpose) and ``"ignore"`` accepts it (gradients only need an adjoint).
    """
    name = type(op).__name__
    missing = []
    if not callable(op):
        missing.append("call (A(x))")
    if not callable(getattr(op, "T", None)):
        missing.append("callable .T (adjoint, A.T(y))")
    if shapes:
        missing += [a for a in ("domain_shape", "range_shape") if not hasattr(op, a)]
    if missing:
        raise TypeError(
            f"operator {name} has no {', no '.join(missing)} (the operator contract: e.g. an "
            "operators.RayTransform)"
        )
    found = []
    for attr in ("domain_shape", "range_shape") if shapes else ():
        shape = tuple(getattr(op, attr))
        if not shape or not all(isinstance(n, int) and n > 0 for n in shape):
            raise TypeError(f"operator {name}: {attr} must be positive integers, got {shape}")
        found.append(shape)
    if matched not in ("warn", "require", "ignore"):
        raise ValueError(f"matched must be 'warn', 'require' or 'ignore', got {matched!r}")
    if getattr(op, "matched", True) is False and matched != "ignore":
        msg = (
            f"the adjoint of {name} is not the exact transpose (matched=False): dual solvers, "
            "Matheron samples and exact posteriors assume it is"
        )
        if matched == "require":
            raise ValueError(msg)
        warnings.warn(msg, stacklevel=3)
    return (found[0], found[1]) if shapes else None

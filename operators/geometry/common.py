"""Angle lists and the argument checks every geometry shares: ``uniform_angles``, the
validation of angles, counts, positive lengths and ``(rows, cols)`` pairs (raising
``GeometryError``), and the code-like formatting of angle lists used by the reprs.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import GeometryError

__all__ = ["uniform_angles"]


def uniform_angles(n: int, *, start: float = 0.0, stop: float = math.pi) -> tuple[float, ...]:
    """``n`` equispaced angles in ``[start, stop)`` (radians), as used for a half or full orbit."""
    if int(n) < 1:
        raise GeometryError(f"need at least one angle, got n={n}")
    return tuple(float(a) for a in np.linspace(start, stop, int(n), endpoint=False))


def _as_tuple(value: Any, n: int, name: str) -> tuple[float, ...]:
    """A scalar broadcast to ``n`` floats, or a length-``n`` sequence, validated positive."""
    if np.isscalar(value):
        out = (float(value),) * n
    else:
        out = tuple(float(v) for v in value)
        if len(out) != n:
            raise GeometryError(f"{name} must have {n} entries, got {len(out)}")
    return out


def _check_angles(angles: Any) -> tuple[float, ...]:
    arr = np.asarray(angles, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise GeometryError(
            "the angle list is empty: a projection geometry needs at least one view"
        )
    if not np.all(np.isfinite(arr)):
        raise GeometryError("angles contain NaN or infinite values")
    return tuple(float(a) for a in arr)


def _fmt_angles(angles: tuple[float, ...]) -> str:
    """Angles in a form that reads like code and evaluates back to the same values:
    ``uniform_angles(...)`` when they are exactly that, else the full tuple."""
    n = len(angles)
    if n >= 2:
        step = (angles[-1] - angles[0]) / (n - 1)
        named = {math.pi: "math.pi", 2 * math.pi: "2 * math.pi"}
        for stop in (math.pi, 2 * math.pi, angles[0] + step * n):
            if stop > angles[0] and uniform_angles(n, start=angles[0], stop=stop) == angles:
                start = "" if angles[0] == 0 else f", start={angles[0]!r}"
                stop_s = "" if stop == math.pi else f", stop={named.get(stop, repr(stop))}"
                return f"uniform_angles({n}{start}{stop_s})"
    return "(" + ", ".join(repr(a) for a in angles) + ("," if n == 1 else "") + ")"


def _check_positive(name: str, value: float) -> float:
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise GeometryError(f"{name} must be positive and finite, got {value}")
    return value


def _check_count(name: str, value: int) -> int:
    if int(value) != value or int(value) < 1:
        raise GeometryError(f"{name} must be a positive integer, got {value}")
    return int(value)


def _pair(value: Any, name: str, kind: type) -> tuple:
    if np.isscalar(value):
        value = (value, value)
    value = tuple(value)
    if len(value) != 2:
        raise GeometryError(f"{name} must be (rows, cols), got {value}")
    return tuple(kind(v) for v in value)

"""Argument checks of the :class:`~dip_uq.laplace.Laplace` front door, run before any work: a
bad option, label or target raises ``ValueError`` naming it and the value, never a torch
error from deep inside a solve."""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

import torch

__all__ = [
    "count",
    "check_options",
    "check_labels",
    "check_targets",
    "warn_if_random_transform",
]


def count(name: str, value: Any, *, minimum: int = 1) -> int:
    """``value`` as an ``int >= minimum`` (bools, floats and strings are refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _positive(name: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not (math.isfinite(value) and value > 0)
    ):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def check_options(
    *,
    likelihood: str,
    likelihoods: Any,
    solver: str,
    prior_precision: float,
    sigma_noise: float,
    n_samples: int,
    chunk_size: int | None,
    newton_steps: int,
    curvature: str,
    generator: Any,
) -> None:
    """Every constructor option of ``Laplace`` except the model and the weight subset."""
    if likelihood not in likelihoods:
        raise ValueError(f"unknown likelihood {likelihood!r}; use 'regression' or 'classification'")
    if solver not in ("cg", "sgd", "exact"):
        raise ValueError(f"unknown solver {solver!r}; use 'cg', 'sgd' or 'exact'")
    _positive("prior_precision", prior_precision)
    _positive("sigma_noise", sigma_noise)
    count("n_samples", n_samples)
    if chunk_size is not None:
        count("chunk_size", chunk_size)
    count("newton_steps", newton_steps, minimum=0)
    if curvature not in ("network", "mode"):
        raise ValueError(f"unknown curvature {curvature!r}; use 'network' or 'mode'")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {generator!r}")


def check_labels(y: torch.Tensor) -> torch.Tensor:
    """Class labels as ``int64``: integer tensors only (a float label such as 2.29 would be
    truncated to a class without a word)."""
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(
            f"classification labels must be integer class indices (torch.long), got dtype "
            f"{y.dtype}; convert exact class numbers with y.long(), or use "
            "likelihood='regression' for real-valued targets"
        )
    return y.long()


def check_targets(y: torch.Tensor, f: torch.Tensor) -> None:
    """Regression targets must have the model output's shape (size-1 axes aside, so
    ``(B,)`` targets fit ``(B, 1)`` outputs): equal element counts are not enough."""
    squeeze = lambda s: (s[0], *(n for n in s[1:] if n != 1)) if len(s) else s  # noqa: E731
    if y.shape != f.shape and squeeze(tuple(y.shape)) != squeeze(tuple(f.shape)):
        raise ValueError(
            f"regression targets: expected shape {tuple(f.shape)} (the model output), got "
            f"{tuple(y.shape)}"
        )


def warn_if_random_transform(loader: Any) -> None:
    """Warn when the loader's dataset has a transform: random augmentation makes the passes
    over the data disagree."""
    ds = getattr(loader, "dataset", None)
    for attr in ("transform", "transforms"):
        if getattr(ds, attr, None) is not None:
            warnings.warn(
                f"the loader's dataset has a {attr!r}: if it augments at random, the features "
                "are non-deterministic and the curvature, noise and EM statistics of different "
                "passes disagree; fit on an augmentation-free loader",
                stacklevel=3,
            )
            return

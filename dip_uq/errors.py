"""The package's error types, in one place: every layer raises these (never a bare
``Exception``), and the command line turns them into one-line messages."""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "DataFormatError",
    "GeometryFileError",
    "CheckpointError",
    "NonFiniteError",
    "require_finite",
]


class DataFormatError(ValueError):
    """A data file is missing, unreadable or not in the expected layout; the message names
    the file and the problem."""


class GeometryFileError(ValueError):
    """A geometry file is malformed; the message names the file, the section and the key."""


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, or does not match what is being resumed."""


class NonFiniteError(FloatingPointError):
    """NaN or infinite values appeared in a stage of a computation (``stage`` names it)."""

    def __init__(self, message: str, *, stage: str | None = None) -> None:
        super().__init__(message)
        self.stage = stage


def require_finite(t: Any, what: str) -> None:
    """Raise ``ValueError("{what} contains N NaN or infinite values (of M)")`` when the
    tensor ``t`` is not finite everywhere: an input check run before any work."""
    bad = ~torch.isfinite(t)
    if bad.any():
        raise ValueError(
            f"{what} contains {int(bad.sum())} NaN or infinite values (of {t.numel()})"
        )

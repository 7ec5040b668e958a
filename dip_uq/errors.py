"""The package's error types, in one place: every layer raises these (never a bare
``Exception``), and the command line turns them into one-line messages."""

from __future__ import annotations

__all__ = [
    "DataFormatError",
    "GeometryFileError",
    "CheckpointError",
    "NonFiniteError",
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

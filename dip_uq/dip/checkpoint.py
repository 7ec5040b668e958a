"""Atomic save/load of training state (generic: any dict of tensors and plain Python data).

A checkpoint is written to a temporary file in the target directory, flushed and fsynced,
then moved over the final name with ``os.replace`` (atomic on POSIX and Windows). A crash or
interrupt while writing therefore leaves the previous checkpoint intact: a completed
checkpoint is never lost or half-overwritten.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

__all__ = [
    "CheckpointError",
    "atomic_save",
    "atomic_write_bytes",
    "atomic_write_text",
    "load_checkpoint",
    "clone_state",
]


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, or does not match what is being resumed."""


def _atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (temp file + fsync + ``os.replace``)."""
    return _atomic(path, lambda fh: torch.save(obj, fh))


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return _atomic(path, lambda fh: fh.write(data))


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(text.encode("utf-8"), path)


def load_checkpoint(path: str | os.PathLike, *, map_location: Any = "cpu") -> dict:
    """Load a checkpoint written by :func:`atomic_save`; errors name the file and problem.

    Only tensors and plain containers are allowed (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for damaged files
        raise CheckpointError(
            f"{path}: cannot read checkpoint (corrupt or not a dip-uq checkpoint): {err}"
        ) from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    return obj


def clone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached copies of a ``state_dict`` (so later in-place updates cannot change it)."""
    return {k: v.detach().clone() for k, v in state.items()}

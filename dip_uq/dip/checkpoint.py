"""Atomic save/load of training state (generic: any dict of tensors and plain Python data).

Checkpoints are written with :mod:`dip_uq.io.atomic` (temporary file, fsync, ``os.replace``):
a crash or interrupt while writing leaves the previous checkpoint intact, so a completed
checkpoint is never lost or half-overwritten.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..io.atomic import atomic_torch_save

__all__ = ["CheckpointError", "atomic_save", "load_checkpoint", "clone_state"]


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (:mod:`dip_uq.io.atomic`)."""
    return atomic_torch_save(obj, path)


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

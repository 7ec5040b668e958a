"""Exceptions of the operator layer."""

from __future__ import annotations


class BackendUnavailable(RuntimeError):
    """A projector backend cannot run here (no CUDA, module missing, unsupported geometry).

    Raised before any native call, so that nothing can crash the Python process.
    """


class GeometryError(ValueError):
    """A geometry is inconsistent, or does not fit the volume or the data it is used with."""

"""dip-uq's physics layer: CT geometries, differentiable ray transforms and their helpers.

This package never imports ``dip_uq``; anything with ``A(x)`` and ``A.T(y)`` can stand in for
a ``RayTransform`` in the layers above.
"""

from . import analytic, noise, phantoms, testing  # submodules as attributes
from .analytic import analytic_reconstruction, fbp, fdk
from .base import LinearOperator, OperatorBase, check_operator
from .errors import BackendUnavailable, GeometryError
from .geometry import (
    ConeBeam3D,
    ConeVec3D,
    FanBeam2D,
    Parallel2D,
    Parallel3D,
    ParallelVec3D,
    ProjectionGeometry,
    VolumeGeometry,
    uniform_angles,
)
from .geometry_check import check_geometry_fits
from .linear import MatrixOperator
from .transform import RayTransform

__all__ = [
    "BackendUnavailable",
    "GeometryError",
    "VolumeGeometry",
    "ProjectionGeometry",
    "Parallel2D",
    "FanBeam2D",
    "Parallel3D",
    "ConeBeam3D",
    "ParallelVec3D",
    "ConeVec3D",
    "uniform_angles",
    "check_geometry_fits",
    "RayTransform",
    "LinearOperator",
    "OperatorBase",
    "check_operator",
    "MatrixOperator",
    "analytic",
    "noise",
    "phantoms",
    "testing",
    "fbp",
    "fdk",
    "analytic_reconstruction",
]

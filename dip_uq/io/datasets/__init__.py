"""Loaders for public CT data sets (Walnut, LoDoPaB, KMNIST) and for the real slices that ship
with our dependencies (:mod:`.samples`). They read local files only: nothing here downloads
anything (see ``data/scripts/`` for download recipes)."""

from .kmnist import kmnist_operator, load_images, read_idx
from .lodopab import (
    LODOPAB_MU_MAX,
    LODOPAB_N0,
    LoDoPaB,
    lodopab_geometry,
    lodopab_noise,
    lodopab_operator,
)
from .walnut import (
    WALNUT_DETECTOR_SHAPE,
    WALNUT_VOLUME,
    MatrixOperator,
    WalnutProjections,
    WalnutSlice,
    closest_rows,
    load_walnut_ground_truth,
    load_walnut_projections,
    max_fraction_rows,
    read_walnut_geometry,
    resample_detector,
    walnut_orient,
    walnut_slice_problem,
)

__all__ = [
    "kmnist_operator",
    "load_images",
    "read_idx",
    "LODOPAB_MU_MAX",
    "LODOPAB_N0",
    "LoDoPaB",
    "lodopab_geometry",
    "lodopab_noise",
    "lodopab_operator",
    "WALNUT_DETECTOR_SHAPE",
    "WALNUT_VOLUME",
    "MatrixOperator",
    "WalnutProjections",
    "WalnutSlice",
    "closest_rows",
    "max_fraction_rows",
    "load_walnut_ground_truth",
    "load_walnut_projections",
    "read_walnut_geometry",
    "resample_detector",
    "walnut_orient",
    "walnut_slice_problem",
]

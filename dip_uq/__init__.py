"""dip-uq: CT reconstruction with the deep image prior and a calibrated voxelwise uncertainty
map from the linearised Laplace approximation."""

from .uq.config import UQConfig
from .uq.pipeline import reconstruct_with_uncertainty
from .uq.result import UQResult

__all__ = ["reconstruct_with_uncertainty", "UQConfig", "UQResult"]

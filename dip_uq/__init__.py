"""dip-uq: CT reconstruction with the deep image prior and voxelwise uncertainty from the
linearised Laplace approximation."""

from .uq.pipeline import reconstruct_with_uncertainty
from .uq.result import UQResult

__all__ = ["reconstruct_with_uncertainty", "UQResult"]

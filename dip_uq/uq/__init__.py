"""The CT-uncertainty wing: the one-call pipeline and its stages, its configuration and result,
the image-space noise term, calibration on held-out views, evaluation against a ground truth,
baselines and the TV-PredCP hyperprior (docs/uncertainty.md, docs/methods.md §5-6)."""

from .calibration import HeldOutCalibration, calibrate_on_heldout, split_heldout
from .config import DIPConfig, UQConfig
from .evaluation import backprojected_noise_delta, discrepancy_rank, evaluate_uq
from .noise_term import NoiseTerm, image_noise_term
from .pipeline import reconstruct_with_uncertainty
from .result import UQResult

__all__ = [
    "reconstruct_with_uncertainty",
    "UQConfig",
    "DIPConfig",
    "UQResult",
    "NoiseTerm",
    "image_noise_term",
    "HeldOutCalibration",
    "calibrate_on_heldout",
    "split_heldout",
    "evaluate_uq",
    "discrepancy_rank",
    "backprojected_noise_delta",
]

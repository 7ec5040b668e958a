"""The CT-uncertainty wing: the image-space noise term of the predictive and the
calibration on held-out projection views (``docs/methods.md`` §6)."""

from .noise_term import NoiseTerm, image_noise_term

__all__ = ["NoiseTerm", "image_noise_term"]

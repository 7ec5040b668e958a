"""Deep image prior for CT: U-Nets, total variation, training (no posteriors here)."""

from .tv import tv, tv_subgradient
from .unet import PRESETS, UNet, UNetConfig, build_unet, conv_weight_count, mc_dropout_samples

__all__ = [
    "UNet",
    "UNetConfig",
    "PRESETS",
    "build_unet",
    "conv_weight_count",
    "mc_dropout_samples",
    "tv",
    "tv_subgradient",
]

"""Deep image prior for CT: U-Nets, total variation, training (no posteriors here)."""

from .checkpoint import CheckpointError, atomic_save, load_checkpoint
from .pretrain import PretrainResult, load_pretrained, pretrain_edip, save_pretrained
from .trainer import DIPResult, HeldOutStopping, VarianceStopping, fit_dip, initial_input
from .tv import tv, tv_subgradient
from .unet import (
    PRESETS,
    UNet,
    UNetConfig,
    build_unet,
    conv_weight_count,
    mc_dropout_samples,
    preset_config,
)

__all__ = [
    "fit_dip",
    "DIPResult",
    "VarianceStopping",
    "HeldOutStopping",
    "initial_input",
    "pretrain_edip",
    "PretrainResult",
    "save_pretrained",
    "load_pretrained",
    "atomic_save",
    "load_checkpoint",
    "CheckpointError",
    "UNet",
    "UNetConfig",
    "PRESETS",
    "preset_config",
    "build_unet",
    "conv_weight_count",
    "mc_dropout_samples",
    "tv",
    "tv_subgradient",
]

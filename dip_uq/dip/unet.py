"""The deep-image-prior U-Net for 2D images and 3D volumes (methods.md, Section 5).

Architecture (``C_k`` = channels at scale ``k``, ``s_k`` = skip width, ``[GN]`` optional
GroupNorm with one group, every activation LeakyReLU(0.2)):

* ``inc``      3x3 conv ``in -> C_0`` [GN] LReLU
* ``down.i``   3x3 conv stride 2 ``C_i -> C_{i+1}`` [GN] LReLU, 3x3 conv ``C_{i+1} -> C_{i+1}``
  [GN] LReLU (``i = 0 .. scales-2``)
* ``up.i``     upsample x2 (bilinear / trilinear, ``align_corners=True``, to the size of the
  skip feature) from scale ``k = scales-1-i`` to ``k-1``, concatenate the skip branch, 3x3
  conv ``C_k + s_k -> C_{k-1}`` [GN] LReLU, 3x3 conv ``C_{k-1} -> C_{k-1}`` [GN] LReLU
* ``skip.i``   the skip branch of ``up.i``: 1x1 conv ``C_{k-1} -> s_k`` [GN] LReLU applied to
  the features of scale ``k-1``. ``s_k = 0`` means no skip: neither the branch nor any input
  channel for it exists, so no weight ever sees a constant zero channel.
* ``outc``     1x1 conv ``C_0 -> out``, then optionally ``sigmoid(clamp(., -15, 15))``.

``skip_channels`` has one entry per scale, as in the published configurations; entry ``k``
(``k >= 1``) is the skip width of the up block that leaves scale ``k``; entry 0 belongs to no
up block and must be 0.

Presets. ``small``: 3 scales, 32 channels, skips ``[0, 4, 4]``, sigmoid, no GN. Its conv
weights (biases excluded) count
``inc 1*32*9 = 288`` + ``down 2*(2*32*32*9) = 36864`` + ``up 2*((32+4)*32*9 + 32*32*9) = 39168``
+ ``skip 2*(32*4) = 256`` + ``outc 32 = 32`` = **76,608**, which is the number in the paper.
``large``: 6 scales, 128 channels, skips ``[0, 0, 0, 0, 4, 4]``, GN, no sigmoid.

Parameter names identify blocks by prefix (``inc.``, ``down.0.``, ``up.1.``, ``skip.1.``,
``outc.``): :meth:`UNet.blocks` lists them. An MC-dropout variant (``dropout > 0``) puts
dropout after every 3x3 conv block (after its activation) for the DIP-MCDO baseline.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "UNetConfig",
    "UNet",
    "PRESETS",
    "preset_config",
    "build_unet",
    "conv_weight_count",
    "mc_dropout_samples",
]

_SIGMOID_CLAMP = 15.0


@dataclass(frozen=True)
class UNetConfig:
    """Everything needed to rebuild a :class:`UNet` (stored in checkpoints).

    Args:
        ndim: 2 (images ``(B, C, H, W)``) or 3 (volumes ``(B, C, D, H, W)``).
        channels: channels per scale; entry 0 is the full-resolution scale, entry ``k`` the
            scale downsampled ``k`` times.
        skip_channels: skip width per scale (see module docstring), ``0`` = no skip.
        use_sigmoid: apply ``sigmoid(clamp(out, -15, 15))`` to the output.
        use_norm: GroupNorm (one group) after every conv except ``outc``.
        in_channels / out_channels: input and output channels.
        dropout: MC-dropout probability after every 3x3 conv block (0 = plain DIP).
    """

    ndim: int = 2
    channels: tuple[int, ...] = (32, 32, 32)
    skip_channels: tuple[int, ...] = (0, 4, 4)
    use_sigmoid: bool = True
    use_norm: bool = False
    in_channels: int = 1
    out_channels: int = 1
    dropout: float = 0.0
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "skip_channels", tuple(int(s) for s in self.skip_channels))
        if self.ndim not in (2, 3):
            raise ValueError(f"UNet ndim must be 2 or 3, got {self.ndim}")
        if len(self.channels) < 1:
            raise ValueError("UNet needs at least one scale (channels is empty)")
        if len(self.skip_channels) != len(self.channels):
            raise ValueError(
                f"skip_channels needs one entry per scale: {len(self.channels)} scales, "
                f"got {len(self.skip_channels)} entries {self.skip_channels}"
            )
        if any(c < 1 for c in self.channels):
            raise ValueError(f"channels must be positive, got {self.channels}")
        if any(s < 0 for s in self.skip_channels):
            raise ValueError(f"skip_channels must be >= 0, got {self.skip_channels}")
        if self.skip_channels[0] != 0:
            raise ValueError(
                f"skip_channels[0] belongs to no up block and must be 0, got {self.skip_channels}"
            )
        if self.in_channels < 1 or self.out_channels < 1:
            raise ValueError("in_channels and out_channels must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def scales(self) -> int:
        return len(self.channels)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        d["channels"] = list(self.channels)
        d["skip_channels"] = list(self.skip_channels)
        return d


def _preset(name: str, ndim: int) -> UNetConfig:
    if name == "small":
        return UNetConfig(ndim=ndim, channels=(32,) * 3, skip_channels=(0, 4, 4), use_sigmoid=True)
    if name == "large":
        return UNetConfig(
            ndim=ndim,
            channels=(128,) * 6,
            skip_channels=(0, 0, 0, 0, 4, 4),
            use_sigmoid=False,
            use_norm=True,
        )
    raise ValueError(f"unknown UNet preset {name!r}; choose one of {sorted(PRESETS)}")


PRESETS = ("small", "large")


def preset_config(name: str, *, ndim: int = 2, **overrides) -> UNetConfig:
    """The config of preset ``name`` with ``overrides`` replacing fields, e.g.
    ``preset_config("small", use_sigmoid=False)`` for a linear output."""
    cfg = _preset(name, ndim)
    return UNetConfig(**{**cfg.to_dict(), **overrides}) if overrides else cfg


class _MCDropout(nn.Module):
    """Element-wise dropout drawing its masks from ``self.generator`` (deterministic under a
    seed); active in training mode or when ``self.always_on`` is set (MC sampling)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)
        self.generator: torch.Generator | None = None
        self.always_on = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not (self.training or self.always_on):
            return x
        g = self.generator
        dev = g.device if g is not None else x.device  # masks drawn where the generator lives
        keep = torch.empty(x.shape, dtype=x.dtype, device=dev).bernoulli_(1.0 - self.p, generator=g)
        return x * keep.to(x.device) / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class _Conv3d(nn.Conv3d):
    """``nn.Conv3d`` (same parameters and names) that, on CPU with few input channels,
    computes a 3x3x3 convolution as three 2D convolutions over depth-shifted slices.

    PyTorch's CPU conv3d falls back to a slow unfused kernel for small channel counts
    (slower than this decomposition at few channels; see benchmarks/README.md); with more
    channels its fused kernel wins, so it is used there. The result is the same map up to
    float rounding: ``out[:, :, d] = sum_dz conv2d(x_pad[:, :, s*d + dz], w[:, :, dz])``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or self.kernel_size != (3, 3, 3) or not 2 <= x.shape[1] < 24:
            return super().forward(x)
        b, c, d = x.shape[:3]
        s = self.stride[0]
        xp = F.pad(x, (0, 0, 0, 0, 1, 1))
        d_out = (d - 1) // s + 1
        out = None
        for dz in range(3):
            sl = xp[:, :, dz : dz + s * (d_out - 1) + 1 : s]
            sl = sl.transpose(1, 2).reshape(b * d_out, c, *x.shape[3:])
            o = F.conv2d(sl, self.weight[:, :, dz], None, stride=self.stride[1:], padding=1)
            out = o if out is None else out + o
        out = out.reshape(b, d_out, self.out_channels, *out.shape[2:]).transpose(1, 2)
        return out + self.bias.view(1, -1, 1, 1, 1)


class _ConvAct(nn.Sequential):
    """conv -> [GroupNorm] -> LeakyReLU(0.2) [-> dropout]; the conv is named ``conv``."""

    def __init__(
        self,
        ndim: int,
        cin: int,
        cout: int,
        kernel: int,
        stride: int,
        norm: bool,
        dropout: float,
    ) -> None:
        conv_cls = nn.Conv2d if ndim == 2 else _Conv3d
        layers: dict[str, nn.Module] = {
            "conv": conv_cls(cin, cout, kernel, stride=stride, padding=kernel // 2)
        }
        if norm:
            layers["norm"] = nn.GroupNorm(1, cout)
        layers["act"] = nn.LeakyReLU(0.2)
        if dropout > 0 and kernel == 3:
            layers["dropout"] = _MCDropout(dropout)
        super().__init__(OrderedDict(layers))


class _Down(nn.Module):
    def __init__(self, ndim: int, cin: int, cout: int, norm: bool, dropout: float) -> None:
        super().__init__()
        self.conv1 = _ConvAct(ndim, cin, cout, 3, 2, norm, dropout)
        self.conv2 = _ConvAct(ndim, cout, cout, 3, 1, norm, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class _Up(nn.Module):
    def __init__(
        self, ndim: int, cin: int, skip: int, cout: int, norm: bool, dropout: float
    ) -> None:
        super().__init__()
        self.mode = "bilinear" if ndim == 2 else "trilinear"
        self.conv1 = _ConvAct(ndim, cin + skip, cout, 3, 1, norm, dropout)
        self.conv2 = _ConvAct(ndim, cout, cout, 3, 1, norm, dropout)

    def forward(
        self, x: torch.Tensor, skip: torch.Tensor | None, size: Sequence[int]
    ) -> torch.Tensor:
        x = F.interpolate(x, size=tuple(size), mode=self.mode, align_corners=True)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class UNet(nn.Module):
    """The DIP U-Net (see the module docstring for the exact layout).

    Input ``(B, in_channels, *spatial)`` with ``spatial`` = ``(H, W)`` or ``(D, H, W)``; any
    size works (odd sizes too: upsampling targets the skip feature's size). Output
    ``(B, out_channels, *spatial)``.

    Args:
        config: a :class:`UNetConfig`, or build one from keyword arguments.
        generator: seeds the weight initialisation (PyTorch's default conv init, drawn from
            this generator so construction is deterministic).
    """

    def __init__(
        self,
        config: UNetConfig | None = None,
        *,
        generator: torch.Generator | None = None,
        **kwargs,
    ) -> None:
        super().__init__()
        if config is None:
            config = UNetConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a UNetConfig or keyword arguments, not both")
        self.config = config
        c, s, nd = config.channels, config.skip_channels, config.ndim
        norm, p = config.use_norm, config.dropout
        self.inc = _ConvAct(nd, config.in_channels, c[0], 3, 1, norm, p)
        self.down = nn.ModuleList(
            _Down(nd, c[i], c[i + 1], norm, p) for i in range(config.scales - 1)
        )
        self.up = nn.ModuleList()
        self.skip = nn.ModuleDict()
        for i in range(config.scales - 1):
            k = config.scales - 1 - i  # the up block leaves scale k for scale k-1
            self.up.append(_Up(nd, c[k], s[k], c[k - 1], norm, p))
            if s[k] > 0:
                self.skip[str(i)] = _ConvAct(nd, c[k - 1], s[k], 1, 1, norm, 0.0)
        conv_cls = nn.Conv2d if nd == 2 else nn.Conv3d
        self.outc = conv_cls(c[0], config.out_channels, 1)
        self.reset_parameters(generator)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_preset(
        cls,
        name: str,
        *,
        ndim: int = 2,
        generator: torch.Generator | None = None,
        **overrides,
    ) -> UNet:
        """``small`` or ``large`` (see module docstring); ``overrides`` replace config fields,
        e.g. ``dropout=0.05`` for the MC-dropout variant."""
        return cls(preset_config(name, ndim=ndim, **overrides), generator=generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """PyTorch's default conv initialisation (Kaiming-uniform with ``a = sqrt(5)``,
        bias ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``), drawn from ``generator``."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Conv3d):
                fan_in = m.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in)  # = gain(a=sqrt 5) * sqrt(3 / fan_in)
                m.weight.uniform_(-bound, bound, generator=generator)
                m.bias.uniform_(-bound, bound, generator=generator)
            elif isinstance(m, nn.GroupNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()

    # ------------------------------------------------------------------ forward
    def pre_activation(self, z: torch.Tensor) -> torch.Tensor:
        """The ``outc`` output before the optional sigmoid (the linearisation point)."""
        cfg = self.config
        if z.ndim != cfg.ndim + 2 or z.shape[1] != cfg.in_channels:
            spatial = "H, W" if cfg.ndim == 2 else "D, H, W"
            raise ValueError(
                f"UNet input must have shape (B, {cfg.in_channels}, {spatial}), "
                f"got {tuple(z.shape)}"
            )
        feats = [self.inc(z)]
        for block in self.down:
            feats.append(block(feats[-1]))
        x = feats[-1]
        for i, block in enumerate(self.up):
            target = feats[cfg.scales - 2 - i]
            branch = self.skip[str(i)](target) if str(i) in self.skip else None
            x = block(x, branch, target.shape[2:])
        return self.outc(x)

    def activation(self, t: torch.Tensor) -> torch.Tensor:
        """Output nonlinearity: ``sigmoid(clamp(t, -15, 15))`` or the identity."""
        if self.config.use_sigmoid:
            return torch.sigmoid(t.clamp(-_SIGMOID_CLAMP, _SIGMOID_CLAMP))
        return t

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.activation(self.pre_activation(z))

    @torch.no_grad()
    def saturated_fraction(self, z: torch.Tensor, *, slope: float = 1e-4) -> float:
        """Fraction of output voxels where the output's slope d out / d t is below ``slope``
        (0 without the sigmoid). There the sigmoid, σ'(t) = σ(t)(1 − σ(t)) ≤ 1e-4 for
        |t| ≥ 9.2 and exactly 0 beyond the ±15 clamp, passes no gradient: the DIP cannot
        move those voxels (a small feature pushed there early is lost for good) and the
        linearised model gives them zero variance."""
        if not self.config.use_sigmoid:
            return 0.0
        t = self.pre_activation(z)
        s = torch.sigmoid(t.clamp(-_SIGMOID_CLAMP, _SIGMOID_CLAMP))
        flat = (s * (1 - s) < slope) | (t.abs() >= _SIGMOID_CLAMP)
        return float(flat.double().mean())

    # ------------------------------------------------------------------ introspection
    def blocks(self) -> dict[str, list[str]]:
        """Conv weight names grouped by block prefix, e.g. ``{"inc": ["inc.conv.weight"],
        "down.0": [...], "up.0": [...], "skip.0": [...], "outc": ["outc.weight"]}``."""
        out: dict[str, list[str]] = {}
        for name, m in self.named_modules():
            if isinstance(m, nn.Conv2d | nn.Conv3d):
                parts = name.split(".")
                prefix = parts[0] if parts[0] in ("inc", "outc") else ".".join(parts[:2])
                out.setdefault(prefix, []).append(f"{name}.weight")
        return out

    def conv_weights(self) -> dict[str, nn.Parameter]:
        """All conv weights (biases and norm parameters excluded), by parameter name."""
        return {
            f"{n}.weight": m.weight
            for n, m in self.named_modules()
            if isinstance(m, nn.Conv2d | nn.Conv3d)
        }

    def dropout_layers(self) -> list[_MCDropout]:
        return [m for m in self.modules() if isinstance(m, _MCDropout)]


def build_unet(
    net: str | UNetConfig | dict | UNet | None,
    *,
    ndim: int,
    generator: torch.Generator | None = None,
) -> UNet:
    """A preset name, a config (object or dict), or a ready network (returned as is);
    ``None`` means the ``small`` preset."""
    if isinstance(net, nn.Module):
        return net
    if net is None:
        net = "small"
    if isinstance(net, str):
        return UNet.from_preset(net, ndim=ndim, generator=generator)
    if isinstance(net, dict):
        net = UNetConfig(**{"ndim": ndim, **net})
    if isinstance(net, UNetConfig):
        if net.ndim != ndim:
            raise ValueError(f"UNet config is {net.ndim}D but the problem is {ndim}D")
        return UNet(net, generator=generator)
    raise TypeError(f"net must be a preset name, UNetConfig, dict or nn.Module, got {type(net)}")


def conv_weight_count(net: nn.Module) -> int:
    """Number of conv weights (biases excluded): the parameters the Laplace prior covers."""
    return sum(m.weight.numel() for m in net.modules() if isinstance(m, nn.Conv2d | nn.Conv3d))


@torch.no_grad()
def mc_dropout_samples(
    net: UNet,
    z: torch.Tensor,
    n_samples: int,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``n_samples`` stochastic forward passes with dropout on (DIP-MCDO), shape
    ``(n_samples, *net(z).shape)``. Other layers run in eval mode."""
    layers = net.dropout_layers()
    if not layers:
        raise ValueError("the network has no dropout layers: build it with dropout > 0")
    if int(n_samples) < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    was_training = net.training
    saved = [(m.generator, m.always_on) for m in layers]
    net.eval()
    try:
        for m in layers:
            m.generator, m.always_on = generator, True
        return torch.stack([net(z) for _ in range(int(n_samples))])
    finally:
        for m, (g, on) in zip(layers, saved):
            m.generator, m.always_on = g, on
        net.train(was_training)

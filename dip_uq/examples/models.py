"""Example networks: an MLP, a small CNN for 8×8 digits, and a ResNet-18-shaped network
(BasicBlocks with BatchNorm, [2, 2, 2, 2] stages, configurable width) for 32×32 images."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["MLP", "SmallCNN", "ResNet18ish", "train"]


class MLP(nn.Module):
    """``(B, n_in) -> (B, n_out)``: Linear layers with tanh between them."""

    def __init__(self, n_in: int, n_out: int, hidden: tuple[int, ...] = (50,)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = n_in
        for h in hidden:
            layers += [nn.Linear(width, h), nn.Tanh()]
            width = h
        layers.append(nn.Linear(width, n_out))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class SmallCNN(nn.Module):
    """``(B, 1, 8, 8) -> (B, n_out)``: two 3×3 convs (ReLU, 2×2 max-pool after the second) and
    a linear head."""

    def __init__(self, n_out: int = 10, channels: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.head = nn.Linear(channels * 16, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        h = torch.max_pool2d(torch.relu(self.conv2(h)), 2)
        return self.head(h.flatten(1))


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short = None
        if stride != 1 or c_in != c_out:
            self.short = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return torch.relu(h + (x if self.short is None else self.short(x)))


class ResNet18ish(nn.Module):
    """ResNet-18 layout for small images: 3×3 stem conv + BN, four stages of two BasicBlocks
    (widths w, 2w, 4w, 8w; strides 1, 2, 2, 2), global average pool, linear head.
    ``width=64`` is the CIFAR ResNet-18 (11M parameters); tests use ``width=4``."""

    def __init__(self, n_classes: int = 10, width: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        stages, c = [], width
        for i, mult in enumerate((1, 2, 4, 8)):
            out = width * mult
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(_BasicBlock(c, out, stride), _BasicBlock(out, out, 1)))
            c = out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(c, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stages(self.stem(x))
        return self.head(h.mean(dim=(2, 3)))


def train(
    model: nn.Module,
    loader: Iterable,
    loss: str,
    *,
    epochs: int = 100,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> nn.Module:
    """MAP training with Adam (``loss``: ``"ce"`` or ``"mse"``); returns the model in eval mode."""
    torch.manual_seed(seed)
    fn = nn.CrossEntropyLoss() if loss == "ce" else nn.MSELoss()
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            fn(model(x), y).backward()
            opt.step()
    return model.eval()

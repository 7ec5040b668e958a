"""Offline data for the examples: scikit-learn's digits (1797 8×8 images, 10 classes) and
diabetes (442 × 10 features, one target), standardised and split; synthetic 32×32 images."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["digits_loaders", "diabetes_loaders", "synthetic_images"]


def _split(n: int, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * n))
    return perm[n_test:], perm[:n_test]


def digits_loaders(
    batch_size: int = 128,
    *,
    images: bool = False,
    test_fraction: float = 0.3,
    seed: int = 0,
    n_train: int | None = None,
    label_noise: float = 0.0,
) -> tuple[DataLoader, DataLoader, tuple[torch.Tensor, torch.Tensor]]:
    """Digits as ``(B, 64)`` features (or ``(B, 1, 8, 8)`` images) scaled to [0, 1], labels
    ``(B,)``. Returns (train loader shuffled, train loader in order for fitting, test tensors).

    ``label_noise`` = q: every label (train and test alike, so the test split is a held-out
    sample of the same noisy data set) is replaced with probability q by a class drawn
    uniformly at random (seeded by ``seed``); an unregularised network memorises the noise and is
    overconfident on held-out data."""
    from sklearn.datasets import load_digits

    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1], got {label_noise}")
    ds = load_digits()
    x = torch.tensor(ds.data, dtype=torch.float32) / 16.0
    y = torch.tensor(ds.target, dtype=torch.long)
    if label_noise > 0:
        g = torch.Generator().manual_seed(10_000 + seed)
        flip = torch.rand(len(y), generator=g) < label_noise
        y[flip] = torch.randint(10, (int(flip.sum()),), generator=g)
    if images:
        x = x.reshape(-1, 1, 8, 8)
    tr, te = _split(len(y), test_fraction, seed)
    if n_train is not None:
        tr = tr[:n_train]
    train = TensorDataset(x[tr], y[tr])
    return (
        DataLoader(train, batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)),
        DataLoader(train, batch_size, shuffle=False),
        (x[te], y[te]),
    )


def diabetes_loaders(
    batch_size: int = 64, *, test_fraction: float = 0.3, seed: int = 0
) -> tuple[DataLoader, DataLoader, tuple[torch.Tensor, torch.Tensor]]:
    """Diabetes features ``(B, 10)`` and targets ``(B, 1)``, both standardised with training
    statistics. Returns (train shuffled, train in order, test tensors)."""
    from sklearn.datasets import load_diabetes

    ds = load_diabetes()
    x = torch.tensor(ds.data, dtype=torch.float32)
    y = torch.tensor(ds.target, dtype=torch.float32)[:, None]
    tr, te = _split(len(y), test_fraction, seed)
    mx, sx = x[tr].mean(0), x[tr].std(0)
    my, sy = y[tr].mean(0), y[tr].std(0)
    x, y = (x - mx) / sx, (y - my) / sy
    train = TensorDataset(x[tr], y[tr])
    return (
        DataLoader(train, batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)),
        DataLoader(train, batch_size, shuffle=False),
        (x[te], y[te]),
    )


def synthetic_images(
    n: int, n_classes: int, size: int = 32, channels: int = 3, seed: int = 0
) -> TensorDataset:
    """``n`` images ``(channels, size, size)``: a class-dependent mean pattern plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(n_classes, (n,), generator=g)
    patterns = torch.randn(n_classes, channels, size, size, generator=g)
    x = 0.5 * patterns[y] + torch.randn(n, channels, size, size, generator=g)
    return TensorDataset(x, y)

"""Streaming statistics of samples and a resumable sample bank.

:class:`Welford` accumulates mean, variance and second moment of any tensor-valued functional
of samples (e.g. J z, an image per sample) batch by batch (Chan et al.'s parallel update), so
an image-sized variance map never needs all samples in memory. Accumulators ``merge`` (sum
statistics across shards, e.g. after ``torch.distributed`` all-gather).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..io.atomic import atomic_torch_save

__all__ = ["Welford", "SampleBank"]


class Welford:
    """Running count, mean, M2 (sum of squared deviations) and raw second moment."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None
        self.sq: torch.Tensor | None = None  # running mean of x²

    def update(self, batch: torch.Tensor) -> Welford:
        """Add samples ``batch`` of shape ``(K, *shape)`` (leading dim = samples)."""
        batch = batch.detach()
        if not torch.all(torch.isfinite(batch)):
            raise ValueError("Welford.update: samples contain NaN or inf")
        k = batch.shape[0]
        if k == 0:
            return self
        b_mean = batch.mean(0)
        b_m2 = ((batch - b_mean) ** 2).sum(0)
        b_sq = (batch**2).mean(0)
        self._combine(k, b_mean, b_m2, b_sq)
        return self

    def _combine(self, k, b_mean, b_m2, b_sq) -> None:
        if self.mean is None:
            self.count, self.mean, self.m2, self.sq = k, b_mean.clone(), b_m2.clone(), b_sq.clone()
            return
        if b_mean.shape != self.mean.shape:
            raise ValueError(
                f"Welford: expected sample shape {tuple(self.mean.shape)}, got {tuple(b_mean.shape)}"
            )
        n = self.count + k
        delta = b_mean - self.mean
        self.mean = self.mean + delta * (k / n)
        self.m2 = self.m2 + b_m2 + delta**2 * (self.count * k / n)
        self.sq = self.sq + (b_sq - self.sq) * (k / n)
        self.count = n

    def merge(self, other: Welford) -> Welford:
        """Combine another accumulator's statistics into this one."""
        if other.mean is not None:
            self._combine(other.count, other.mean, other.m2, other.sq)
        return self

    def variance(self, unbiased: bool = True) -> torch.Tensor:
        """Sample variance about the running mean."""
        if self.mean is None or self.count < (2 if unbiased else 1):
            raise ValueError("Welford: not enough samples for a variance")
        return self.m2 / (self.count - 1 if unbiased else self.count)

    def second_moment(self) -> torch.Tensor:
        """mean(x²): the variance estimator for samples known to have zero mean (docs/methods.md §6)."""
        if self.mean is None:
            raise ValueError("Welford: no samples")
        return self.sq

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2, "sq": self.sq}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2, self.sq = (
            state["count"],
            state["mean"],
            state["m2"],
            state["sq"],
        )


class SampleBank:
    """Stores weight samples ``(K, d)`` in chunks; saved atomically and resumable.

    ``path`` (optional) is where :meth:`save` writes; :meth:`load` restores a bank.
    """

    def __init__(self, d: int, path: str | os.PathLike | None = None) -> None:
        self.d = d
        self.path = Path(path) if path is not None else None
        self.chunks: list[torch.Tensor] = []
        self.meta: dict = {}

    def __len__(self) -> int:
        return sum(c.shape[0] for c in self.chunks)

    def add(self, samples: torch.Tensor) -> None:
        if samples.dim() != 2 or samples.shape[1] != self.d:
            raise ValueError(
                f"sample bank: expected samples of shape (K, {self.d}), got {tuple(samples.shape)}"
            )
        self.chunks.append(samples.detach().cpu())

    def samples(self) -> torch.Tensor:
        return torch.cat(self.chunks) if self.chunks else torch.empty(0, self.d)

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write atomically (temp file + ``os.replace``)."""
        path = Path(path) if path is not None else self.path
        if path is None:
            raise ValueError("sample bank: no path given")
        atomic_torch_save({"d": self.d, "samples": self.samples(), "meta": self.meta}, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> SampleBank:
        state = torch.load(path, weights_only=True)
        bank = cls(int(state["d"]), path)
        if state["samples"].shape[0]:
            bank.add(state["samples"])
        bank.meta = state.get("meta", {})
        return bank

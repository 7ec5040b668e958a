"""One deep-image-prior training run: its state, its step, its checkpoints (docs/methods.md §5).

:func:`~dip_uq.dip.trainer.fit_dip` validates its arguments and builds a :class:`DIPRun`;
the run holds everything a checkpoint must carry (network, optimiser, input, loss history,
best iterate, stopping rule, generator), so that resuming reproduces an uninterrupted run
bit for bit on CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import CheckpointError, atomic_save, clone_state
from .tv import tv

__all__ = ["DIPResult", "DIPRun", "Settings"]

CHECKPOINT_FORMAT = "dip-uq/dip-checkpoint/1"


@dataclass
class DIPResult:
    """What :func:`fit_dip` returns.

    Attributes:
        image: the reconstruction at the best iterate, shape ``volume.shape`` (for an
            MC-dropout net: the training-mode output, one dropout draw; use
            ``mc_dropout_samples`` for the MC mean).
        net: the network with the best parameters loaded (eval mode).
        loss_history: training loss per iteration (float64, length ``iterations_run``).
        best_iteration: index of the lowest loss in ``loss_history``.
        best_loss: that loss.
        input: the fixed network input ``z0``, shape ``(1, 1, *volume.shape)``.
        iterations_run: iterations done (< ``iterations`` when stopped early).
        stopped_early: a callback or the stopping rule ended training.
        metrics: ``(iteration, psnr, ssim)`` rows, only when a ground truth was given.
        data_misfit: (1/d_y) ‖A image − y‖² at the best iterate, to hold against the noise
            variance σ_y²: far above it the fit is over-regularised or unfinished (a TV
            weight too large for the volume's size, docs/dip.md), far below it over-fitted.
    """

    image: torch.Tensor
    net: nn.Module
    loss_history: torch.Tensor
    best_iteration: int
    best_loss: float
    input: torch.Tensor
    iterations_run: int
    stopped_early: bool = False
    metrics: list[tuple[int, float, float]] = field(default_factory=list)
    data_misfit: float = math.nan


@dataclass(frozen=True)
class Settings:
    """The validated options of one run (``barrier``: (c, κ) or None when off)."""

    tv_weight: float
    lr: float
    iterations: int
    barrier: tuple[float, float] | None
    clip_grad_norm: float | None
    param_clamp: float | None
    checkpoint_every: int
    log_every: int


class DIPRun:
    """Adam on (1/d_y)‖A f(z₀; θ) − y‖² + γ TV(f) (+ the saturation barrier), tracking the
    best iterate (lowest loss, or the stopping rule's choice when it ``selects``)."""

    def __init__(
        self,
        operator: Any,
        y: torch.Tensor,
        model: nn.Module,
        z0: torch.Tensor,
        settings: Settings,
        *,
        stopping: Any = None,
        generator: torch.Generator | None = None,
        checkpoint: Path | None = None,
        ground_truth: torch.Tensor | None = None,
    ) -> None:
        self.operator, self.y, self.model, self.z0, self.s = operator, y, model, z0, settings
        self.stopping, self.generator, self.path, self.gt = (
            stopping,
            generator,
            checkpoint,
            ground_truth,
        )
        self.domain = tuple(operator.domain_shape)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(self.params, lr=settings.lr)
        self.selecting = bool(getattr(stopping, "selects", False))
        self.losses = torch.empty(settings.iterations, dtype=torch.float64)
        self.best_loss, self.best_it = math.inf, -1
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_image: torch.Tensor | None = None
        self.metrics: list[tuple[int, float, float]] = []
        self.stopped = False
        self.start = self.done = 0
        self._clamp()  # the constraint holds from the first evaluated iterate on

    # ---- checkpoints ------------------------------------------------------------------
    def restore(self, ck: dict) -> None:
        """Continue from a checkpoint whose data and settings were checked by the caller."""
        ours = list(self.s.barrier) if self.s.barrier is not None else None
        if ck.get("barrier") != ours:
            raise CheckpointError(
                f"{self.path}: cannot resume this run: saturation barrier {ours} vs "
                f"{ck.get('barrier')}"
            )
        self.model.load_state_dict(ck["net"])
        self.opt.load_state_dict(ck["optimizer"])
        self.z0 = ck["input"].to(device=self.y.device, dtype=self.y.dtype)
        self.start = self.done = int(ck["iteration"])
        self.losses[: self.start] = ck["losses"][: self.start]
        self.best_loss, self.best_it = float(ck["best_loss"]), int(ck["best_iteration"])
        self.best_state, self.best_image = ck["best_state"], ck["best_image"]
        self.metrics = [tuple(r) for r in ck["metrics"]]
        self.stopped = bool(ck["stopped"])
        if self.generator is not None and ck.get("generator") is not None:
            self.generator.set_state(ck["generator"])
        if self.stopping is not None and ck.get("stopping") is not None:
            self.stopping.load_state_dict(ck["stopping"])

    def save(self) -> None:
        """Write the whole state at ``self.done`` iterations (atomically)."""
        if self.path is None:
            return
        m, y = self.model, self.y
        atomic_save(
            {
                "format": CHECKPOINT_FORMAT,
                "net": m.state_dict(),
                "net_config": m.config.to_dict() if hasattr(m, "config") else None,
                "optimizer": self.opt.state_dict(),
                "input": self.z0,
                "iteration": self.done,
                "iterations": self.s.iterations,
                "losses": self.losses[: self.done].clone(),
                "best_loss": self.best_loss,
                "best_iteration": self.best_it,
                "best_state": self.best_state,
                "best_image": self.best_image,
                "metrics": [list(r) for r in self.metrics],
                "stopped": self.stopped,
                "generator": self.generator.get_state() if self.generator is not None else None,
                "stopping": self.stopping.state_dict() if self.stopping is not None else None,
                "tv_weight": self.s.tv_weight,
                "lr": self.s.lr,
                "barrier": list(self.s.barrier) if self.s.barrier is not None else None,
                "y_shape": list(y.shape),
                "y_checksum": float(y.double().sum()),
            },
            self.path,
        )

    # ---- training ---------------------------------------------------------------------
    def _clamp(self) -> None:
        if self.s.param_clamp is not None:
            with torch.no_grad():
                for p in self.params:
                    p.clamp_(-self.s.param_clamp, self.s.param_clamp)

    def loss(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The training loss and the image ``x`` (volume shape) at the current weights."""
        barrier = self.s.barrier
        if barrier is not None:
            t = self.model.pre_activation(self.z0)
            out = self.model.activation(t)
        else:
            out = self.model(self.z0)
        x = out.reshape(self.domain)
        loss = (self.operator(x) - self.y).pow(2).sum() / self.y.numel()
        if self.s.tv_weight > 0:
            loss = loss + self.s.tv_weight * tv(x, ndim=len(self.domain))
        if barrier is not None:
            excess = torch.relu(t.abs() - barrier[0])
            loss = loss + barrier[1] * excess.pow(2).mean()
        return loss, x

    def _non_finite(self, value: float, it: int, x: torch.Tensor) -> str:
        """What a non-finite loss came from: the operator's output or the training."""
        with torch.no_grad():
            if torch.isfinite(x).all() and not torch.isfinite(self.operator(x.detach())).all():
                return (
                    f"DIP loss became {value} at iteration {it}: the operator's output contains "
                    "NaN or infinite values for a finite image; check the operator"
                )
        return f"DIP loss became {value} at iteration {it}; lower lr or check the data scale"

    def step(self, it: int) -> tuple[float, torch.Tensor]:
        """One Adam step; records the loss and the best iterate *before* the step."""
        self.opt.zero_grad(set_to_none=True)
        loss, x = self.loss()
        loss.backward()
        value = loss.item()  # the one host sync per step: needed for best tracking
        if not math.isfinite(value):
            raise FloatingPointError(self._non_finite(value, it, x))
        self.losses[it] = value
        if self.selecting:
            better = self.stopping.due(it) and self.stopping.record(it, x)
        else:
            better = value < self.best_loss
        if better:
            self.best_loss, self.best_it = value, it
            self.best_state = clone_state(self.model.state_dict())
            self.best_image = x.detach().clone()
        if self.s.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(self.params, self.s.clip_grad_norm)
        self.opt.step()
        self._clamp()
        if self.gt is not None and (it % self.s.log_every == 0 or it == self.s.iterations - 1):
            self.metrics.append(_quality(it, x, self.gt))
        return value, x

    def run(self, callback: Any = None, progress: bool = True) -> None:
        """Iterate from ``start`` to the budget, a stop, or a callback's ``True``;
        checkpoints every ``checkpoint_every`` iterations and at the end."""
        bar = None
        if progress and not self.stopped and self.start < self.s.iterations:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=self.s.iterations,
                initial=self.start,
                desc="DIP",
                leave=False,
                dynamic_ncols=True,
            )
        try:
            for it in range(self.start, self.s.iterations) if not self.stopped else ():
                value, x = self.step(it)
                if bar is not None:
                    self._progress(bar, it, value)
                stop = bool(callback(it, value, x.detach())) if callback is not None else False
                if self.stopping is not None:
                    stop = self.stopping.update(it, x) or stop
                self.done = it + 1
                if stop:
                    self.stopped = True
                    break
                if self.done % self.s.checkpoint_every == 0 and self.done < self.s.iterations:
                    self.save()
            if self.done > self.start:
                self.save()
        finally:
            if bar is not None:
                bar.close()

    def _progress(self, bar: Any, it: int, value: float) -> None:
        bar.update(1)
        if it % self.s.log_every == 0:
            post = {"loss": f"{value:.4g}"}
            if self.metrics:
                post.update(psnr=f"{self.metrics[-1][1]:.2f}", ssim=f"{self.metrics[-1][2]:.3f}")
            bar.set_postfix(post, refresh=False)

    def result(self) -> DIPResult:
        """The best iterate's network (eval mode), image and the run's record."""
        if self.best_state is None:
            raise RuntimeError("no iteration was run, nothing to return")
        self.model.load_state_dict(self.best_state)
        self.model.eval()
        with torch.no_grad():
            misfit = float((self.operator(self.best_image) - self.y).pow(2).sum()) / self.y.numel()
        return DIPResult(
            image=self.best_image,
            net=self.model,
            loss_history=self.losses[: self.done].clone(),
            best_iteration=self.best_it,
            best_loss=self.best_loss,
            input=self.z0,
            iterations_run=self.done,
            stopped_early=self.stopped,
            metrics=self.metrics,
            data_misfit=misfit,
        )


def _quality(it: int, x: torch.Tensor, gt: torch.Tensor) -> tuple[int, float, float]:
    from ..metrics import psnr, ssim

    xd = x.detach().to("cpu", torch.float64)
    return (it, psnr(xd, gt), ssim(xd, gt))

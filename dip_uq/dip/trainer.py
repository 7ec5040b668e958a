"""Deep-image-prior training for CT (methods.md, Section 5).

:func:`fit_dip` minimises

    L(theta) = (1/d_y) ||A f(z0; theta) - y||^2 + gamma TV(f(z0; theta))

over the U-Net weights ``theta`` with Adam, gradient-norm clipping and optional parameter
clamping (plus, for a U-Net with an output sigmoid, the saturation barrier
``kappa mean_v relu(|t_v| - c)^2`` on its pre-activations ``t``, see :func:`fit_dip`), for
a fixed number of iterations, and returns the parameters with the **lowest training loss**
seen (never chosen with a ground truth, which is used only for logging).
``d_y`` is the number of measurements, ``TV`` the anisotropic TV of :mod:`.tv`.

The loss recorded for iteration ``t`` is evaluated at the parameters *before* the ``t``-th
Adam step; those parameters (and the image they produce) are what "best iteration ``t``"
returns. Checkpoints (every ``checkpoint_every`` iterations, written atomically) hold the
whole training state, so ``resume=True`` reproduces an uninterrupted run bit for bit on CPU.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from operators.base import check_device, check_operator

from ..errors import require_finite
from ..io.atomic import remove_stale_temporaries, writable_directory
from .checkpoint import CheckpointError, load_checkpoint
from .run import CHECKPOINT_FORMAT, DIPResult, DIPRun, Settings
from .unet import UNetConfig, build_unet

__all__ = [
    "DIPResult",
    "VarianceStopping",
    "HeldOutStopping",
    "fit_dip",
    "initial_input",
    "CHECKPOINT_NAME",
]

CHECKPOINT_NAME = "dip_checkpoint.pt"

#: Called after every iteration as ``callback(iteration, loss, image)`` with the detached
#: output ``image`` (shape of the volume) at the parameters the loss was evaluated at.
#: Returning ``True`` stops training (the best iterate so far is returned).
Callback = Callable[[int, float, torch.Tensor], bool | None]


class VarianceStopping:
    """Automatic stopping for users without a tuned iteration budget (off by default).

    A running-variance criterion in the spirit of ES-WMV (Wang et al., 2021): the variance
    of the last ``window`` network outputs, ``v_t = mean_voxels var_window(x)``, first falls
    while the network fits structure and rises once it starts fitting noise. Training stops
    when ``v_t`` has not reached a new minimum for ``patience`` iterations. The variance is
    computed every ``every`` iterations from a window of stored outputs (memory:
    ``window`` images). The returned parameters are still the lowest-loss ones among the
    iterations run.
    """

    def __init__(self, *, window: int = 50, patience: int = 500, every: int = 10) -> None:
        if window < 2 or patience < 1 or every < 1:
            raise ValueError("VarianceStopping needs window >= 2, patience >= 1, every >= 1")
        self.window, self.patience, self.every = int(window), int(patience), int(every)
        self._buf: deque[torch.Tensor] = deque(maxlen=self.window)
        self.best_variance = math.inf
        self.best_at = 0
        self.history: list[tuple[int, float]] = []

    def update(self, iteration: int, image: torch.Tensor) -> bool:
        """Record ``image`` (detached) and return whether to stop."""
        self._buf.append(image.detach().clone())
        if len(self._buf) < self.window or iteration % self.every:
            return False
        stack = torch.stack(tuple(self._buf)).double()
        v = float(stack.var(dim=0, unbiased=False).mean())
        self.history.append((iteration, v))
        if v < self.best_variance:
            self.best_variance, self.best_at = v, iteration
        return iteration - self.best_at >= self.patience

    def state_dict(self) -> dict:
        return {
            "buf": list(self._buf),
            "best_variance": self.best_variance,
            "best_at": self.best_at,
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict) -> None:
        self._buf = deque(state["buf"], maxlen=self.window)
        self.best_variance = float(state["best_variance"])
        self.best_at = int(state["best_at"])
        self.history = [(int(i), float(v)) for i, v in state["history"]]


class HeldOutStopping:
    """Early stopping and model selection on measurements left out of the fit.

    Every ``every`` iterations the current image is projected by ``operator`` (the held-out
    views) and the mean squared held-out residual ``(1/n_h) ‖A_h x − y_h‖²`` recorded: the
    error in directions the fit does not see, which falls while the network learns the object
    and rises once it fits noise. :func:`fit_dip` then returns the iterate with the **lowest
    held-out residual** (not the lowest training loss), and training stops when that has not
    improved for ``patience`` iterations (after at least ``min_iterations``).
    """

    selects = True  # fit_dip returns this rule's best iterate

    def __init__(
        self,
        operator: Any,
        y: Any,
        *,
        every: int = 10,
        patience: int = 1000,
        min_iterations: int = 0,
    ) -> None:
        if int(every) < 1 or int(patience) < 1 or int(min_iterations) < 0:
            raise ValueError("HeldOutStopping needs every >= 1, patience >= 1, min_iterations >= 0")
        _, rng = _check_operator(operator)
        self.operator = operator
        self.y = _check_y(y, rng)
        self.every, self.patience = int(every), int(patience)
        self.min_iterations = int(min_iterations)
        self.best_value = math.inf
        self.best_at = -1
        self.history: list[tuple[int, float]] = []

    def due(self, iteration: int) -> bool:
        return iteration % self.every == 0

    def record(self, iteration: int, image: torch.Tensor) -> bool:
        """Held-out residual of ``image``; returns whether it is a new minimum."""
        with torch.no_grad():
            y = self.y.to(device=image.device, dtype=image.dtype)
            v = float((self.operator(image.detach()) - y).pow(2).mean())
        self.history.append((iteration, v))
        if v < self.best_value:
            self.best_value, self.best_at = v, iteration
            return True
        return False

    def update(self, iteration: int, image: torch.Tensor) -> bool:
        """Whether to stop (the residual is recorded by :meth:`record`)."""
        return iteration >= self.min_iterations and iteration - self.best_at >= self.patience

    def state_dict(self) -> dict:
        return {"best_value": self.best_value, "best_at": self.best_at, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.best_value = float(state["best_value"])
        self.best_at = int(state["best_at"])
        self.history = [(int(i), float(v)) for i, v in state["history"]]


# ------------------------------------------------------------------------------ inputs
def _check_operator(operator: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    # the DIP only needs gradients through A: an approximate adjoint (ASTRA CUDA) is fine
    return check_operator(operator, matched="ignore")


def _check_y(y: Any, range_shape: tuple[int, ...]) -> torch.Tensor:
    y = torch.as_tensor(y)
    check_device(y, "sinogram y", "fit_dip")
    if y.is_complex():
        raise TypeError(f"sinogram y must be real, got dtype {y.dtype}")
    if not y.is_floating_point():
        y = y.to(torch.get_default_dtype())
    if tuple(y.shape) != range_shape:
        raise ValueError(
            f"sinogram shape {tuple(y.shape)} does not match the operator's range "
            f"{range_shape} (2D: (angles, detector); 3D: (det_rows, angles, det_cols))"
        )
    require_finite(y, "sinogram y")
    return y


def initial_input(
    y: torch.Tensor,
    operator: Any,
    init: str | torch.Tensor = "fbp",
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The fixed network input ``z0``, shape ``(1, 1, *domain_shape)``.

    ``"fbp"``: the analytic reconstruction (FBP for 2D and parallel 3D, FDK for cone beam);
    geometries without an analytic formula fall back to ``"backprojection"`` with a warning.
    ``"backprojection"``: ``c A^T y`` with ``c`` the least-squares scale
    ``<y, A A^T y> / ||A A^T y||^2``. ``"noise"``: ``U(0, 0.1)`` noise from ``generator``
    (Ulyanov et al.). A tensor of the volume's shape is used as given.
    """
    domain, _ = _check_operator(operator)
    if isinstance(init, torch.Tensor):
        z = init.to(device=y.device, dtype=y.dtype)
        if tuple(z.shape[-len(domain) :]) != domain or z.numel() != math.prod(domain):
            raise ValueError(
                f"init tensor must have the volume's shape {domain}, got {tuple(init.shape)}"
            )
        return z.reshape(1, 1, *domain)
    if init == "fbp":
        from operators.analytic import analytic_reconstruction

        try:
            with torch.no_grad():
                return analytic_reconstruction(y, operator).reshape(1, 1, *domain).to(y.dtype)
        except TypeError as err:
            warnings.warn(
                f"init='fbp' unavailable ({err}); using a scaled backprojection instead",
                stacklevel=2,
            )
            init = "backprojection"
    if init == "backprojection":
        with torch.no_grad():
            bp = operator.T(y)
            abp = operator(bp)
            c = float((y * abp).sum() / abp.pow(2).sum().clamp_min(1e-30))
            return (c * bp).reshape(1, 1, *domain)
    if init == "noise":
        z = torch.rand((1, 1, *domain), generator=generator, dtype=y.dtype)
        return (0.1 * z).to(y.device)
    raise ValueError(f"init must be 'fbp', 'backprojection', 'noise' or a tensor, got {init!r}")


def _real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _check_scalars(tv_weight: float, iterations: int, lr: float, clip: float | None) -> None:
    if not _real(tv_weight) or tv_weight < 0:
        raise ValueError(f"tv_weight must be a finite number >= 0, got {tv_weight!r}")
    if not (_real(iterations) and int(iterations) == iterations and iterations > 0):
        raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
    if not (_real(lr) and lr > 0):
        raise ValueError(f"lr must be positive and finite, got {lr!r}")
    if clip is not None and not (_real(clip) and clip > 0):
        raise ValueError(f"clip_grad_norm must be positive or None, got {clip!r}")


def _check_options(barrier, weight, clamp, checkpoint_every, generator) -> None:
    if barrier is not None and not (_real(barrier) and barrier > 0):
        raise ValueError(f"saturation_barrier must be positive or None, got {barrier!r}")
    if not (_real(weight) and weight >= 0):
        raise ValueError(f"saturation_weight must be >= 0, got {weight!r}")
    if clamp is not None and not (_real(clamp) and clamp > 0):
        raise ValueError(f"param_clamp must be positive and finite, got {clamp!r}")
    if not _real(checkpoint_every) or int(checkpoint_every) < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {generator!r}")


def _check_ground_truth(ground_truth: Any, domain: tuple[int, ...]) -> torch.Tensor | None:
    if ground_truth is None:
        return None
    gt = torch.as_tensor(ground_truth).detach().to("cpu", torch.float64)
    if tuple(gt.shape) != domain:
        raise ValueError(f"ground_truth shape {tuple(gt.shape)} does not match the volume {domain}")
    require_finite(gt, "ground_truth")
    return gt


def _check_checkpoint_dir(checkpoint_dir: Any, resume: bool) -> None:
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs a checkpoint_dir")
    if checkpoint_dir is not None:  # a file or a read-only place fails now, not after training
        try:
            writable_directory(checkpoint_dir)
        except OSError as err:
            raise CheckpointError(f"checkpoint_dir {err}") from err


def _check_input(z0: torch.Tensor, init: Any) -> torch.Tensor:
    if not torch.isfinite(z0).all():
        source = "the init tensor" if isinstance(init, torch.Tensor) else f"init={init!r}"
        raise FloatingPointError(
            f"the network input ({source}) contains NaN or infinite values: for finite data y "
            "this means the operator's output (its adjoint or FBP) is not finite"
        )
    return z0


def _resolve_net(net: Any, ndim: int, generator: torch.Generator | None) -> nn.Module:
    if isinstance(net, os.PathLike) or (isinstance(net, str) and net.endswith(".pt")):
        from .pretrain import load_pretrained

        return load_pretrained(net)
    return build_unet(net, ndim=ndim, generator=generator)


# ------------------------------------------------------------------------------ training
def fit_dip(
    y: Any,
    operator: Any,
    *,
    net: str | UNetConfig | dict | nn.Module | os.PathLike | None = None,
    tv_weight: float,
    iterations: int,
    lr: float = 1e-4,
    init: str | torch.Tensor = "fbp",
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 1000,
    resume: bool = False,
    clip_grad_norm: float | None = 1.0,
    param_clamp: float | None = None,
    stopping: VarianceStopping | None = None,
    saturation_barrier: float | None = 8.0,
    saturation_weight: float = 1e-3,
    ground_truth: Any = None,
    log_every: int = 100,
    progress: bool = True,
) -> DIPResult:
    """Fit a deep image prior to the measurements ``y`` of ``operator``.

    Args:
        y: measured sinogram of shape ``range_shape``, finite.
        operator: a linear operator with ``op(x)``, ``op.T(y)``, ``domain_shape`` (volume,
            ``(H, W)`` or ``(D, H, W)``) and ``range_shape`` (sinogram), e.g. a
            ``RayTransform``. It must be differentiable in ``x`` (autograd).
        net: ``None`` (the ``small`` preset), a preset name, a :class:`UNetConfig` / dict,
            a ready module (trained in place: pass a copy to keep yours), or the path of a
            pretrained network (``.pt`` from :func:`~dip_uq.dip.pretrain.pretrain_edip`).
        tv_weight: ``gamma >= 0``.
        iterations: the iteration budget (> 0).
        lr: Adam learning rate.
        init: network input, see :func:`initial_input`.
        generator: seeds network initialisation, noise input and MC-dropout masks.
        callback: see :data:`Callback`.
        checkpoint_dir: where ``dip_checkpoint.pt`` is written every ``checkpoint_every``
            iterations and at the end (atomically).
        resume: continue from the checkpoint in ``checkpoint_dir`` if there is one.
        clip_grad_norm: gradient-norm clip (``None`` disables).
        param_clamp: after each step clamp every parameter to ``[-c, c]`` (``None``: off).
        stopping: optional :class:`VarianceStopping` or :class:`HeldOutStopping` rule (off
            by default); with the latter the returned iterate is the one with the lowest
            held-out residual.
        saturation_barrier, saturation_weight: for a U-Net with an output sigmoid, add
            ``saturation_weight * mean_v relu(|t_v| - saturation_barrier)^2`` over its
            pre-activations ``t`` to the loss (``None``: off; no effect without a sigmoid):
            it keeps every voxel where the data can still move it (a saturated sigmoid
            passes no gradient; docs/dip.md), within sigmoid(-8) = 3.4e-4 of 0 or 1.
        ground_truth: only for logging PSNR/SSIM every ``log_every`` iterations.
        progress: show a tqdm progress bar (loss; PSNR/SSIM with a ground truth).

    Returns:
        A :class:`DIPResult` holding the lowest-loss iterate.
    """
    domain, rng = _check_operator(operator)
    y = _check_y(y, rng)
    _check_scalars(tv_weight, iterations, lr, clip_grad_norm)
    _check_options(saturation_barrier, saturation_weight, param_clamp, checkpoint_every, generator)
    _check_checkpoint_dir(checkpoint_dir, resume)
    gt = _check_ground_truth(ground_truth, domain)

    model = _resolve_net(net, len(domain), generator).to(device=y.device, dtype=y.dtype)
    model.train()
    for m in getattr(model, "dropout_layers", list)():
        m.generator = generator
    z0 = _check_input(initial_input(y, operator, init, generator=generator), init)
    barrier = (
        saturation_barrier is not None
        and saturation_weight > 0
        and bool(getattr(getattr(model, "config", None), "use_sigmoid", False))
        and hasattr(model, "pre_activation")
    )
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if ckpt_path is not None:
        remove_stale_temporaries(ckpt_path)  # a write killed mid-way (SIGTERM) left one
    barrier_opts = (saturation_barrier, saturation_weight) if barrier else None
    settings = Settings(float(tv_weight), float(lr), int(iterations), barrier_opts,
                        clip_grad_norm, param_clamp, int(checkpoint_every), int(log_every))  # fmt: skip
    run = DIPRun(operator, y, model, z0, settings, stopping=stopping, generator=generator,
                 checkpoint=ckpt_path, ground_truth=gt)  # fmt: skip
    if resume and ckpt_path is not None and ckpt_path.exists():
        ck = load_checkpoint(ckpt_path, map_location=y.device)
        _check_resumable(ck, ckpt_path, y, tv_weight, lr, int(iterations), model)
        run.restore(ck)
    run.run(callback, progress)
    return run.result()


def _check_resumable(
    ck: dict,
    path: Path,
    y: torch.Tensor,
    tv_weight: float,
    lr: float,
    iterations: int,
    model: nn.Module,
) -> None:
    if ck.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a DIP checkpoint (format {ck.get('format')!r})")
    problems = []
    if list(y.shape) != list(ck["y_shape"]):
        problems.append(f"sinogram shape {tuple(y.shape)} vs {tuple(ck['y_shape'])}")
    elif not math.isclose(float(y.double().sum()), ck["y_checksum"], rel_tol=1e-9, abs_tol=1e-12):
        problems.append("the sinogram values differ")
    if float(tv_weight) != ck["tv_weight"]:
        problems.append(f"tv_weight {tv_weight} vs {ck['tv_weight']}")
    if float(lr) != ck["lr"]:
        problems.append(f"lr {lr} vs {ck['lr']}")
    if int(ck["iteration"]) > iterations:
        problems.append(f"checkpoint is at iteration {ck['iteration']} > iterations={iterations}")
    cfg = model.config.to_dict() if hasattr(model, "config") else None
    if cfg != ck.get("net_config"):
        problems.append(f"network config {cfg} vs {ck.get('net_config')}")
    if problems:
        raise CheckpointError(f"{path}: cannot resume this run: " + "; ".join(problems))

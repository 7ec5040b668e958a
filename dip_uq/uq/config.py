"""``UQConfig``: every setting of the CT uncertainty pipeline in one validated, serialisable
object, and the one table of defaults the API, the command line and the demo share.

    cfg = UQConfig()                                # the defaults
    cfg = UQConfig(n_samples=128, solver="exact")   # keyword overrides, validated
    cfg = cfg.replace(holdout=0)                    # a copy with changes, validated
    UQConfig.from_dict(cfg.to_dict()) == cfg        # JSON round trip

Every option is checked once, by :meth:`UQConfig.validate` (called on construction), before
any work: a bad value raises ``ValueError`` naming the option and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from ..laplace.solvers.registry import SOLVERS as _SOLVER_REGISTRY
from ..laplace.solvers.registry import make_solver

__all__ = ["UQConfig", "DIPConfig", "PRIORS", "HYPER_MODES", "SOLVERS", "ESTIMATORS"]

PRIORS = ("matern", "normal", "g-prior")
HYPER_MODES = ("em", "mll", "tv-map", "fixed")
SOLVERS = tuple(sorted(_SOLVER_REGISTRY))  # the registered posterior solvers
ESTIMATORS = ("function", "weight", "paired", "exact")
DTYPES = ("float32", "float64")
#: TV weight per voxel at 28×28 (docs/methods.md §5), scaled by 784 / n_voxels by default
TV_PER_784 = 1e-4


@dataclass(frozen=True)
class DIPConfig:
    """How the pipeline fits the deep image prior when no trained network is given.

    Attributes:
        net: a preset name (``"small"``, ``"large"``), a :class:`~dip_uq.dip.UNetConfig` as a
            dict, or the path of a pretrained ``.pt`` network. Default: 3 scales × 16
            channels, skips (0, 4, 4), a linear output (a sigmoid caps the image at 1 and
            flattens the Jacobian where it saturates).
        tv_weight: γ; ``None`` is 1e-4 · 784 / n_voxels.
        iterations: the Adam budget.
        lr: Adam's learning rate.
        stopping: ``"heldout"`` (stop and select on the held-out views when there are any)
            or ``None`` (the lowest training loss over the whole budget).
        patience: held-out stopping: iterations without improvement before stopping;
            ``None`` is a fifth of the budget (at least 200), so a slow learning rate or a
            long budget is not cut short by an early plateau.
        init: the network input, ``"fbp"``, ``"backprojection"`` or ``"noise"``.
    """

    net: Any = field(
        default_factory=lambda: {
            "channels": (16, 16, 16),
            "skip_channels": (0, 4, 4),
            "use_sigmoid": False,
        }
    )
    tv_weight: float | None = None
    iterations: int = 5000
    lr: float = 1e-3
    stopping: str | None = "heldout"
    patience: int | None = None
    init: str = "fbp"

    def __post_init__(self) -> None:
        if isinstance(self.net, dict):  # JSON gives lists where the config has tuples
            net = {k: tuple(v) if isinstance(v, list) else v for k, v in self.net.items()}
            object.__setattr__(self, "net", net)

    def validate(self) -> DIPConfig:
        _positive_int("dip.iterations", self.iterations)
        if self.patience is not None:
            _positive_int("dip.patience", self.patience)
        _positive("dip.lr", self.lr)
        if self.tv_weight is not None:
            _nonnegative("dip.tv_weight", self.tv_weight)
        _choice("dip.stopping", self.stopping, ("heldout", None))
        _choice("dip.init", self.init, ("fbp", "backprojection", "noise"))
        return self

    @property
    def resolved_patience(self) -> int:
        return max(200, self.iterations // 5) if self.patience is None else int(self.patience)

    def tv_for(self, n_voxels: int) -> float:
        """γ for a volume of ``n_voxels`` (the default scales the 28×28 value)."""
        return TV_PER_784 * 784 / n_voxels if self.tv_weight is None else float(self.tv_weight)

    def fit_dip_options(self, n_voxels: int) -> dict[str, Any]:
        """Keyword options for :func:`~dip_uq.dip.fit_dip` (``stopping`` is the caller's)."""
        return {
            "net": self.net,
            "tv_weight": self.tv_for(n_voxels),
            "iterations": int(self.iterations),
            "lr": float(self.lr),
            "init": self.init,
        }


@dataclass(frozen=True)
class UQConfig:
    """Settings of :func:`dip_uq.reconstruct_with_uncertainty` (docs/uncertainty.md).

    Held-out views: ``holdout`` (fraction of the views left out of every fit, 0: none),
    ``holdout_seed``. DIP: ``dip`` (:class:`DIPConfig`). Linearised model: ``prior``
    (:data:`PRIORS`), ``dtype`` (of the linearised stage), initial ``prior_variance``,
    ``lengthscale`` and ``noise_var`` (``None``: the DIP's residual). Hyperparameters:
    ``hyper`` (:data:`HYPER_MODES`), ``tied`` (``None``: per-block for EM, tied otherwise),
    ``em_cycles``, ``em_samples``, ``em_solver`` (``None``: ``solver``), ``em_estimator``
    (:data:`ESTIMATORS`; ``None``: exact with the exact solver, else function-space;
    ``"paired"`` resolves per-block variances with far fewer samples, docs/methods.md §3),
    ``tv_weight`` and
    ``tv_scale`` of the TV-PredCP hyperprior. Samples: ``solver`` (:data:`SOLVERS`),
    ``solver_opts`` (the options of ``solver`` and of the EM solver, checked against the
    solver registry: :func:`~dip_uq.laplace.solvers.make_solver`), ``n_samples``,
    ``sample_batch``, ``reuse_preconditioner``, ``keep_samples``, ``exact_covariance``. Predictive: ``noise_term``, ``noise_probes``,
    ``calibration`` (:data:`dip_uq.uq.calibration.CALIBRATION_MODES`).
    """

    holdout: float = 0.1
    holdout_seed: int = 0
    dip: DIPConfig = field(default_factory=DIPConfig)
    prior: str = "matern"
    dtype: str = "float64"
    prior_variance: float = 0.1
    lengthscale: float = 0.1
    noise_var: float | None = None
    hyper: str = "em"
    tied: bool | None = None
    em_cycles: int = 4
    em_samples: int = 8
    em_solver: str | None = None
    em_estimator: str | None = None
    tv_weight: float | None = None
    tv_scale: float = 1.0
    solver: str = "cg"
    solver_opts: dict = field(default_factory=dict)
    n_samples: int = 64
    sample_batch: int = 16
    reuse_preconditioner: bool = True
    keep_samples: bool = False
    exact_covariance: bool = False
    noise_term: bool = True
    noise_probes: int = 64
    calibration: str = "weights"

    def __post_init__(self) -> None:
        if isinstance(self.dip, dict):  # from_dict / keyword use
            unknown = sorted(set(self.dip) - {f.name for f in fields(DIPConfig)})
            if unknown:
                raise ValueError(
                    f"unknown DIP option(s) {unknown}; use {[f.name for f in fields(DIPConfig)]}"
                )
            object.__setattr__(self, "dip", DIPConfig(**self.dip))
        if isinstance(self.dtype, torch.dtype):
            object.__setattr__(self, "dtype", str(self.dtype).replace("torch.", ""))
        if self.solver_opts is not None and not isinstance(self.solver_opts, dict):
            raise TypeError(f"solver_opts must be a dict, got {type(self.solver_opts).__name__}")
        object.__setattr__(self, "solver_opts", dict(self.solver_opts or {}))
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> UQConfig:
        """Check every option; raise ``ValueError``/``TypeError`` naming the first bad one."""
        from .calibration import CALIBRATION_MODES

        if not isinstance(self.dip, DIPConfig):
            raise TypeError(f"dip must be a DIPConfig or a dict, got {type(self.dip).__name__}")
        self.dip.validate()
        if not (isinstance(self.holdout, int | float) and 0 <= self.holdout < 1):
            raise ValueError(f"holdout must be a fraction in [0, 1), got {self.holdout!r}")
        _int("holdout_seed", self.holdout_seed)
        _choice("prior", self.prior, PRIORS)
        _choice("dtype", self.dtype, DTYPES)
        _positive("prior_variance", self.prior_variance)
        _positive("lengthscale", self.lengthscale)
        if self.noise_var is not None:
            _positive("noise_var", self.noise_var)
        _choice("hyper", self.hyper, HYPER_MODES)
        _choice("tied", self.tied, (True, False, None))
        _positive_int("em_cycles", self.em_cycles)
        _positive_int("em_samples", self.em_samples)
        _choice("em_solver", self.em_solver, (*SOLVERS, None))
        _choice("em_estimator", self.em_estimator, (*ESTIMATORS, None))
        if self.em_estimator == "exact" and not self._em_exact_traces:
            raise ValueError("em_estimator='exact' needs the exact solver (em_solver='exact')")
        if self.tv_weight is not None:
            _nonnegative("tv_weight", self.tv_weight)
        _positive("tv_scale", self.tv_scale)
        _choice("solver", self.solver, SOLVERS)
        if not isinstance(self.solver_opts, dict):
            raise TypeError(f"solver_opts must be a dict, got {type(self.solver_opts).__name__}")
        for name in dict.fromkeys((self.solver, self.resolved_em_solver)):
            try:  # the options of every solver that runs with them, by its registry entry
                make_solver(name, **self.solver_opts)
            except (ValueError, TypeError) as err:
                raise type(err)(f"solver_opts: {err}") from None
        _positive_int("n_samples", self.n_samples)
        _positive_int("sample_batch", self.sample_batch)
        for name in ("reuse_preconditioner", "keep_samples", "exact_covariance", "noise_term"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.noise_term:
            _positive_int("noise_probes", self.noise_probes)
            if self.noise_probes < 2:
                raise ValueError(f"noise_probes must be >= 2, got {self.noise_probes}")
        _choice("calibration", self.calibration, CALIBRATION_MODES)
        return self

    # ------------------------------------------------------------------ derived settings
    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def resolved_em_solver(self) -> str:
        return self.em_solver or self.solver

    @property
    def resolved_tied(self) -> bool:
        return (self.hyper != "em") if self.tied is None else bool(self.tied)

    @property
    def resolved_estimator(self) -> str:
        if self.em_estimator is not None:
            return self.em_estimator
        return "exact" if self._em_exact_traces else "function"

    @property
    def _em_exact_traces(self) -> bool:
        """Whether the EM solver gives exact traces (the registry's ``exact_traces``)."""
        cls = _SOLVER_REGISTRY.get(self.resolved_em_solver)
        return cls is not None and cls.exact_traces

    # ------------------------------------------------------------------ copies and files
    def replace(self, **overrides: Any) -> UQConfig:
        """A validated copy with ``overrides`` (unknown names raise, listing the known ones;
        ``dip`` may be a dict of :class:`DIPConfig` fields to change)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}; the options are {sorted(known)}")
        if isinstance(overrides.get("dip"), dict):
            overrides["dip"] = dataclasses.replace(self.dip, **overrides["dip"])
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python, JSON-ready form (paths and other objects as strings)."""
        import json

        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UQConfig:
        return cls(**data)


def _int(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an integer, got {v!r}")


def _positive_int(name: str, v: Any) -> None:
    _int(name, v)
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")


def _positive(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a positive finite number, got {v!r}")


def _nonnegative(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not (math.isfinite(v) and v >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")


def _choice(name: str, v: Any, allowed: tuple) -> None:
    if v not in allowed:
        raise ValueError(f"unknown {name} {v!r}; use one of {allowed}")

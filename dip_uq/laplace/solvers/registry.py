"""The posterior solvers as objects, registered once (docs/methods.md §2).

A :class:`Solver` holds one solver's options in a typed, frozen ``Options`` dataclass, the
one place where their defaults live, and the hooks its callers (EM, the posterior's
streaming, the pipeline) need, so that none of them branches on a solver's name:

* :meth:`Solver.sample` draws (or solves for the mean) through the solver's ``sample_*``
  function, which stays the implementation;
* :meth:`Solver.precondition` returns a copy holding what several solves at the same
  hyperparameters share (cg's Nyström P⁻¹, sgd's low-rank P⁻¹, exact's dense factors);
* :meth:`Solver.refresh` carries a preconditioner over to new hyperparameters (cg);
* :meth:`Solver.warm_start` gives the next EM cycle's initial iterate;
* :meth:`Solver.without_preconditioner` is the fallback when a preconditioner fails.

    solver = make_solver("cg", tol=1e-8, iterations=300)   # unknown options: ValueError
    shared = solver.precondition(system)                   # one build for several solves
    res = shared.sample(system, 16, noise=noise)
    make_solver("cg", **solver.options_dict()) == solver   # round trip

``SOLVERS`` maps each registered name to its class; :func:`register` adds one.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from . import cg, exact, sdd, sgd
from . import precond as precond_mod
from .system import LinearSystem, Noise, SolverResult

__all__ = [
    "SOLVERS",
    "CGSolver",
    "ExactSolver",
    "SDDSolver",
    "SGDSolver",
    "Solver",
    "make_solver",
    "register",
]

Callback = Callable[[int, Callable[[], torch.Tensor]], bool]


# ---- option checks (one per option name, shared by every solver that has it) -----------
def _int_at_least(name: str, v: Any, low: int) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {v!r}")
    if v < low:
        raise ValueError(f"{name} must be >= {low}, got {v}")


def _optional_int_at_least(name: str, v: Any, low: int) -> None:
    if v is not None:
        _int_at_least(name, v, low)


def _number(name: str, v: Any, ok: Callable[[float], bool], what: str) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not ok(float(v)):
        raise ValueError(f"{name} must be {what}, got {v!r}")


def _momentum(name: str, v: Any) -> None:
    if isinstance(v, str) and v == "auto":
        return
    _number(name, v, lambda x: 0.0 <= x < 1.0, "in [0, 1) or 'auto'")


def _callable_or_none(name: str, v: Any) -> None:
    if v is not None and not callable(v):
        raise TypeError(f"{name} must be a callable or None, got {type(v).__name__}")


def _bool(name: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be True or False, got {v!r}")


_CHECKS: dict[str, Callable[[str, Any], None]] = {
    "iterations": lambda n, v: _int_at_least(n, v, 0),
    "tol": lambda n, v: _number(
        n, v, lambda x: math.isfinite(x) and x >= 0, "a finite number >= 0"
    ),
    "lr": lambda n, v: v is None or _number(n, v, lambda x: math.isfinite(x) and x > 0, "> 0"),
    "momentum": _momentum,
    "batch_size": lambda n, v: _optional_int_at_least(n, v, 1),
    "check_every": lambda n, v: _int_at_least(n, v, 1),
    "precond_rank": lambda n, v: _int_at_least(n, v, 0),
    "oversample": lambda n, v: _int_at_least(n, v, 0),
    "precond_chunk_size": lambda n, v: _optional_int_at_least(n, v, 1),
    "averaging": lambda n, v: v is None or _number(n, v, lambda x: 0 < x <= 1, "in (0, 1]"),
    "polyak": _bool,
    "precond_store": _bool,
    "callback": _callable_or_none,
}


def _check_precond(v: Any, strings: tuple[str, ...]) -> None:
    """``precond``: one of ``strings``, None or a callable P⁻¹ (the messages of sample_sgd)."""
    allowed = ", ".join(repr(s) for s in strings)
    if isinstance(v, str):
        if v not in strings:
            raise ValueError(f"precond must be None, {allowed} or a callable, got {v!r}")
    elif v is not None and not callable(v):
        raise TypeError(f"precond must be None, {allowed} or a callable, got {type(v)}")


@dataclass(frozen=True)
class _Options:
    """Base of the options dataclasses: every field with a check in ``_CHECKS`` is checked
    on construction (``dataclasses.replace`` included)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check = _CHECKS.get(f.name)
            if check is not None:
                check(f.name, getattr(self, f.name))


def _plain(v: Any) -> bool:
    return v is None or isinstance(v, bool | int | float | str)


# ---- the base class and the registry ---------------------------------------------------
class Solver:
    """One posterior solver with its options (docs/methods.md §2).

    Subclasses set ``name``, ``Options`` (a frozen dataclass of the options and their
    defaults) and :meth:`function` (the ``sample_*`` implementation), and override the
    hooks that apply to them. Instances are immutable: :meth:`replace` and the hooks return
    new ones.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = _Options
    #: whether :meth:`block_gamma` gives exact effective dimensions (EM's ``"exact"`` estimator)
    exact_traces: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        valid = self.option_names()
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for solver {self.name!r}; "
                f"valid options: {list(valid)}"
            )
        self.options = self.Options(**options)

    # ---- options ---------------------------------------------------------------------
    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The names of this solver's options, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls.Options))

    @staticmethod
    def function() -> Callable[..., SolverResult]:
        """The ``sample_*`` function this solver runs (looked up through its module, so
        that a patched module attribute is used)."""
        raise NotImplementedError

    def options_dict(self) -> dict[str, Any]:
        """Every option with its value (shallow: prebuilt objects are not copied);
        ``make_solver(self.name, **self.options_dict()) == self``."""
        return {f.name: getattr(self.options, f.name) for f in dataclasses.fields(self.options)}

    def replace(self, **changes: Any) -> Solver:
        """A copy with ``changes`` to its options, checked like the constructor's."""
        return type(self)(**{**self.options_dict(), **changes})

    def _call_options(self) -> dict[str, Any]:
        """The keyword options :meth:`function` is called with."""
        return self.options_dict()

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.options == other.options

    __hash__ = None  # options may hold unhashable prebuilt objects

    def __repr__(self) -> str:
        parts = [
            f"{k}={v!r}" if _plain(v) else f"{k}=<{type(v).__name__}>"
            for k, v in self.options_dict().items()
        ]
        return f"{type(self).__name__}({', '.join(parts)})"

    # ---- solving ---------------------------------------------------------------------
    def sample(
        self,
        system: LinearSystem,
        n: int = 1,
        generator: torch.Generator | None = None,
        *,
        target: torch.Tensor | None = None,
        noise: Noise | None = None,
        init: torch.Tensor | None = None,
    ) -> SolverResult:
        """``n`` zero-mean samples z ~ N(0, H⁻¹) ``(n, d)`` (or, with a whitened ``target``,
        the mean), drawn with ``noise`` when given; ``init`` warm-starts iterative solvers."""
        return self.function()(
            system, n, generator, target=target, noise=noise, init=init, **self._call_options()
        )

    # ---- hooks -----------------------------------------------------------------------
    def precondition(self, system: LinearSystem) -> Solver:
        """A copy holding what several solves at ``system``'s hyperparameters share (built
        once, with fixed-seed probes, so sharing changes no result); ``self`` when there is
        nothing to share. Tied to those hyperparameters: call it again after they change."""
        return self

    def refresh(self, system: LinearSystem, old: Any) -> Solver:
        """Like :meth:`precondition` for EM's next cycle, reusing ``old`` (this solver's
        :attr:`refreshable` of the previous cycle) where the solver can; by default a new
        build."""
        return self.precondition(system)

    @property
    def refreshable(self) -> Any:
        """What :meth:`refresh` can reuse in the next cycle (cg: the held Nyström P⁻¹), else
        None."""
        return None

    def warm_start(self, prior: Any, result: SolverResult, z: torch.Tensor) -> torch.Tensor | None:
        """The initial iterate for the same draws ``z`` ``(K, d)`` of ``result`` in the next
        EM cycle (``prior`` is the prior the next solve sees), or None for a cold start."""
        return None

    def without_preconditioner(self) -> Solver | None:
        """The fallback when building the preconditioner failed (a Cholesky that round-off
        broke): this solver with none, or None when that is not possible or already so."""
        return None

    def block_gamma(self, system: LinearSystem) -> torch.Tensor:
        """Exact effective dimension per block (only when :attr:`exact_traces`)."""
        raise NotImplementedError(f"solver {self.name!r} has no exact traces; use 'exact'")

    @classmethod
    def stream_defaults(
        cls, system: Any, categorical: bool, n_batches: int, given: Any
    ) -> dict[str, Any]:
        """Option defaults on a streamed source (the front door), under the user's options
        (names in ``given``); ``n_batches`` batches per pass over the loader."""
        return {}


SOLVERS: dict[str, type[Solver]] = {}


def register(cls: type[Solver]) -> type[Solver]:
    """Class decorator adding ``cls`` to :data:`SOLVERS` under ``cls.name`` (once)."""
    if not cls.name or cls.name in SOLVERS:
        raise ValueError(f"solver name {cls.name!r} is empty or already registered")
    SOLVERS[cls.name] = cls
    return cls


def solver_class(name: str) -> type[Solver]:
    """The registered class of ``name``; ValueError listing the registered names."""
    if not isinstance(name, str) or name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; use one of {sorted(SOLVERS)}")
    return SOLVERS[name]


def make_solver(spec: str | Solver, **options: Any) -> Solver:
    """The solver named ``spec`` with ``options``, or the :class:`Solver` ``spec`` itself
    (a copy with ``options`` changed when any are given)."""
    if isinstance(spec, Solver):
        return spec.replace(**options) if options else spec
    return solver_class(spec)(**options)


# ---- the solvers -------------------------------------------------------------------------
@dataclass(frozen=True)
class ExactOptions(_Options):
    """``mode``: ``"auto"``, ``"primal"`` or ``"dual"`` factorisation; ``factors``: prebuilt
    dense factors (:func:`~.exact.dense_factors` at the current hyperparameters)."""

    mode: str = "auto"
    factors: dict | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in ("auto", "primal", "dual"):
            raise ValueError(f"exact mode must be 'auto', 'primal' or 'dual', got {self.mode!r}")
        if self.factors is not None and not isinstance(self.factors, dict):
            raise TypeError(f"factors must be a dict from dense_factors, got {type(self.factors)}")


@register
class ExactSolver(Solver):
    """Dense float64 reference (docs/methods.md §2.4); ``precondition`` holds the factors."""

    name = "exact"
    Options = ExactOptions
    exact_traces = True

    @staticmethod
    def function() -> Callable[..., SolverResult]:
        return exact.sample_exact

    def precondition(self, system: LinearSystem) -> Solver:
        """A copy holding the dense Cholesky factors (``self`` if it already holds some)."""
        if self.options.factors is not None:
            return self
        return self.replace(factors=exact.dense_factors(system, self.options.mode))

    def block_gamma(self, system: LinearSystem) -> torch.Tensor:
        """γ_b = Σ_{i∈b} (H⁻¹M)_ii from the dense factors (:func:`~.exact.exact_block_gamma`)."""
        return exact.exact_block_gamma(system, self.precondition(system).options.factors)


@dataclass(frozen=True)
class SGDOptions(_Options):
    """Options of :func:`~.sgd.sample_sgd` (see there)."""

    lr: float | None = None
    momentum: float | str = 0.9
    iterations: int = 2000
    tol: float = 1e-4
    batch_size: int | None = None
    polyak: bool = False
    check_every: int = 10
    callback: Callback | None = None
    precond: str | Callable[[torch.Tensor], torch.Tensor] | None = "auto"
    precond_rank: int = 200
    oversample: int = 10
    precond_chunk_size: int | None = 32
    precond_store: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_precond(self.precond, ("auto", "lowrank"))


@register
class SGDSolver(Solver):
    """Primal sample-then-optimise (docs/methods.md §2.1), optionally low-rank
    preconditioned (``precond``: ``"auto"``, ``"lowrank"``, None or a prebuilt P⁻¹)."""

    name = "sgd"
    Options = SGDOptions

    @staticmethod
    def function() -> Callable[..., SolverResult]:
        return sgd.sample_sgd

    def precondition(self, system: LinearSystem) -> Solver:
        """A copy holding the low-rank P⁻¹ when ``precond`` resolves to ``"lowrank"`` for
        this batch size (``"auto"``: full batches); ``self`` otherwise."""
        o = self.options
        full = not system.streaming and (o.batch_size is None or o.batch_size >= system.n_data)
        resolved = sgd.resolve_precond(o.precond, full)
        if not (isinstance(resolved, str) and resolved == "lowrank"):
            return self
        built = precond_mod.lowrank_preconditioner(
            system,
            o.precond_rank,
            o.oversample,
            chunk_size=o.precond_chunk_size,
            store=o.precond_store,
        )
        return self.replace(precond=built)

    def warm_start(self, prior: Any, result: SolverResult, z: torch.Tensor) -> torch.Tensor:
        """u = L⁻¹z under ``prior`` (the whitened coordinates sgd iterates in)."""
        return prior.sqrt_inv_mv(z).detach()

    @classmethod
    def stream_defaults(cls, system, categorical, n_batches, given) -> dict[str, Any]:
        """Polyak averaging, 50 epochs checked once per epoch and, unless given, step
        0.1/(λ̂ + 1): minibatch noise sets a floor ∝ lr under a constant step, and a tenth of
        the full-batch step with momentum 0.9 is an effective step of 1/(λ̂ + 1)."""
        nb = max(int(n_batches or 1), 1)
        out: dict[str, Any] = {"polyak": True, "iterations": 50 * nb, "check_every": nb}
        if "lr" not in given:
            lam = system.lambda_max(generator=torch.Generator(system.device).manual_seed(0))
            out["lr"] = 0.1 / (lam + 1.0)
        return out


@dataclass(frozen=True)
class CGOptions(_Options):
    """Options of :func:`~.cg.sample_cg` (see there). ``precond``: ``"auto"`` (the rank
    ``precond_rank`` Nyström P⁻¹, built by each solve or once by ``precondition``), None
    (built by every solve, never shared) or a prebuilt P⁻¹."""

    tol: float = 1e-6
    iterations: int = 500
    precond_rank: int = 200
    oversample: int = 10
    precond_chunk_size: int | None = 32
    callback: Callback | None = None
    precond: str | Callable[[torch.Tensor], torch.Tensor] | None = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_precond(self.precond, ("auto",))


@register
class CGSolver(Solver):
    """Dual Matheron samples by preconditioned CG (docs/methods.md §2.2)."""

    name = "cg"
    Options = CGOptions

    @classmethod
    def stream_defaults(cls, system, categorical, n_batches, given) -> dict[str, Any]:
        """Softmax: tol 1e-3 per right-hand side (Newton's line search absorbs inexact
        steps; docs/laplace.md); regression keeps 1e-6, which EM's σ² needs."""
        return {"tol": 1e-3} if categorical else {}

    @staticmethod
    def function() -> Callable[..., SolverResult]:
        return cg.sample_cg

    def _call_options(self) -> dict[str, Any]:
        opts = self.options_dict()
        if isinstance(opts["precond"], str):  # "auto": sample_cg builds its own
            opts["precond"] = None
        return opts

    def precondition(self, system: LinearSystem) -> Solver:
        """A copy holding the Nyström P⁻¹ (``precond="auto"`` and ``precond_rank > 0``),
        built through ``cg.nystrom_preconditioner`` with its fixed-seed probes."""
        o = self.options
        if o.precond_rank == 0 or not isinstance(o.precond, str) or system.streaming:
            return self
        built, _ = cg.nystrom_preconditioner(
            system, o.precond_rank, o.oversample, chunk_size=o.precond_chunk_size
        )
        return self.replace(precond=built)

    def refresh(self, system: LinearSystem, old: Any) -> Solver:
        """``old`` rescaled to ``system``'s hyperparameters by one batched kernel product
        (:func:`~.cg.refreshed_preconditioner`); a new build when there is none."""
        if old is None or system.streaming:
            return self.precondition(system)
        return self.replace(precond=cg.refreshed_preconditioner(system, old))

    @property
    def refreshable(self) -> Any:
        p = self.options.precond
        return p if callable(p) else None

    def warm_start(self, prior: Any, result: SolverResult, z: torch.Tensor) -> torch.Tensor | None:
        """The dual solution α of ``result`` (primal CG on a streamed source: u = L⁻¹z)."""
        if "u" in result.state:
            return prior.sqrt_inv_mv(z).detach()
        return result.state.get("alpha")

    def without_preconditioner(self) -> Solver | None:
        if self.options.precond_rank == 0:
            return None
        return self.replace(precond_rank=0, precond="auto")


@dataclass(frozen=True)
class SDDOptions(_Options):
    """Options of :func:`~.sdd.sample_sdd` (see there)."""

    lr: float | None = None
    momentum: float | str = 0.9
    iterations: int = 2000
    batch_size: int | None = None
    averaging: float | None = None
    tol: float = 1e-4
    check_every: int = 50
    callback: Callback | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _int_at_least("iterations", self.iterations, 1)  # the default averaging is 100/T


@register
class SDDSolver(Solver):
    """Stochastic dual descent (docs/methods.md §2.3)."""

    name = "sdd"
    Options = SDDOptions

    @staticmethod
    def function() -> Callable[..., SolverResult]:
        return sdd.sample_sdd

    def warm_start(self, prior: Any, result: SolverResult, z: torch.Tensor) -> torch.Tensor | None:
        """The averaged dual iterate ᾱ of ``result``."""
        return result.state.get("alpha")

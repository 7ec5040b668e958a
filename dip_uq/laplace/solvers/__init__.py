"""Interchangeable posterior solvers (docs/methods.md §2); each returns a :class:`SolverResult`.

``exact`` (dense float64), ``sgd`` (primal sample-then-optimise, optionally with a
low-rank preconditioner), ``cg`` (dual Matheron with
preconditioned CG), ``sdd`` (stochastic dual descent). With the same :class:`Noise` all four
target the *same* samples, so scalable solvers can be checked draw by draw against ``exact``.

Each is registered once as a :class:`Solver` class in :data:`SOLVERS`
(:mod:`~dip_uq.laplace.solvers.registry`): typed options with their defaults, and the hooks
(``precondition``, ``refresh``, ``warm_start``) its callers use instead of its name.
"""

from __future__ import annotations

from collections.abc import Callable

from . import cg
from .cg import nystrom_preconditioner, sample_cg
from .exact import dense_factors, functional_covariance, robust_cholesky, sample_exact
from .precond import LowRankPreconditioner, lowrank_preconditioner
from .registry import (
    SOLVERS,
    CGSolver,
    ExactSolver,
    SDDSolver,
    SGDSolver,
    Solver,
    make_solver,
    register,
    solver_class,
)
from .sdd import sample_sdd
from .sgd import sample_sgd
from .system import LinearSystem, Noise, SolverResult, draw_noise


def get_solver(spec: str | Solver) -> Callable[..., SolverResult]:
    """The sampling callable of ``spec``: for a name (``exact``, ``sgd``, ``cg``, ``sdd``) its
    ``sample_*`` function (options as keyword arguments), for a :class:`Solver` its bound
    :meth:`~Solver.sample`. An unknown name raises ``ValueError`` listing the registered ones.
    """
    if isinstance(spec, Solver):
        return spec.sample
    return solver_class(spec).function()


def with_prebuilt_preconditioner(system: LinearSystem, solver: str, opts: dict) -> dict:
    """``opts`` plus what :meth:`Solver.precondition` of ``solver`` with these options
    builds to share (kept for scripts written against the options-dict interface; new code
    uses ``make_solver(solver, **opts).precondition(system)``)."""
    base = make_solver(solver, **opts)
    shared = base.precondition(system).options_dict()
    return {**opts, **{k: v for k, v in shared.items() if v is not getattr(base.options, k)}}


__all__ = [
    "CGSolver",
    "ExactSolver",
    "LinearSystem",
    "LowRankPreconditioner",
    "Noise",
    "SDDSolver",
    "SGDSolver",
    "SOLVERS",
    "Solver",
    "SolverResult",
    "cg",
    "dense_factors",
    "draw_noise",
    "functional_covariance",
    "get_solver",
    "lowrank_preconditioner",
    "make_solver",
    "nystrom_preconditioner",
    "register",
    "robust_cholesky",
    "sample_cg",
    "sample_exact",
    "sample_sdd",
    "sample_sgd",
    "solver_class",
    "with_prebuilt_preconditioner",
]

"""Interchangeable posterior solvers; each returns a :class:`SolverResult`.

``exact`` (dense float64), ``sgd`` (primal sample-then-optimise), ``cg`` (dual Matheron with
preconditioned CG), ``sdd`` (stochastic dual descent). With the same :class:`Noise` all four
target the *same* samples, so scalable solvers can be checked draw by draw against ``exact``.
"""

from __future__ import annotations

from .cg import nystrom_preconditioner, sample_cg
from .exact import dense_factors, functional_covariance, robust_cholesky, sample_exact
from .sdd import sample_sdd
from .sgd import sample_sgd
from .system import LinearSystem, Noise, SolverResult, draw_noise

SOLVERS = {"exact": sample_exact, "sgd": sample_sgd, "cg": sample_cg, "sdd": sample_sdd}


def get_solver(name: str):
    """The solver function for ``name`` (one of ``exact``, ``sgd``, ``cg``, ``sdd``)."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; use one of {sorted(SOLVERS)}")
    return SOLVERS[name]


__all__ = [
    "LinearSystem",
    "Noise",
    "SOLVERS",
    "SolverResult",
    "dense_factors",
    "draw_noise",
    "functional_covariance",
    "get_solver",
    "nystrom_preconditioner",
    "robust_cholesky",
    "sample_cg",
    "sample_exact",
    "sample_sdd",
    "sample_sgd",
]

"""Interchangeable posterior solvers; each returns a :class:`SolverResult`.

``exact`` (dense float64), ``sgd`` (primal sample-then-optimise, optionally with a
low-rank preconditioner), ``cg`` (dual Matheron with
preconditioned CG), ``sdd`` (stochastic dual descent). With the same :class:`Noise` all four
target the *same* samples, so scalable solvers can be checked draw by draw against ``exact``.
"""

from __future__ import annotations

from . import cg
from .cg import nystrom_preconditioner, sample_cg
from .exact import dense_factors, functional_covariance, robust_cholesky, sample_exact
from .precond import LowRankPreconditioner, lowrank_preconditioner
from .sdd import sample_sdd
from .sgd import resolve_precond, sample_sgd
from .system import LinearSystem, Noise, SolverResult, draw_noise

SOLVERS = {"exact": sample_exact, "sgd": sample_sgd, "cg": sample_cg, "sdd": sample_sdd}


def with_prebuilt_preconditioner(system: LinearSystem, solver: str, opts: dict) -> dict:
    """``opts`` plus ``precond``: the preconditioner ``solver`` would build for itself with
    these options (its defaults read from its signature, so they cannot drift apart), built
    once so that several solves at the same hyperparameters share it (EM's mode and sample
    solves of one cycle; the sample batches of a pipeline). The default probes are
    fixed-seed, so sharing changes no result. Unchanged when there is nothing to share:
    other solvers, ``precond_rank=0``, sgd with ``precond=None`` or a callable, cg with any
    ``precond`` entry (a prebuilt one, or None: every solve builds its own).
    A shared preconditioner is tied to the hyperparameters it was built at.
    """
    import inspect

    if solver == "cg" and opts.get("precond_rank", 1) > 0 and "precond" not in opts:
        keys, fn = ("precond_rank", "oversample", "precond_chunk_size"), sample_cg
    elif (
        solver == "sgd"
        and resolve_precond(
            opts.get("precond", "auto"),
            opts.get("batch_size") is None or opts["batch_size"] >= system.n_data,
        )
        == "lowrank"
    ):
        keys = ("precond_rank", "oversample", "precond_chunk_size", "precond_store")
        fn = sample_sgd
    else:
        return opts
    defaults = {k: p.default for k, p in inspect.signature(fn).parameters.items()}
    o = {k: opts.get(k, defaults[k]) for k in keys}
    if solver == "cg":
        precond, _ = cg.nystrom_preconditioner(  # via the module: patchable in tests
            system, o["precond_rank"], o["oversample"], chunk_size=o["precond_chunk_size"]
        )
    else:
        precond = lowrank_preconditioner(
            system,
            o["precond_rank"],
            o["oversample"],
            chunk_size=o["precond_chunk_size"],
            store=o["precond_store"],
        )
    return {**opts, "precond": precond}


def get_solver(name: str):
    """The solver function for ``name`` (one of ``exact``, ``sgd``, ``cg``, ``sdd``)."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; use one of {sorted(SOLVERS)}")
    return SOLVERS[name]


__all__ = [
    "LinearSystem",
    "LowRankPreconditioner",
    "Noise",
    "SOLVERS",
    "SolverResult",
    "dense_factors",
    "draw_noise",
    "functional_covariance",
    "get_solver",
    "lowrank_preconditioner",
    "nystrom_preconditioner",
    "robust_cholesky",
    "sample_cg",
    "sample_exact",
    "sample_sdd",
    "sample_sgd",
    "with_prebuilt_preconditioner",
]

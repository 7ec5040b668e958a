"""The solver registry: solver objects reproduce their functions, options are checked, the
hooks (precondition, warm_start) keep results unchanged. Tiny problems: a few seconds."""

from __future__ import annotations

import inspect

import pytest
import torch
from test_laplace_problems import blr, ct_like, one_thread  # noqa: F401

from dip_uq.laplace import draw_noise
from dip_uq.laplace.solvers import (
    SOLVERS,
    CGSolver,
    Solver,
    cg,
    get_solver,
    make_solver,
    register,
    with_prebuilt_preconditioner,
)

#: short runs per solver (the same options for the object and the function)
OPTS = {
    "exact": {},
    "sgd": {"iterations": 30, "tol": 0.0, "precond_rank": 10},
    "cg": {"iterations": 30, "tol": 1e-10, "precond_rank": 10},
    "sdd": {"iterations": 30, "tol": 0.0, "check_every": 10},
}


def gen() -> torch.Generator:
    """The same generator state for both runs (sgd/sdd draw their power-iteration start and
    minibatches from it; without one they use torch's global generator)."""
    return torch.Generator().manual_seed(1)


@pytest.fixture(scope="module")
def problem():
    la = ct_like(side=8, n_meas=30, channels=2, noise=0.1, prior_variance=0.05)
    system = la.system()
    return la, system, draw_noise(system, 3, torch.Generator().manual_seed(0))


def test_every_solver_is_registered_with_its_defaults_in_one_place():
    assert set(SOLVERS) == {"exact", "sgd", "cg", "sdd"} == set(OPTS)
    for name, cls in SOLVERS.items():
        assert cls.name == name and issubclass(cls, Solver)
        # the function's keyword defaults are the Options' (no drift between the two)
        params = inspect.signature(cls.function()).parameters
        for key, value in make_solver(name).options_dict().items():
            default = params[key].default
            assert value == default or (key == "precond" and name == "cg" and default is None)


@pytest.mark.parametrize("name", sorted(OPTS))
def test_solver_object_reproduces_its_function(problem, name):
    la, system, noise = problem
    fn = get_solver(name)
    solver = make_solver(name, **OPTS[name])
    a = solver.sample(system, 3, gen(), noise=noise)
    b = fn(system, 3, gen(), noise=noise, **OPTS[name])
    torch.testing.assert_close(a.samples, b.samples, rtol=0, atol=0)
    assert a.iterations == b.iterations
    # and the mean, through the posterior's public signature (a name or a Solver)
    target = la.whitened_targets(system)
    torch.manual_seed(2)  # linear_mode takes no generator: the global one, reseeded
    m = fn(system, 1, target=target, **OPTS[name]).samples
    torch.manual_seed(2)
    torch.testing.assert_close(la.linear_mode(solver).samples, m, rtol=0, atol=0)
    torch.manual_seed(2)
    torch.testing.assert_close(la.linear_mode(name, **OPTS[name]).samples, m, rtol=0, atol=0)
    s = la.sample(3, solver, gen(), noise=noise).samples
    torch.testing.assert_close(s, a.samples, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(OPTS))
def test_precondition_then_sample_equals_a_fresh_solver(problem, name):
    """The shared build uses the default fixed-seed probes a solve without a generator
    uses for itself, so the draws are the same."""
    _, system, noise = problem
    fresh = make_solver(name, **OPTS[name])
    shared = fresh.precondition(system)
    torch.manual_seed(3)  # sdd's step size comes from torch's generator without one
    a = shared.sample(system, 3, noise=noise)
    torch.manual_seed(3)
    b = fresh.sample(system, 3, noise=noise)
    torch.testing.assert_close(a.samples, b.samples, rtol=0, atol=0)
    assert type(shared) is type(fresh) and fresh.options == make_solver(name, **OPTS[name]).options
    # the options-dict wrapper kept for scripts builds the same object
    kw = with_prebuilt_preconditioner(system, name, dict(OPTS[name]))
    torch.manual_seed(3)
    c = make_solver(name, **kw).sample(system, 3, noise=noise)
    torch.testing.assert_close(c.samples, b.samples, rtol=0, atol=0)


def test_what_precondition_builds(problem, monkeypatch):
    _, system, _ = problem
    calls = []
    real = cg.nystrom_preconditioner
    monkeypatch.setattr(
        cg, "nystrom_preconditioner", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    built = make_solver("cg", precond_rank=5).precondition(system)
    assert len(calls) == 1 and callable(built.options.precond)
    assert built.refreshable is built.options.precond
    assert built.precondition(system) is built and len(calls) == 1  # a prebuilt one is kept
    for unshared in (make_solver("cg", precond_rank=0), make_solver("cg", precond=None)):
        assert unshared.precondition(system) is unshared and unshared.refreshable is None
    refreshed = built.refresh(system, built.refreshable)
    assert "refresh" in refreshed.options.precond.info and len(calls) == 1
    assert make_solver("sdd").precondition(system) == make_solver("sdd")
    assert make_solver("sgd", precond=None).precondition(system).options.precond is None
    lowrank = make_solver("sgd", precond_rank=5).precondition(system).options.precond
    assert type(lowrank).__name__ == "LowRankPreconditioner"
    assert make_solver("exact").precondition(system).options.factors["mode"] in ("primal", "dual")
    # the fallback when a preconditioner fails: cg without one, the others have none to drop
    assert make_solver("cg").without_preconditioner().options.precond_rank == 0
    assert make_solver("cg", precond_rank=0).without_preconditioner() is None
    assert make_solver("sgd").without_preconditioner() is None


def test_warm_start_shapes(problem):
    la, system, noise = problem
    for name in sorted(OPTS):
        solver = make_solver(name, **OPTS[name])
        res = solver.sample(system, 3, gen(), noise=noise)
        init = solver.warm_start(la.prior, res, res.samples)
        if name == "exact":
            assert init is None
        elif name == "sgd":  # whitened u = L⁻¹z
            assert init.shape == (3, system.d)
            torch.testing.assert_close(la.prior.sqrt_mv(init), res.samples)
        else:  # the dual α
            assert init.shape == (3, system.n_obs) and init is res.state["alpha"]
    # a cg warm start at its converged solution needs no iteration
    solver = make_solver("cg", **OPTS["cg"])
    res = solver.sample(system, 3, noise=noise)
    again = solver.sample(system, 3, noise=noise, init=solver.warm_start(la.prior, res, None))
    assert res.converged and res.iterations > 0 and again.iterations == 0
    torch.testing.assert_close(again.samples, res.samples)


def test_unknown_options_and_names_are_named():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['max_iter'\].*'iterations'"):
        make_solver("cg", max_iter=10)
    with pytest.raises(ValueError, match=r"\['bogus'\] for solver 'sgd'.*valid options"):
        make_solver("sgd", iterations=5, bogus=1)
    with pytest.raises(ValueError, match=r"unknown solver 'gibbs'.*'cg'.*'exact'"):
        make_solver("gibbs")
    with pytest.raises(ValueError, match="unknown solver"):
        get_solver("gibbs")
    with pytest.raises(ValueError, match="unknown option"):
        make_solver(make_solver("cg"), lr=0.1)  # changes to an instance are checked too
    la = blr(n=20, p=5, prior_variance=0.05, noise_var=0.3)
    with pytest.raises(ValueError, match="unknown option"):
        la.sample(2, "exact", tol=1e-3)


@pytest.mark.parametrize(
    "name, bad, match",
    [
        ("cg", {"iterations": -1}, "iterations must be >= 0"),
        ("sgd", {"iterations": -5}, "iterations must be >= 0"),
        ("sdd", {"iterations": 0}, "iterations must be >= 1"),
        ("cg", {"tol": -1e-3}, "tol must be"),
        ("sdd", {"tol": float("nan")}, "tol must be"),
        ("cg", {"precond_rank": -1}, "precond_rank must be >= 0"),
        ("sgd", {"oversample": -2}, "oversample must be >= 0"),
        ("sgd", {"momentum": 1.5}, "momentum must be"),
        ("sdd", {"lr": 0.0}, "lr must be"),
        ("sgd", {"batch_size": 0}, "batch_size must be >= 1"),
        ("sdd", {"averaging": 2.0}, "averaging must be"),
        ("sgd", {"precond": "nystrom"}, "precond must be"),
        ("cg", {"precond": "lowrank"}, "precond must be"),
        ("exact", {"mode": "sideways"}, "exact mode"),
    ],
)
def test_invalid_values_raise_value_error(name, bad, match):
    with pytest.raises(ValueError, match=match):
        make_solver(name, **bad)


def test_type_errors_for_wrong_kinds():
    with pytest.raises(TypeError, match="iterations must be an integer"):
        make_solver("cg", iterations=2.5)
    with pytest.raises(TypeError, match="precond must be"):
        make_solver("sgd", precond=3)
    with pytest.raises(ValueError, match="unknown solver 3"):
        make_solver(3)


@pytest.mark.parametrize("name", sorted(OPTS))
def test_registry_round_trip_and_repr(name):
    solver = make_solver(name, **OPTS[name])
    d = solver.options_dict()
    assert make_solver(name, **d) == solver
    assert make_solver(name).options_dict() == type(solver)().options_dict()
    assert make_solver(solver) is solver and make_solver(solver, **d) == solver
    assert repr(solver).startswith(type(solver).__name__ + "(")
    for key in d:
        assert f"{key}=" in repr(solver)


def test_replace_and_register():
    s = make_solver("cg", tol=1e-3)
    t = s.replace(iterations=7)
    assert (t.options.tol, t.options.iterations, s.options.iterations) == (1e-3, 7, 500)
    assert t != s and t == make_solver("cg", tol=1e-3, iterations=7)
    with pytest.raises(ValueError, match="already registered"):
        register(CGSolver)


def test_pipeline_config_checks_solver_opts_through_the_registry():
    from dip_uq.uq.config import SOLVERS as CONFIG_SOLVERS
    from dip_uq.uq.config import UQConfig

    assert set(CONFIG_SOLVERS) == set(SOLVERS)
    with pytest.raises(ValueError, match=r"solver_opts: unknown option\(s\) \['max_iter'\]"):
        UQConfig(solver="cg", solver_opts={"max_iter": 20})
    with pytest.raises(ValueError, match="solver_opts: iterations must be >= 0"):
        UQConfig(solver="sgd", solver_opts={"iterations": -1})
    with pytest.raises(ValueError, match="for solver 'cg'"):  # the EM solver's options too
        UQConfig(solver="sgd", em_solver="cg", solver_opts={"lr": 0.1})
    cfg = UQConfig(solver="sgd", solver_opts={"precond": None, "iterations": 5})
    assert cfg.solver_opts == {"precond": None, "iterations": 5}
    assert UQConfig(solver="exact").resolved_estimator == "exact"


def test_stream_defaults_live_with_each_solver():
    """The front door's per-solver defaults come from the solver classes (no name checks
    elsewhere): softmax cg at tol 1e-3, regression at the engine's; sgd's step from λ̂
    unless the user gave one; exact none. Every default is a valid option."""
    from dip_uq.laplace.solvers import solver_class

    class _Sys:  # a stand-in whose λ_max is known
        device = torch.device("cpu")

        def lambda_max(self, generator=None):
            return 9.0

    assert solver_class("cg").stream_defaults(_Sys(), True, 3, set()) == {"tol": 1e-3}
    assert solver_class("cg").stream_defaults(_Sys(), False, 3, set()) == {}
    sgd = solver_class("sgd").stream_defaults(_Sys(), False, 3, set())
    assert sgd == {"polyak": True, "iterations": 150, "check_every": 3, "lr": 0.01}
    assert "lr" not in solver_class("sgd").stream_defaults(_Sys(), False, 3, {"lr"})
    assert solver_class("exact").stream_defaults(_Sys(), True, 3, set()) == {}
    for name in ("cg", "sgd", "exact", "sdd"):
        make_solver(name, **solver_class(name).stream_defaults(_Sys(), True, 2, set()))

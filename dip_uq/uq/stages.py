"""The stages of the CT uncertainty pipeline, each a function of the stages before it:

    held-out split → DIP → linearisation → hyperparameters → samples → noise term → predictive

Every stage that costs time is checkpointed through one :class:`~dip_uq.uq.store.StageStore`,
keyed on its settings and on the digest of what it consumed (docs/uncertainty.md, "Resume").
Warnings (non-convergence: the result is then marked unconverged) and advisories (model
caveats) are collected in one :class:`Notes` and carried by the result.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import NonFiniteError
from ..laplace import LinearisedLaplace, Welford
from ..laplace.solvers import SOLVERS, Solver, make_solver
from .calibration import HeldOutSplit, calibrate_on_heldout
from .config import UQConfig
from .linearised import hyper_state, load_hyper_state, sgd_momentum
from .noise_term import NoiseTerm, image_noise_term
from .store import StageStore, digest

__all__ = [
    "Notes",
    "DIPStage",
    "SampleStats",
    "dip_stage",
    "hyper_stage",
    "sample_stage",
    "noise_stage",
    "predictive_stage",
    "check_finite",
]

#: advisory above this fraction of voxels where the output sigmoid is flat (slope < 1e-4)
SATURATION_WARN = 0.1


@dataclass
class Notes:
    """Warnings (something did not converge: the result says so) and advisories (caveats about
    the model or the data); both are also emitted as ``RuntimeWarning``."""

    warnings: list[str] = field(default_factory=list)
    advisories: list[str] = field(default_factory=list)

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def advise(self, msg: str, *, emit: bool = False) -> None:
        self.advisories.append(msg)
        if emit:
            warnings.warn(msg, RuntimeWarning, stacklevel=3)


def check_finite(stage: str, *tensors: Any) -> None:
    """Raise :class:`~dip_uq.errors.NonFiniteError` naming ``stage`` if any value is NaN/inf."""
    for t in tensors:
        if not torch.all(torch.isfinite(torch.as_tensor(t))):
            raise NonFiniteError(
                f"non-finite values (NaN/inf) appeared in the {stage} stage; lower the solver "
                "learning rate (solver_opts={'lr': ...}), use solver='cg' or 'exact', or check "
                "the data scale",
                stage=stage,
            )


def _guarded(stage: str, fn, *args, **kwargs):
    """Run ``fn``, turning the engine's NaN complaints (operator checks, Cholesky of a
    non-finite matrix) into one :class:`NonFiniteError` for the stage."""
    try:
        return fn(*args, **kwargs)
    except NonFiniteError:
        raise
    except (ValueError, torch.linalg.LinAlgError) as err:
        msg = str(err)
        if "NaN" in msg or "nan" in msg or "infinite" in msg:
            raise NonFiniteError(
                f"non-finite values (NaN/inf) appeared in the {stage} stage ({msg}); try "
                "tied=True, fewer free hyperparameters or solver='exact'",
                stage=stage,
            ) from err
        raise


def _precond_fallback(call, solver: Solver) -> tuple[Any, Solver]:
    """``(call(solver), solver)``; when the solver's preconditioner fails its factorisation
    (cg's Nyström Cholesky: round-off on a nearly rank-deficient kernel), warn and rerun with
    :meth:`~dip_uq.laplace.solvers.Solver.without_preconditioner`, returned for later calls."""
    try:
        return call(solver), solver
    except torch.linalg.LinAlgError as err:
        plain = solver.without_preconditioner()
        if plain is None:
            raise
        old = solver.options_dict()
        changed = ", ".join(
            f"{k}={v!r}" for k, v in plain.options_dict().items() if v is not old[k]
        )
        warnings.warn(
            f"{solver.name}: the preconditioner failed ({err}); continuing without it ({changed})",
            RuntimeWarning,
            stacklevel=3,
        )
        return call(plain), plain


def _progress(*, total: int, initial: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False)


# ----------------------------------------------------------------------------------- DIP
@dataclass
class DIPStage:
    """The network, its input, the reconstruction x* (volume shape) and what is known of
    the fit (``info``); ``key`` digests all of it for the stages after."""

    net: nn.Module
    input: torch.Tensor
    image: torch.Tensor
    info: dict
    key: str


def dip_stage(
    split: HeldOutSplit,
    cfg: UQConfig,
    dip: Any,
    net_input: torch.Tensor | None,
    store: StageStore,
    generator: torch.Generator | None,
    progress: bool,
) -> DIPStage:
    """x* = f(z₀; θ*): a given :class:`~dip_uq.dip.DIPResult` or network, or a fit of
    ``cfg.dip`` on the fit views (stopped and selected on the held-out views by default;
    resumable through fit_dip's own checkpoints in ``<dir>/dip``)."""
    from ..dip import DIPResult, HeldOutStopping, fit_dip, initial_input

    op, y = split.fit_operator, split.fit_y
    if isinstance(dip, DIPResult):
        net, z0, image, info = dip.net, dip.input, dip.image, {"source": "DIPResult"}
    elif isinstance(dip, nn.Module):
        z0 = net_input if net_input is not None else initial_input(y, op, "fbp")
        with torch.no_grad():
            image = dip.eval()(z0)
        net, info = dip, {"source": "given network"}
    else:
        opts = cfg.dip.fit_dip_options(math.prod(tuple(op.domain_shape)))
        stopping = None
        if cfg.dip.stopping == "heldout" and split.heldout_operator is not None:
            stopping = HeldOutStopping(
                split.heldout_operator, split.heldout_y, patience=cfg.dip.resolved_patience
            )
        kw = {}
        if store.directory is not None:
            kw = {"checkpoint_dir": store.directory / "dip", "resume": store.resume}
        t0 = time.perf_counter()
        res = fit_dip(
            y, op, stopping=stopping, generator=generator, progress=progress, **kw, **opts
        )
        net, z0, image = res.net, res.input, res.image
        info = {
            "source": "fit_dip",
            "iterations": res.iterations_run,
            "best_iteration": res.best_iteration,
            "best_loss": res.best_loss,
            "seconds": time.perf_counter() - t0,
            "options": {k: v for k, v in opts.items() if isinstance(v, int | float | str)},
        }
        if stopping is not None:
            info.update(stopping="heldout", heldout_misfit=stopping.best_value)
    domain = tuple(op.domain_shape)
    if image.numel() != math.prod(domain):
        raise ValueError(
            f"network output shape {tuple(image.shape)} does not match the operator's volume "
            f"{domain} (expected (1, 1, {', '.join(map(str, domain))}))"
        )
    check_finite("DIP", image)
    image = image.detach().reshape(domain)
    with torch.no_grad():  # (1/d_y)‖A x* − y‖²: EM's σ² absorbs any excess over the noise
        info["data_misfit"] = float((op(image.to(y.dtype)) - y).pow(2).mean())
    key = digest(image, z0, [p for p in net.state_dict().values()], y, split.views)
    return DIPStage(net, z0, image, info, key)


# ----------------------------------------------------------------------- hyperparameters
def _em_settings(cfg: UQConfig, dtype: torch.dtype, views: list[int]) -> dict:
    return {
        "hyper": cfg.hyper,
        "prior": cfg.prior,
        "tied": cfg.resolved_tied,
        "em_cycles": int(cfg.em_cycles),
        "em_samples": int(cfg.em_samples),
        "em_solver": cfg.resolved_em_solver,
        "em_estimator": cfg.resolved_estimator,
        "dtype": str(dtype),
        "holdout": [float(cfg.holdout), int(cfg.holdout_seed), list(views)],
    }


#: the pipeline's option defaults per solver, under the user's ``solver_opts``: sgd runs
#: with its low-rank preconditioner (the engine's default "auto" is the same for full batches)
PIPELINE_DEFAULTS: dict[str, dict[str, Any]] = {"sgd": {"precond": "lowrank"}}


def _tunes_momentum(name: str) -> bool:
    """Whether solver ``name`` takes the conditioning-matched momentum when the user turns
    its preconditioner off (a momentum method with a preconditioner option: sgd)."""
    return {"momentum", "precond"} <= set(SOLVERS[name].option_names())


def _make_solver(cfg: UQConfig, name: str, momentum: float | None) -> Solver:
    """Solver ``name`` with the user's ``solver_opts`` over the pipeline's defaults
    (:data:`PIPELINE_DEFAULTS`; ``momentum``, when computed, is one for sgd)."""
    defaults = dict(PIPELINE_DEFAULTS.get(name, {}))
    if momentum is not None and _tunes_momentum(name):
        defaults["momentum"] = momentum
    return make_solver(name, **{**defaults, **cfg.solver_opts})


def hyper_stage(
    la: LinearisedLaplace,
    cfg: UQConfig,
    store: StageStore,
    upstream: str,
    views: list[int],
    generator: torch.Generator | None,
    progress: bool,
    notes: Notes,
) -> tuple[dict, float | None]:
    """Prior variances, lengthscales and σ² by ``cfg.hyper`` (in place on ``la``). EM resumes
    from its last completed cycle. Returns (trajectories, the sgd momentum used or None)."""
    settings = _em_settings(cfg, la.targets.dtype, views)
    momentum = None
    if (
        any(_tunes_momentum(n) for n in (cfg.solver, cfg.resolved_em_solver))
        and "momentum" not in cfg.solver_opts
        and cfg.solver_opts.get("precond", "lowrank") is None
    ):
        momentum = sgd_momentum(la)
    done = store.load("hyper", settings, upstream)
    if done is not None:
        load_hyper_state(la, done["hyper"])
        notes.warnings.extend(done["notes"]["warnings"])
        notes.advisories.extend(done["notes"]["advisories"])
        if generator is not None and done.get("generator") is not None:
            generator.set_state(done["generator"])
        return done["trajectories"], momentum
    em_resume = None
    partial = store.load("em_cycle", settings, upstream) if cfg.hyper == "em" else None
    if partial is not None:
        load_hyper_state(la, partial["hyper"])
        em_resume = partial["em"]
    state0 = hyper_state(la)

    def save_cycle(state):
        store.save("em_cycle", settings, upstream, {"hyper": hyper_state(la), "em": state})

    def run(solver: Solver):
        load_hyper_state(la, state0)  # a retry starts from the same point
        return _guarded(
            "hyperparameter",
            _fit_hyper,
            la,
            cfg,
            solver,
            generator,
            notes,
            progress,
            save_cycle if store.directory is not None else None,
            em_resume,
        )

    traj, _ = _precond_fallback(run, _make_solver(cfg, cfg.resolved_em_solver, momentum))
    traj.pop("_preconditioner", None)  # in memory only
    check_finite("hyperparameter", la.prior.variances(), la.likelihood.noise_var)
    store.save(
        "hyper",
        settings,
        upstream,
        {
            "hyper": hyper_state(la),
            "trajectories": traj,
            "notes": {"warnings": list(notes.warnings), "advisories": list(notes.advisories)},
            "generator": generator.get_state() if generator is not None else None,
        },
    )
    store.remove("em_cycle")  # superseded by the completed stage
    return traj, momentum


def _fit_hyper(la, cfg, solver, generator, notes, progress, on_cycle, resume_from) -> dict:
    if cfg.hyper == "fixed":
        return {}
    if cfg.hyper != "em":
        from .tv_predcp import maximise_type2

        tv = None
        if cfg.hyper == "tv-map":
            weight = cfg.tv_weight if cfg.tv_weight is not None else 1e-4
            tv = {"weight": weight, "scale": cfg.tv_scale}
        return maximise_type2(la, tv=tv, tied=cfg.resolved_tied, generator=generator)
    done = int(resume_from["cycle"]) if resume_from is not None else 0
    bar = _progress(total=cfg.em_cycles, initial=done, enabled=progress, desc=f"EM ({solver.name})")
    hist = la.fit_hyperparameters(
        n_cycles=cfg.em_cycles,
        n_samples=cfg.em_samples,
        solver=solver,
        generator=generator,
        tied_cycles=cfg.em_cycles if cfg.resolved_tied else None,
        estimator=cfg.resolved_estimator,
        sample_batch=cfg.sample_batch,
        refresh_preconditioner=cfg.reuse_preconditioner,
        on_cycle=_ticking(on_cycle, bar),
        resume_from=resume_from,
    )
    if bar is not None:
        bar.close()
    traj = {
        "noise_var": list(hist.noise_var),
        "prior_variance": [v.tolist() for v in hist.prior_variance],
        "lengthscale": [v.tolist() for v in hist.lengthscale],
        "gamma": [g.tolist() for g in hist.gamma],
        "mode_residual": list(hist.mode_residual),
        "sample_residual": list(hist.sample_residual),
        "converged": list(hist.converged),
        "iterations": [list(x) for x in hist.iterations],
        "noise_update": list(hist.noise_update),
        "_preconditioner": hist.preconditioner,
    }
    n_obs = la.targets.numel()
    over = [i + 1 for i, g in enumerate(hist.gamma) if float(g.sum()) >= n_obs - 1]
    solved = all(hist.converged)
    if over:
        msg = (
            f"EM: the effective dimension γ̂ reached the number of observations ({n_obs}) in "
            f"cycle(s) {over}; σ²'s denominator n_obs − γ̂ was floored at three Monte-Carlo "
            "standard errors there (noise_update)"
        )
        if solved:  # the Monte-Carlo error of γ̂ near n_obs, not a failed solve
            notes.advise(msg + ": a DIP that fits nearly every measurement direction")
        else:
            notes.warn(
                msg + "; the samples did not converge: use a larger precond_rank or more "
                "solver iterations"
            )
    if not all(hist.converged[-1:]):
        notes.warn(
            f"EM: the {solver.name} solver did not converge in the last cycle (mode residual "
            f"{hist.mode_residual[-1]:.3g}, sample residual {hist.sample_residual[-1]:.3g}); "
            "raise its iterations (solver_opts iterations) or precond_rank, or "
            "use dtype=float64"
        )
    return traj


def _ticking(on_cycle, bar):
    """The engine's per-cycle callback, also ticking the progress bar."""
    if on_cycle is None and bar is None:
        return None

    def call(state):
        if bar is not None:
            bar.update(1)
        if on_cycle is not None:
            on_cycle(state)

    return call


# ------------------------------------------------------------------------------- samples
@dataclass
class SampleStats:
    """The weight posterior's voxelwise variance mean_k (J z_k)², the same samples' variance
    at the held-out measurements (or ``None``), optional stored samples, per-batch solver
    diagnostics."""

    variance: torch.Tensor
    heldout_variance: torch.Tensor | None
    samples: torch.Tensor | None
    batches: list[dict]


def sample_stage(
    la: LinearisedLaplace,
    cfg: UQConfig,
    held_op: Any,
    store: StageStore,
    upstream: str,
    settings: dict,
    momentum: float | None,
    generator: torch.Generator | None,
    progress: bool,
    notes: Notes,
) -> SampleStats:
    """``cfg.n_samples`` zero-mean posterior samples by ``cfg.solver``, streamed (Welford)
    into the image and held-out variances; resumable per batch (a larger ``n_samples``
    continues the stream)."""
    domain = tuple(la.fmodel.output(la.inputs).shape)
    acc, acc_h, kept, diag, done = Welford(), Welford(), [], [], 0
    settings = {**settings, "solver": cfg.solver, "sample_batch": int(cfg.sample_batch),
                "keep_samples": bool(cfg.keep_samples)}  # fmt: skip
    saved = store.load("samples", settings, upstream)
    if saved is not None:
        acc.load_state_dict(saved["welford"])
        if saved.get("welford_heldout") is not None:
            acc_h.load_state_dict(saved["welford_heldout"])
        kept, diag, done = list(saved["kept"]), list(saved["diag"]), int(saved["done"])
        if generator is not None and saved.get("generator") is not None:
            generator.set_state(saved["generator"])
    name = cfg.solver
    # one preconditioner (exact: dense factors) for every sample batch (the
    # hyperparameters are fixed from here on)
    solver, _ = _precond_fallback(
        lambda s: s.precondition(la.system()), _make_solver(cfg, name, momentum)
    )
    bar = _progress(total=cfg.n_samples, initial=done, enabled=progress, desc="posterior samples")
    try:
        while done < cfg.n_samples:
            k = min(int(cfg.sample_batch), int(cfg.n_samples) - done)
            res, solver = _guarded(
                f"{name} sampling",
                _precond_fallback,
                lambda s, k=k: la.sample(k, s, generator),
                solver,
            )
            fs = la.functional_samples(res.samples)
            check_finite(f"{name} sampling", fs)
            acc.update(fs)
            if held_op is not None:  # the same samples seen from the held-out views
                with torch.no_grad():
                    acc_h.update(held_op(fs.reshape(-1, *domain)).reshape(fs.shape[0], -1))
            if cfg.keep_samples:
                kept.append(fs.detach().cpu())
            diag.append(
                {
                    "iterations": res.iterations,
                    "residual": res.residual,
                    "converged": bool(res.converged),
                }  # fmt: skip
            )
            done += k
            if bar is not None:
                bar.update(k)
            store.save(
                "samples",
                settings,
                upstream,
                {
                    "welford": acc.state_dict(),
                    "welford_heldout": acc_h.state_dict() if held_op is not None else None,
                    "kept": kept,
                    "diag": diag,
                    "done": done,
                    "generator": generator.get_state() if generator is not None else None,
                },
            )
    finally:
        if bar is not None:
            bar.close()
    bad = [d for d in diag if not d["converged"]]
    if bad:
        notes.warn(
            f"{name}: {len(bad)} of {len(diag)} sample batches did not converge (worst "
            f"relative residual {max(d['residual'] for d in bad):.3g}); the std map may be "
            "biased. Raise the solver's iterations or precond_rank, use dtype=float64, or "
            "solver='cg'"
        )
    return SampleStats(
        variance=acc.second_moment().reshape(domain),
        heldout_variance=acc_h.second_moment() if held_op is not None else None,
        samples=torch.cat(kept) if kept else None,
        batches=diag,
    )


# ---------------------------------------------------------------------------- noise term
def noise_stage(
    split: HeldOutSplit,
    y: torch.Tensor,
    sigma2: float,
    cfg: UQConfig,
    store: StageStore,
    upstream: str,
    settings: dict,
    generator: torch.Generator | None,
    notes: Notes,
) -> NoiseTerm:
    """The image-space noise term at the learned σ² (docs/methods.md §6.2), checkpointed."""
    settings = {**settings, "noise_probes": int(cfg.noise_probes)}
    upstream = digest(upstream, float(sigma2))  # σ² is EM's result: an input, not a setting
    saved = store.load("noise_term", settings, upstream)
    if saved is not None:
        if generator is not None and saved.get("generator") is not None:
            generator.set_state(saved["generator"])
        nt = NoiseTerm(**saved["term"])
    else:
        nt = image_noise_term(
            y,
            split.fit_operator,
            sigma2,
            n_probes=int(cfg.noise_probes),
            batch=int(cfg.sample_batch),
            heldout_op=split.heldout_operator,
            generator=generator,
        )
        import dataclasses

        store.save(
            "noise_term",
            settings,
            upstream,
            {
                "term": dataclasses.asdict(nt),
                "generator": generator.get_state() if generator is not None else None,
            },
        )
    if not nt.converged:
        notes.warn(
            f"image-space noise term: CG stopped at relative residual "
            f"{nt.diagnostics.get('cg_residual'):.3g}; the noise std map may be biased"
        )
    if not nt.diagnostics.get("discrepancy_bracketed", True):
        notes.advise(
            "image-space noise term: no Tikhonov weight meets the discrepancy principle "
            f"(misfit {nt.diagnostics['discrepancy_misfit']:.3g} vs σ² "
            f"{nt.diagnostics['discrepancy_target']:.3g}); the weight at the end of the search "
            "range was used"
        )
    return nt


# ---------------------------------------------------------------------------- predictive
def predictive_stage(
    split: HeldOutSplit,
    image: torch.Tensor,
    sigma2: float,
    stats: SampleStats,
    noise: NoiseTerm | None,
    cfg: UQConfig,
    notes: Notes,
) -> tuple[dict, dict, Any, dict]:
    """Components, their scales (fitted on the held-out views, docs/methods.md §6.3), the
    calibration record and the held-out data it was fitted from."""
    domain = tuple(image.shape)
    components = {"weights": stats.variance.reshape(domain)}
    heldout = {"weights": stats.heldout_variance} if split.heldout_operator is not None else {}
    if noise is not None:
        components["noise"] = noise.variance.to(stats.variance.dtype).reshape(domain)
        if split.heldout_operator is not None:
            heldout["noise"] = noise.heldout_variance
    if split.heldout_operator is None:
        if cfg.calibration != "none":
            notes.advise(
                "no held-out views (holdout=0): the std map is the model's own, not calibrated "
                "against measurements it did not fit; on real scans it can be several times "
                "too confident (docs/uncertainty.md)"
            )
        return components, {c: 1.0 for c in components}, None, {}
    with torch.no_grad():
        y_h = split.heldout_y.to(image.dtype)
        resid = (y_h - split.heldout_operator(image)).reshape(-1)
    calib = calibrate_on_heldout(
        resid, heldout, components, sigma2, split.view_of, split.views, mode=cfg.calibration
    )
    record = {
        "residual": resid,
        "view_of": split.view_of,
        **{f"variance_{c}": v.reshape(-1) for c, v in heldout.items()},
    }
    return components, dict(calib.scales), calib, record


def prepare_network(net: nn.Module, z0: torch.Tensor, y: torch.Tensor) -> tuple[nn.Module, Any]:
    """The network and input in the linearised stage's dtype/device (the caller's network is
    copied, never changed)."""
    if any(p.dtype != y.dtype or p.device != y.device for p in net.parameters()):
        net = copy.deepcopy(net).to(device=y.device, dtype=y.dtype)
    return net, z0.to(device=y.device, dtype=y.dtype)

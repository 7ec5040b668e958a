"""The linearised deep image prior: a CT reconstruction with a voxelwise uncertainty map.

``reconstruct_with_uncertainty(y, operator)`` runs (methods §4-6):

1. DIP fit x* = f(z₀; θ*) (or a given trained network and its input);
2. linearisation of the conv weights θ (biases and norm parameters stay at θ*; J through the
   optional output sigmoid), observation model y = A(x* + J(θ − θ*)) + ε, ε ~ N(0, σ_y² I);
3. prior per U-Net block: Matérn-½ filter prior for 3×3 (3×3×3) convs, block Normal for
   1×1 convs (``prior="matern"``, the default), Normal everywhere (``"normal"``), or the
   g-prior (``"g-prior"``: block Normal on w with θ = S w, s_i = M_ii^{-½});
4. hyperparameters (prior variances, lengthscales, noise variance σ_y², always learned):
   ``"em"`` sample-based EM (scalable default; θ_lin = mode of the affine tangent model with
   the prior, see :mod:`dip_uq.laplace.posterior`), ``"mll"`` exact type-II maximum
   likelihood (dense, small d_y), ``"tv-map"`` type-II MAP with the TV-PredCP hyperprior
   on the Matérn lengthscales (dense, small d_y), ``"fixed"`` (keep the initial values);
5. zero-mean posterior samples z_k ~ N(0, H⁻¹) by ``solver`` (``exact``, ``cg``, ``sgd``,
   ``sdd``) and the streamed voxelwise variance mean_k (J z_k)² (Welford).

With ``checkpoint_dir`` every stage is saved atomically and a rerun resumes from the last
completed one: DIP (through :func:`fit_dip`'s own checkpoints), EM cycles, the
hyperparameter stage, sample batches; a checkpoint written under other settings is refused
(``CheckpointError``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..laplace import Gaussian, LinearisedLaplace, Welford
from ..laplace.solvers import (
    dense_factors,
    functional_covariance,
    with_prebuilt_preconditioner,
)
from ..laplace.solvers.sgd import auto_momentum
from .result import UQResult

__all__ = [
    "reconstruct_with_uncertainty",
    "build_laplace",
    "unet_block_of",
    "exact_image_covariance",
    "tied_evidence_maximiser",
    "DIVERGENCE_MESSAGE",
]

HYPER_MODES = ("em", "mll", "tv-map", "fixed")
PRIORS = ("matern", "normal", "g-prior")
DIVERGENCE_MESSAGE = "non-finite values (NaN/inf) appeared in the {stage} stage"

#: fit_dip settings used when ``dip`` is None: a 3-scale, 16-channel U-Net with a linear
#: output (a sigmoid caps the image at 1 and flattens J where it saturates, docs/dip.md), a
#: resolution-free TV weight (``None``: 1e-4 · 784 / n_voxels, methods' 28×28 value), and at
#: most ``iterations`` Adam steps, stopped and selected on the held-out views when there are
#: any (``"stopping": "heldout"``: :class:`~dip_uq.dip.HeldOutStopping`).
DEFAULT_DIP = {
    "tv_weight": None,
    "iterations": 5000,
    "lr": 1e-3,
    "net": {"channels": (16, 16, 16), "skip_channels": (0, 4, 4), "use_sigmoid": False},
    "stopping": "heldout",
}
#: TV weight per voxel at 28×28 (methods' 20-angle setting), scaled by 784 / n_voxels
TV_PER_784 = 1e-4
#: warn when the output sigmoid is flat (slope < 1e-4) at more than this fraction of voxels
SATURATION_WARN = 0.1


class _VolumeModel(nn.Module):
    """f(z₀; θ) with output reshaped to the volume ``(H, W)`` / ``(D, H, W)`` for the operator."""

    def __init__(self, net: nn.Module, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.net = net
        self.shape = tuple(shape)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).reshape(self.shape)


def unet_block_of(name: str) -> str:
    """U-Net block of a parameter name (``net.`` prefix ignored): ``inc``, ``outc``, or the
    first two components (``down.0``, ``up.1``, ``skip.0``)."""
    parts = name.split(".")
    if parts and parts[0] == "net":
        parts = parts[1:]
    if parts[0] in ("inc", "outc") or len(parts) < 3:
        return parts[0]
    return ".".join(parts[:2])


def _domain_range(operator: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if not callable(operator) or not callable(getattr(operator, "T", None)):
        raise TypeError(
            f"operator {type(operator).__name__} must be callable with an adjoint .T "
            "(e.g. operators.RayTransform)"
        )
    try:
        return tuple(operator.domain_shape), tuple(operator.range_shape)
    except AttributeError as err:
        raise TypeError(
            f"operator {type(operator).__name__} needs domain_shape and range_shape"
        ) from err


def _check_y(y: Any, range_shape: tuple[int, ...]) -> torch.Tensor:
    y = torch.as_tensor(y)
    if not y.is_floating_point():
        y = y.float()
    if tuple(y.shape) != range_shape:
        raise ValueError(
            f"sinogram/operator mismatch: the operator's range (sinogram) shape is "
            f"{range_shape}, got y of shape {tuple(y.shape)}"
        )
    if not torch.all(torch.isfinite(y)):
        raise ValueError("sinogram y contains NaN or infinite values")
    return y


def build_laplace(
    net: nn.Module,
    z0: torch.Tensor,
    y: torch.Tensor,
    operator: Any,
    *,
    prior: str = "matern",
    noise_var: float = 1.0,
    prior_variance: float = 1.0,
    lengthscale: float = 0.1,
    g_prior_probes: int = 64,
    generator: torch.Generator | None = None,
) -> LinearisedLaplace:
    """The linearised-DIP posterior object: conv weights of ``net`` under a per-block prior,
    Gaussian likelihood through ``operator``; ``z0`` ``(1, C, *volume)`` is the net input."""
    if prior not in PRIORS:
        raise ValueError(f"unknown prior {prior!r}; use one of {PRIORS}")
    domain, _ = _domain_range(operator)
    with torch.no_grad():
        out = net(z0)
    if out.numel() != math.prod(domain):
        raise ValueError(
            f"network output shape {tuple(out.shape)} does not match the operator's volume "
            f"{domain} (expected (1, 1, {', '.join(map(str, domain))}))"
        )
    model = _VolumeModel(net, domain)
    # block kind: Matérn for blocks holding a k×k filter with k > 1, Normal otherwise
    has_filter: dict[str, bool] = {}
    for mname, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            b = unet_block_of(f"{mname}.weight")
            taps = math.prod(m.weight.shape[2:])
            has_filter[b] = has_filter.get(b, False) or taps > 1
    kind = (
        (lambda b: "matern" if has_filter.get(b, False) else "normal")
        if prior == "matern"
        else "normal"
    )
    la = LinearisedLaplace(
        model,
        Gaussian(noise_var, operator),
        z0,
        y,
        params="conv_weights",
        blocks=unet_block_of,
        prior=kind,
        prior_variance=prior_variance,
        lengthscale=lengthscale,
    )
    if prior == "g-prior":
        la.set_g_prior("ggn", n_probes=g_prior_probes, generator=generator)
    return la


def exact_image_covariance(la: LinearisedLaplace) -> torch.Tensor:
    """Dense posterior covariance of the image, J H⁻¹ Jᵀ ``(n_vox, n_vox)`` in float64
    (small problems: forms the dense Jacobian and the exact factors)."""
    system = la.system()
    with torch.no_grad():
        J = la.fmodel.dense_jacobian(la.inputs)
    return functional_covariance(system, J, dense_factors(system))


def tied_evidence_maximiser(
    la: LinearisedLaplace, max_iter: int = 200
) -> tuple[float, float, float]:
    """Exact type-II ML over one shared prior variance v and σ² (small problems; a reference
    for EM and MLL), at the prior's current block shapes: Σ = v Σ₁ with Σ₁ the prior at v = 1.

    With K₀ = (AJ) Σ₁ (AJ)ᵀ = U S Uᵀ (float64, dense) and c = Uᵀỹ, ỹ = y − A x* + AJ θ*,
    log p(y) = −½ Σ_i [c_i² / (v s_i + σ²) + log(v s_i + σ²)] − (n/2) log 2π, maximised
    over (log v, log σ²) by L-BFGS (one eigendecomposition, then O(n) per evaluation).
    Returns (v, σ², log evidence); ``la`` is not modified.
    """
    lik = la._gaussian("the tied evidence maximiser")
    v_now = la.prior.variances().detach().double()
    if not torch.allclose(v_now, v_now[0].expand_as(v_now), rtol=1e-6):
        raise ValueError("tied_evidence_maximiser needs one shared prior variance (tied=True)")
    AJ = la.dense_observation_jacobian()
    with torch.no_grad():
        pred = lik.observe(la.fmodel.output(la.inputs)).reshape(-1).double()
        ytil = la.targets.reshape(-1).double() - pred + AJ @ la.theta_star().double()
        K0 = AJ @ la.prior.cov_mv(AJ).T.double() / v_now[0]
        S, U = torch.linalg.eigh(0.5 * (K0 + K0.T))
        S = S.clamp_min(0.0)
        c2 = (U.T @ ytil) ** 2
    logs = torch.tensor(
        [math.log(float(v_now[0])), math.log(float(lik.noise_var))],
        dtype=torch.float64,
        requires_grad=True,
    )
    opt = torch.optim.LBFGS([logs], max_iter=max_iter, line_search_fn="strong_wolfe")

    def nll():
        opt.zero_grad()
        k = logs[0].exp() * S + logs[1].exp()
        loss = 0.5 * (c2 / k + k.log()).sum()
        loss.backward()
        return loss

    opt.step(nll)
    v, nv = logs.detach().exp()
    k = v * S + nv
    ev = -0.5 * float((c2 / k + k.log()).sum()) - 0.5 * S.numel() * math.log(2 * math.pi)
    return float(v), float(nv), ev


def _resolve_dip(
    y, operator, dip, net_input, generator, progress, ckpt: Path | None, resume=True, heldout=None
):
    """Returns (net, z0, image, dip_info). ``heldout``: (operator, y) of the held-out views,
    for ``"stopping": "heldout"``."""
    from ..dip import DIPResult, HeldOutStopping, fit_dip, initial_input

    if isinstance(dip, DIPResult):
        return dip.net, dip.input, dip.image, {"source": "DIPResult"}
    if isinstance(dip, nn.Module):
        z0 = net_input if net_input is not None else initial_input(operator, y, "fbp")
        with torch.no_grad():
            img = dip.eval()(z0)
        return dip, z0, img, {"source": "given network"}
    opts = dict(DEFAULT_DIP if dip is None else dip)
    if not isinstance(opts, dict):
        raise TypeError(
            f"dip must be None, a dict of fit_dip options, a DIPResult or a network, got {type(dip)}"
        )
    if opts.get("tv_weight", 0.0) is None:
        opts["tv_weight"] = TV_PER_784 * 784 / math.prod(tuple(operator.domain_shape))
    if opts.get("stopping") == "heldout":
        opts["stopping"] = None if heldout is None else HeldOutStopping(*heldout)
    t0 = time.perf_counter()
    kw = {}
    if ckpt is not None:
        kw = {"checkpoint_dir": ckpt / "dip", "resume": resume}
    res = fit_dip(operator, y, generator=generator, progress=progress, **kw, **opts)
    info = {
        "source": "fit_dip",
        "iterations": res.iterations_run,
        "best_iteration": res.best_iteration,
        "best_loss": res.best_loss,
        "seconds": time.perf_counter() - t0,
        "options": {k: v for k, v in opts.items() if isinstance(v, int | float | str)},
        "data_misfit": res.data_misfit,
    }
    stop = opts.get("stopping")
    if isinstance(stop, HeldOutStopping):
        info["heldout_misfit"] = stop.best_value
        info["stopping"] = "heldout"
    return res.net, res.input, res.image, info


def _finite_or_raise(stage: str, *tensors: torch.Tensor) -> None:
    for t in tensors:
        if not torch.all(torch.isfinite(torch.as_tensor(t))):
            raise FloatingPointError(
                DIVERGENCE_MESSAGE.format(stage=stage)
                + "; lower the solver learning rate (solver_opts={'lr': ...}), use solver='cg' "
                "or 'exact', or check the data scale"
            )


def _hyper_state(la: LinearisedLaplace) -> dict:
    return {
        "log_variance": la.prior.log_variance.detach().clone(),
        "log_lengthscale": la.prior.log_lengthscale.detach().clone(),
        "log_noise_var": la.likelihood.log_noise_var.detach().clone(),
        "scale": None if la.prior.scale is None else la.prior.scale.clone(),
    }


def _load_hyper_state(la: LinearisedLaplace, st: dict) -> None:
    with torch.no_grad():
        la.prior.log_variance.copy_(st["log_variance"])
        la.prior.log_lengthscale.copy_(st["log_lengthscale"])
        la.likelihood.log_noise_var.copy_(st["log_noise_var"])
    la.prior.set_scale(st.get("scale"))


def _sgd_momentum(la: LinearisedLaplace) -> float:
    """Nesterov momentum for the primal sgd solver from the condition number of its objective,
    κ = λ_max(ĜᵀĜ) + 1 (the prior part is the identity): the optimal heavy-ball value
    (√κ − 1)/(√κ + 1), clipped to [0.9, 0.999]. The engine's fixed 0.9 needs ~κ/10 steps for
    directions of intermediate curvature; on the 12×12 test problem (κ ≈ 1e5) 4000 steps at
    0.9 left the std 25 % high, at 0.99 within 0.02 % of the exact samples."""
    gen = torch.Generator(device=la.inputs.device).manual_seed(0)  # deterministic estimate
    return auto_momentum(la.system().lambda_max(generator=gen))


def _warn(notes: list[str], msg: str) -> None:
    """Warn and keep the message for the result's ``diagnostics["warnings"]``."""
    notes.append(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=4)


def _fit_hyper(
    la,
    hyper,
    *,
    em_cycles,
    em_samples,
    em_solver,
    solver_opts,
    generator,
    tv,
    tied,
    estimator,
    notes,
    progress=False,
    sample_batch=None,
    reuse_preconditioner=False,
    on_cycle=None,
    resume_from=None,
):
    """Runs the hyperparameter stage in place; returns its trajectories (and appends
    warnings to ``notes``). EM: ``on_cycle``/``resume_from`` as in :func:`fit_em`."""
    if hyper == "fixed":
        return {}
    if hyper == "em":
        done = int(resume_from["cycle"]) if resume_from is not None else 0
        bar = _progress(total=em_cycles, initial=done, enabled=progress, desc=f"EM ({em_solver})")
        set_variances = la.prior.set_variances

        def set_and_tick(v):  # the engine calls this once per EM cycle: drives the bar
            set_variances(v)
            if bar is not None:
                bar.update(1)

        la.prior.set_variances = set_and_tick
        try:
            hist = la.fit_hyperparameters(
                n_cycles=em_cycles,
                n_samples=em_samples,
                solver=em_solver,
                generator=generator,
                solver_opts=solver_opts,
                tied_cycles=em_cycles if tied else None,
                estimator=estimator,
                sample_batch=sample_batch,
                refresh_preconditioner=reuse_preconditioner,
                on_cycle=on_cycle,
                resume_from=resume_from,
            )
        finally:
            del la.prior.set_variances
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
        if over:
            _warn(
                notes,
                f"EM: the effective dimension γ reached the number of observations ({n_obs}) "
                f"in cycle(s) {over}, which is impossible for converged samples (γ ≤ rank M); "
                "σ²'s denominator n_obs − γ̂ was floored at three Monte-Carlo standard errors "
                "there (noise_update). If the samples did not converge, use "
                "dtype=torch.float64, a larger precond_rank or more solver iterations",
            )
        if not all(hist.converged[-1:]):
            _warn(
                notes,
                f"EM: the {em_solver} solver did not converge in the last cycle (mode residual "
                f"{hist.mode_residual[-1]:.3g}, sample residual {hist.sample_residual[-1]:.3g}); "
                "raise its iterations (solver_opts max_iter / iterations) or precond_rank, or "
                "use dtype=torch.float64",
            )
        return traj
    from .tv_predcp import maximise_type2

    return maximise_type2(la, tv=tv if hyper == "tv-map" else None, tied=tied, generator=generator)


def _with_precond_fallback(call, solver: str, opts: dict):
    """Run ``call(opts)``; when the CG Nyström preconditioner's Cholesky fails (float32
    round-off on nearly rank-deficient kernels), warn and rerun without the preconditioner."""
    try:
        return call(opts)
    except torch.linalg.LinAlgError as err:
        if solver != "cg" or opts.get("precond_rank", 200) == 0:
            raise
        warnings.warn(
            f"cg: the Nyström preconditioner failed ({err}); continuing without it "
            "(precond_rank=0)",
            RuntimeWarning,
            stacklevel=3,
        )
        opts.update(precond_rank=0)
        return call(opts)


def _check_resumed_settings(path: Path, saved: dict | None, now: dict) -> None:
    """A stage checkpoint is reused only under the settings that wrote it (checkpoints from
    before settings were recorded carry none and are accepted)."""
    if saved is None:
        return
    diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
    if diff:
        from ..errors import CheckpointError

        shown = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(
            f"{path} was written with other settings ({shown}); rerun with those settings, "
            "resume=False, or another checkpoint_dir"
        )


def _guarded(stage: str, fn):
    """Turn the engine's NaN complaints (from operator checks or Cholesky) into one named
    FloatingPointError for the stage."""

    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, torch.linalg.LinAlgError) as err:
            msg = str(err)
            if "NaN" in msg or "nan" in msg or "infinite" in msg:
                raise FloatingPointError(
                    DIVERGENCE_MESSAGE.format(stage=stage)
                    + f" ({msg}); try tied=True, fewer free hyperparameters or solver='exact'"
                ) from err
            raise

    return run


def reconstruct_with_uncertainty(
    y: Any,
    operator: Any,
    *,
    dip: dict | nn.Module | Any | None = None,
    net_input: torch.Tensor | None = None,
    prior: str = "matern",
    hyper: str = "em",
    solver: str = "cg",
    n_samples: int = 64,
    em_cycles: int = 4,
    em_samples: int = 8,
    em_solver: str | None = None,
    tied: bool | None = None,
    em_estimator: str | None = None,
    dtype: torch.dtype | None = torch.float64,
    solver_opts: dict | None = None,
    holdout: float = 0.1,
    holdout_seed: int = 0,
    calibration: str = "weights",
    noise_term: bool = True,
    noise_probes: int = 64,
    noise_var: float | None = None,
    prior_variance: float = 0.1,
    lengthscale: float = 0.1,
    tv_weight: float | None = None,
    tv_scale: float = 1.0,
    sample_batch: int = 16,
    reuse_preconditioner: bool = True,
    keep_samples: bool = False,
    exact_covariance: bool = False,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> UQResult:
    """Reconstruct ``y`` with the deep image prior and return it with a voxelwise std map.

    Args:
        y: sinogram, shape ``operator.range_shape`` (2D ``(angles, det)``, 3D
            ``(det_rows, angles, det_cols)``).
        operator: linear map with ``op(x)``, ``op.T(y)``, ``domain_shape``, ``range_shape``
            (a matched :class:`operators.RayTransform`).
        dip: ``None`` (fit with :data:`DEFAULT_DIP`), a dict of :func:`fit_dip` options
            (``tv_weight``, ``iterations``, ``net``, ``lr``, ...), a :class:`DIPResult`, or a
            trained network (then ``net_input`` is its input, default: the FBP/FDK).
        prior: ``"matern"`` (Matérn-½ per 3×3 block, Normal per 1×1 block), ``"normal"``,
            ``"g-prior"``.
        hyper: ``"em"``, ``"mll"``, ``"tv-map"`` or ``"fixed"`` (see module docstring).
        solver: posterior sampler for the std map: ``"exact"``, ``"cg"``, ``"sgd"``, ``"sdd"``.
        n_samples: samples for the std map (the std's relative Monte-Carlo error is about
            1/sqrt(2 n_samples)).
        em_cycles, em_samples, em_solver: EM settings (``em_solver`` defaults to ``solver``).
        tied: one prior variance shared by all blocks (``True``) or one per block
            (``False``). ``None`` (default): per-block for ``"em"`` (the methods' schedule: two
            tied cycles, then per-block updates), tied for ``"mll"``/``"tv-map"``. On the
            protocol (20 angles, 5 %, methods §5 settings, exact solver, eight images) per-block
            EM beat tied EM on every image (+0.077 ± 0.014 nats/voxel) and DIP-MCDO on every
            image (+0.117 ± 0.025; tied EM +0.040 ± 0.028, 5 of 8; benchmarks/README.md). With
            few samples (the demo's 8) the block estimates γ̂_b are unresolved, those blocks
            keep the variance of the tied cycles (only σ² moves on).
        em_estimator: effective-dimension estimator of EM: ``"function"``, ``"weight"`` or
            ``"exact"`` (only with ``em_solver="exact"``); default ``"exact"`` with the exact
            solver (no Monte-Carlo error: γ from the dense factors), else ``"function"``. The engine clips only
            the total γ = Σ_b γ_b (to [1, d]), so block-level estimator noise averages out:
            on the 12×12 test problem EM's σ² was within 9 % of the MLL value with 16
            samples, 3.3 % with 64 and 0.6 % with 256 (3 seeds each). γ̂ needs converged
            samples: an unconverged solve inflates it, and γ̂ ≥ n_obs (impossible: γ ≤
            rank M ≤ n_obs) is reported as a ``RuntimeWarning``. When γ̂ is within three
            Monte-Carlo standard errors of n_obs, EM's σ² = r²/(n_obs − γ̂) has its
            denominator floored there (``trajectories["noise_update"]``); per-block steps
            skip blocks whose γ̂_b is within three standard errors of zero.
        dtype: dtype of the linearised stage (network, input and data are cast to it);
            default ``y``'s. Use ``torch.float64`` when GΣGᵀ is badly conditioned: float32
            kernel products carry an absolute error ≈ eps·λ_max(GΣGᵀ), and CT kernels have
            λ_max ~ 1e7-1e8 (the demo), which stalls CG at relative residuals ~1.
        solver_opts: options passed to the solver (e.g. ``{"iterations": 3000}`` for sgd).
            ``sgd`` runs with the low-rank preconditioner (``precond="lowrank"``, rank
            ``precond_rank`` = 200; DIP Jacobians have κ = λ_max(ĜᵀĜ) + 1 ~ 1e4-1e6, which
            plain sgd cannot cross in a DIP's time). ``{"precond": None}`` gives plain sgd;
            then, without a ``momentum`` option, the momentum is (√κ − 1)/(√κ + 1) clipped
            to [0.9, 0.999] (one power iteration at the initial hyperparameters). ``cg`` and
            ``sgd`` build their preconditioner once per EM cycle and once for all sample
            batches.
        noise_var: initial σ_y²; default the DIP's residual ‖y − A x*‖²/d_y.
        prior_variance, lengthscale: initial σ_b², ℓ_b.
        tv_weight, tv_scale: TV-PredCP (``hyper="tv-map"``): λ_TV = tv_scale · d_y · γ, with
            γ = ``tv_weight`` (default: the DIP's tv_weight, else 1e-4).
        sample_batch: samples drawn per solver call, in EM and for the map (memory vs
            speed; EM's results do not depend on it).
        reuse_preconditioner: ``cg`` builds its Nyström preconditioner in the first EM
            cycle only and rescales it (one batched kernel product) for later cycles; exact
            for tied scale changes, otherwise it may cost CG iterations, never accuracy.
            False: one build per cycle. The sampling stage always builds a fresh one (its
            many samples amortise it, and a stale one costs more iterations there).
        keep_samples: store the functional samples J z_k ``(K, *volume)`` in the result
            (needed for patch log-likelihoods with p > 1).
        exact_covariance: also store the dense image covariance (small images only).
        checkpoint_dir: stage checkpoints; a rerun resumes from the last completed stage.
        resume: with ``checkpoint_dir``, reuse completed stages and EM cycles written under
            the same settings (others raise ``CheckpointError``; False: start afresh and
            overwrite them).
        generator: seeds DIP initialisation, solver noise and samples.
        progress: tqdm progress bars.

    Returns:
        :class:`UQResult` with ``mean`` = x* and ``std`` = sqrt(diag J H⁻¹ Jᵀ) (Monte Carlo).
    """
    from ..dip.checkpoint import atomic_save, load_checkpoint
    from .calibration import CALIBRATION_MODES, calibrate_on_heldout, split_heldout
    from .noise_term import image_noise_term

    if hyper not in HYPER_MODES:
        raise ValueError(f"unknown hyper mode {hyper!r}; use one of {HYPER_MODES}")
    if int(n_samples) < 1 or int(sample_batch) < 1:
        raise ValueError(
            f"n_samples and sample_batch must be >= 1, got {n_samples}, {sample_batch}"
        )
    if calibration not in CALIBRATION_MODES:
        raise ValueError(f"unknown calibration {calibration!r}; use one of {CALIBRATION_MODES}")
    if noise_term and int(noise_probes) < 2:
        raise ValueError(f"noise_probes must be >= 2, got {noise_probes}")
    domain, rng = _domain_range(operator)
    y = _check_y(y, rng)
    if dtype is not None and not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
    # views left out of every fit: calibration (and DIP stopping) without ground truth
    split = split_heldout(operator, y, float(holdout), seed=int(holdout_seed))
    operator = split.fit_operator
    held_op = split.heldout_operator
    y_dip = split.fit_y  # the DIP trains in the data's dtype
    y = y_dip.to(dtype) if dtype is not None else y_dip
    em_solver = em_solver or solver
    if tied is None:
        tied = hyper != "em"
    if em_estimator is None:
        em_estimator = "exact" if em_solver == "exact" else "function"
    solver_opts = dict(solver_opts or {})
    # sgd: the low-rank preconditioner unless the caller chose otherwise (precond=None is
    # plain sgd, with a momentum matched to the conditioning unless one was given)
    sgd_precond = solver_opts.get("precond", "lowrank")
    auto_momentum = (
        "sgd" in (solver, em_solver) and "momentum" not in solver_opts and sgd_precond is None
    )
    ckpt = Path(checkpoint_dir).expanduser() if checkpoint_dir is not None else None
    timings: dict[str, float] = {}
    notes: list[str] = []  # warnings, also kept in diagnostics["warnings"]

    # 1. DIP
    t0 = time.perf_counter()
    heldout = None if held_op is None else (held_op, split.heldout_y)
    net, z0, image, dip_info = _resolve_dip(
        y_dip, operator, dip, net_input, generator, progress, ckpt, resume, heldout
    )
    timings["dip"] = time.perf_counter() - t0
    if any(p.dtype != y.dtype or p.device != y.device for p in net.parameters()):
        net = copy.deepcopy(net).to(device=y.device, dtype=y.dtype)  # the caller's net stays
    z0 = z0.to(device=y.device, dtype=y.dtype)
    if image.numel() != math.prod(domain):
        raise ValueError(
            f"network output shape {tuple(image.shape)} does not match the operator's volume "
            f"{domain} (expected (1, 1, {', '.join(map(str, domain))}))"
        )
    _finite_or_raise("DIP", image)
    with torch.no_grad():  # (1/d_y)‖A x* − y‖²: EM's σ² absorbs any excess over the noise
        dip_info["data_misfit"] = float(
            (operator(image.detach().reshape(domain).to(y.dtype)) - y).pow(2).mean()
        )
    image = image.to(y.dtype)
    # a saturated output sigmoid passes no gradient: zero linearised variance there
    advisories: list[str] = []  # warnings that do not mean non-convergence
    if held_op is not None and dip_info.get("source") != "fit_dip":
        advisories.append(
            "the network was fitted outside this call: if it saw the held-out views "
            f"{split.views}, their scores and the fitted variance scale are optimistic. Fit it "
            "on dip_uq.uq.calibration.split_heldout(...).fit_operator, pass fit_dip options "
            "as dip=, or use holdout=0"
        )
    saturated = net.saturated_fraction(z0) if hasattr(net, "saturated_fraction") else 0.0
    if saturated > SATURATION_WARN:
        advisories.append(
            f"the network's output sigmoid is saturated at {100 * saturated:.0f} % of the voxels "
            "(slope < 1e-4): the linearised std there is ~0 whatever the data say, and the DIP "
            "could not change those voxels (small features pushed there are lost). fit_dip's "
            "saturation barrier (on by default) prevents it; so does a linear output, "
            "dip={..., 'net': {'use_sigmoid': False}} (docs/dip.md)"
        )
        warnings.warn(advisories[-1], RuntimeWarning, stacklevel=2)

    # 2-3. linearisation and prior
    t0 = time.perf_counter()
    with torch.no_grad():
        resid = y - operator(image.reshape(domain).to(y.dtype))
    init_noise = noise_var
    if init_noise is None:
        init_noise = max(
            float((resid.double() ** 2).mean()), 1e-8 * float((y.double() ** 2).mean())
        )
    la = build_laplace(
        net,
        z0,
        y,
        operator,
        prior=prior,
        noise_var=init_noise,
        prior_variance=prior_variance,
        lengthscale=lengthscale,
        generator=generator,
    )
    if tv_weight is None:
        tv_weight = float(dip_info.get("options", {}).get("tv_weight", 1e-4))
    tv = {"weight": tv_weight, "scale": tv_scale}

    # sgd only: a momentum matched to the problem's conditioning, unless the caller chose one
    sgd_extra = {"momentum": _sgd_momentum(la)} if auto_momentum else {}
    sgd_extra["precond"] = sgd_precond
    em_opts = {**solver_opts, **sgd_extra} if em_solver == "sgd" else dict(solver_opts)

    # 4. hyperparameters (resumable)
    hyper_path = ckpt / "hyper.pt" if ckpt is not None else None
    hyper_settings = {
        "hyper": hyper,
        "prior": prior,
        "tied": bool(tied),
        "em_cycles": int(em_cycles),
        "em_samples": int(em_samples),
        "em_solver": em_solver,
        "em_estimator": em_estimator,
        "dtype": str(y.dtype),
        "holdout": [float(holdout), int(holdout_seed)],
    }
    em_path = ckpt / "em_cycle.pt" if ckpt is not None else None
    if resume and hyper_path is not None and hyper_path.exists():
        st = load_checkpoint(hyper_path)
        _check_resumed_settings(hyper_path, st.get("settings"), hyper_settings)
        _load_hyper_state(la, st["hyper"])
        traj = st["trajectories"]
        notes.extend(st.get("notes", []))
        if generator is not None and st.get("generator") is not None:
            generator.set_state(st["generator"])  # as after an uninterrupted EM
    else:
        em_resume = None
        if resume and hyper == "em" and em_path is not None and em_path.exists():
            st = load_checkpoint(em_path)  # an EM interrupted after a completed cycle
            _check_resumed_settings(em_path, st.get("settings"), hyper_settings)
            _load_hyper_state(la, st["hyper"])
            em_resume = st["em"]
        state0 = _hyper_state(la)

        def save_cycle(state):
            atomic_save(
                {"hyper": _hyper_state(la), "em": state, "settings": hyper_settings}, em_path
            )

        def run_hyper(o):
            _load_hyper_state(la, state0)  # a retry starts from the same point
            return _guarded("hyperparameter", _fit_hyper)(
                la,
                hyper,
                em_cycles=em_cycles,
                em_samples=em_samples,
                em_solver=em_solver,
                solver_opts=o,
                generator=generator,
                tv=tv,
                tied=tied,
                estimator=em_estimator,
                notes=notes,
                progress=progress,
                sample_batch=sample_batch,
                reuse_preconditioner=reuse_preconditioner,
                on_cycle=save_cycle if em_path is not None else None,
                resume_from=em_resume,
            )

        traj = _with_precond_fallback(run_hyper, em_solver, em_opts)
        traj.pop("_preconditioner", None)  # in memory only (not checkpointed)
        if hyper_path is not None:
            atomic_save(
                {
                    "hyper": _hyper_state(la),
                    "trajectories": traj,
                    "notes": list(notes),
                    "settings": hyper_settings,
                    "generator": generator.get_state() if generator is not None else None,
                },
                hyper_path,
            )
            if em_path.exists():
                em_path.unlink()  # superseded by the completed stage
    _finite_or_raise("hyperparameter", la.prior.variances(), la.likelihood.noise_var)
    timings["hyperparameters"] = time.perf_counter() - t0

    # 5. samples, streamed (resumable per batch)
    t0 = time.perf_counter()
    acc, acc_h, kept, sample_diag, done = Welford(), Welford(), [], [], 0
    samp_path = ckpt / "samples.pt" if ckpt is not None else None
    samp_settings = {
        **hyper_settings,
        "solver": solver,
        "sample_batch": int(sample_batch),
        "keep_samples": bool(keep_samples),
    }  # n_samples may grow on a resume: the stream continues
    if resume and samp_path is not None and samp_path.exists():
        st = load_checkpoint(samp_path)
        _check_resumed_settings(samp_path, st.get("settings"), samp_settings)
        acc.load_state_dict(st["welford"])
        if st.get("welford_heldout") is not None:
            acc_h.load_state_dict(st["welford_heldout"])
        kept, sample_diag, done = list(st["kept"]), list(st["diag"]), int(st["done"])
        if generator is not None and st.get("generator") is not None:
            generator.set_state(st["generator"])
    opts = {**solver_opts, **sgd_extra} if solver == "sgd" else dict(solver_opts)
    if solver == "exact":
        opts["factors"] = dense_factors(la.system())
    # one preconditioner for every sample batch (fixed hyperparameters from here on)
    opts = _with_precond_fallback(
        lambda o: with_prebuilt_preconditioner(la.system(), solver, o), solver, opts
    )
    bar = _progress(total=int(n_samples), initial=done, enabled=progress, desc="posterior samples")
    try:
        while done < n_samples:
            k = min(int(sample_batch), int(n_samples) - done)
            try:
                res = _with_precond_fallback(
                    lambda o, k=k: la.sample(k, solver, generator, **o), solver, opts
                )
            except (ValueError, torch.linalg.LinAlgError) as err:
                if "NaN" in str(err) or "nan" in str(err) or "infinite" in str(err):
                    raise FloatingPointError(
                        DIVERGENCE_MESSAGE.format(stage=f"{solver} sampling") + f": {err}"
                    ) from err
                raise
            fs = la.functional_samples(res.samples)
            _finite_or_raise(f"{solver} sampling", fs)
            acc.update(fs)
            if held_op is not None:  # the same samples seen from the held-out views
                with torch.no_grad():
                    acc_h.update(held_op(fs.reshape(-1, *domain)).reshape(fs.shape[0], -1))
            if keep_samples:
                kept.append(fs.detach().cpu())
            sample_diag.append(
                {
                    "iterations": res.iterations,
                    "residual": res.residual,
                    "converged": bool(res.converged),
                }
            )
            done += k
            if bar is not None:
                bar.update(k)
            if samp_path is not None:
                atomic_save(
                    {
                        "welford": acc.state_dict(),
                        "welford_heldout": acc_h.state_dict() if held_op is not None else None,
                        "kept": kept,
                        "diag": sample_diag,
                        "done": done,
                        "settings": samp_settings,
                        "generator": generator.get_state() if generator is not None else None,
                    },
                    samp_path,
                )
    finally:
        if bar is not None:
            bar.close()
    timings["samples"] = time.perf_counter() - t0
    bad = [d for d in sample_diag if not d["converged"]]
    if bad:
        _warn(
            notes,
            f"{solver}: {len(bad)} of {len(sample_diag)} sample batches did not converge "
            f"(worst relative residual {max(d['residual'] for d in bad):.3g}); the std map may be "
            "biased. Raise the solver's iterations or precond_rank, use dtype=torch.float64, "
            "or solver='cg'",
        )
    var = acc.second_moment()
    cov = exact_image_covariance(la) if exact_covariance else None

    # 6. image-space noise term and calibration on the held-out views (resumable)
    t0 = time.perf_counter()
    sigma2 = float(la.likelihood.noise_var)
    components = {"weights": var.reshape(domain)}
    heldout_components = {"weights": acc_h.second_moment()} if held_op is not None else {}
    noise_info: dict[str, Any] = {}
    if noise_term:
        nt = _noise_stage(
            ckpt,
            resume,
            operator,
            y,
            sigma2,
            noise_probes,
            sample_batch,
            held_op,
            generator,
            {**samp_settings, "noise_probes": int(noise_probes)},
            image_noise_term,
        )
        components["noise"] = nt.variance.to(var.dtype).reshape(domain)
        if held_op is not None:
            heldout_components["noise"] = nt.heldout_variance
        noise_info = {"alpha": nt.alpha, "n_probes": nt.n_probes, **nt.diagnostics}
        if not nt.converged:
            _warn(
                notes,
                f"image-space noise term: CG stopped at relative residual "
                f"{nt.diagnostics.get('cg_residual'):.3g}; the noise std map may be biased",
            )
        if not nt.diagnostics.get("discrepancy_bracketed", True):
            advisories.append(
                "image-space noise term: no Tikhonov weight meets the discrepancy principle "
                f"(misfit {nt.diagnostics['discrepancy_misfit']:.3g} vs σ² "
                f"{nt.diagnostics['discrepancy_target']:.3g}); the weight at the end of the "
                "search range was used"
            )
    timings["noise_term"] = time.perf_counter() - t0
    calib, heldout_data = None, {}
    scales = {c: 1.0 for c in components}
    if held_op is not None:
        with torch.no_grad():
            resid_h = split.heldout_y.to(y.dtype) - held_op(image.reshape(domain).to(y.dtype))
        calib = calibrate_on_heldout(
            resid_h.reshape(-1),
            heldout_components,
            components,
            sigma2,
            split.view_of,
            split.views,
            mode=calibration,
        )
        scales = dict(calib.scales)
        heldout_data = {
            "residual": resid_h.reshape(-1),
            "view_of": split.view_of,
            **{f"variance_{c}": v.reshape(-1) for c, v in heldout_components.items()},
        }
    elif calibration != "none":
        advisories.append(
            "no held-out views (holdout=0): the std map is the model's own, not calibrated "
            "against measurements it did not fit; on real scans it can be several times too "
            "confident (docs/uncertainty.md)"
        )

    sel = la.selection
    variances = la.prior.variances().detach()
    lengths = la.prior.lengthscales().detach()
    misfit_ratio = dip_info["data_misfit"] / sigma2
    if misfit_ratio > 1.5:  # EM's σ² follows the linear model's residual, so only far above
        advisories.append(
            f"the DIP's data misfit is {misfit_ratio:.2f}x the learned noise variance: it does "
            "not fit its data (more iterations, a smaller TV weight); the std map then has to "
            "describe a biased reconstruction"
        )
    total = sum(scales[c] * v for c, v in components.items())
    return UQResult(
        mean=image.detach().reshape(domain).to(y.dtype),
        std=total.sqrt().reshape(domain),
        components=components,
        variance_scales=scales,
        calibration=None if calib is None else calib.to_dict(),
        heldout=heldout_data,
        noise_var=float(la.likelihood.noise_var),
        prior_variance={b: float(variances[i]) for i, b in enumerate(sel.block_names)},
        lengthscale={
            b: float(lengths[i])
            for i, b in enumerate(sel.block_names)
            if la.prior.kinds[i] == "matern"
        },
        trajectories=traj,
        diagnostics={
            "solver": solver,
            "hyper": hyper,
            "tied": bool(tied),
            "prior": prior,
            "n_samples": int(n_samples),
            "d": sel.d,
            "n_obs": int(y.numel()),
            "initial_noise_var": float(init_noise),
            "sgd_momentum": sgd_extra.get("momentum"),
            "sgd_precond": sgd_precond if isinstance(sgd_precond, str | None) else "custom",
            "sample_batches": sample_diag,
            "dip": dip_info,
            "timings": timings,
            "dtype": str(y.dtype).replace("torch.", ""),
            "converged": not notes,
            "warnings": notes,
            "saturated_fraction": saturated,
            "advisories": advisories,  # warnings about the model, not about convergence
            "noise_term": noise_info,
            "heldout_views": list(split.views),
            "misfit_over_noise_var": misfit_ratio,
        },
        samples=torch.cat(kept) if kept else None,
        covariance=cov,
        laplace=la,
    )


def _noise_stage(ckpt, resume, op, y, sigma2, probes, batch, held_op, generator, settings, fn):
    """The image-space noise term, checkpointed as ``noise_term.pt`` (keyed on the sample
    stage's settings, the probe count and σ²)."""
    from ..dip.checkpoint import atomic_save, load_checkpoint
    from .noise_term import NoiseTerm

    path = ckpt / "noise_term.pt" if ckpt is not None else None
    settings = {**settings, "noise_var": float(sigma2)}
    if resume and path is not None and path.exists():
        st = load_checkpoint(path)
        _check_resumed_settings(path, st.get("settings"), settings)
        if generator is not None and st.get("generator") is not None:
            generator.set_state(st["generator"])
        return NoiseTerm(**st["term"])
    nt = fn(
        op,
        y,
        sigma2,
        n_probes=int(probes),
        batch=int(batch),
        heldout_op=held_op,
        generator=generator,
    )
    if path is not None:
        atomic_save(
            {
                "term": dataclasses.asdict(nt),
                "settings": settings,
                "generator": generator.get_state() if generator is not None else None,
            },
            path,
        )
    return nt


def _progress(*, total: int, initial: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False)

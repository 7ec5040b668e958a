"""``reconstruct_with_uncertainty(y, operator)``: a CT reconstruction with a calibrated
voxelwise uncertainty map, the one-call entry point of the CT wing.

It reads one validated :class:`~dip_uq.uq.config.UQConfig` (defaults shared with the command
line and the demo; keyword ``overrides`` replace fields) and runs the stages of
:mod:`dip_uq.uq.stages`: held-out split → DIP → linearisation → hyperparameters → samples →
noise term → predictive (docs/uncertainty.md, docs/methods.md §1-6).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from operators.base import check_device, check_operator

from .calibration import split_heldout
from .config import DIPConfig, UQConfig
from .linearised import build_laplace, exact_image_covariance, hyper_state
from .result import UQResult
from .stages import (
    SATURATION_WARN,
    Notes,
    dip_stage,
    hyper_stage,
    noise_stage,
    predictive_stage,
    prepare_network,
    sample_stage,
)
from .store import StageStore, digest

__all__ = ["reconstruct_with_uncertainty"]


def check_problem(y: Any, operator: Any) -> torch.Tensor:
    """``y`` as a float tensor of the operator's range shape, finite; the operator has the
    contract the pipeline needs (``op(x)``, ``op.T(y)``, ``domain_shape``, ``range_shape``)."""
    _, rng = check_operator(operator)
    y = torch.as_tensor(y)
    check_device(y, "sinogram y", "reconstruct_with_uncertainty")
    if y.is_complex():
        raise TypeError(f"sinogram y must be real, got dtype {y.dtype}")
    if not y.is_floating_point():
        y = y.float()
    if tuple(y.shape) != rng:
        raise ValueError(
            f"sinogram/operator mismatch: the operator's range (sinogram) shape is {rng}, got "
            f"y of shape {tuple(y.shape)}"
        )
    if not torch.all(torch.isfinite(y)):
        raise ValueError("sinogram y contains NaN or infinite values")
    return y


def _config(config: UQConfig | None, dip: Any, overrides: dict) -> UQConfig:
    cfg = config if config is not None else UQConfig()
    if not isinstance(cfg, UQConfig):
        raise TypeError(f"config must be a UQConfig, got {type(cfg).__name__}")
    if isinstance(dip, dict):  # fit_dip settings given as a dict: the config's DIP part
        known = sorted(f.name for f in dataclasses.fields(DIPConfig))
        unknown = sorted(set(dip) - set(known))
        if unknown:
            raise TypeError(f"unknown DIP setting(s) {unknown} in dip=; the settings are {known}")
        overrides = {**overrides, "dip": dip}
    elif dip is not None and not isinstance(dip, nn.Module) and not hasattr(dip, "net"):
        raise TypeError(
            "dip must be None, a dict of DIP settings (docs/uncertainty.md), a DIPResult or a "
            f"network, got {type(dip).__name__}"
        )
    return cfg.replace(**overrides) if overrides else cfg


def _check_call(dip: Any, net_input: Any, generator: Any) -> None:
    """The arguments beside the configuration (the configuration checks itself)."""
    if net_input is not None and not isinstance(dip, nn.Module):
        raise ValueError(
            "net_input is the input of a trained network passed as dip=; with "
            f"dip={type(dip).__name__ if dip is not None else None} it would be ignored "
            "(a DIPResult carries its input; a DIP fitted here uses dip={'init': ...})"
        )
    if net_input is not None and not isinstance(net_input, torch.Tensor):
        raise TypeError(f"net_input must be a tensor, got {type(net_input).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {generator!r}")


def _modes(dip: Any) -> dict[nn.Module, bool]:
    """The train/eval flag of every module of the caller's network (restored after the call)."""
    net = dip if isinstance(dip, nn.Module) else getattr(dip, "net", None)
    return {m: m.training for m in net.modules()} if isinstance(net, nn.Module) else {}


def reconstruct_with_uncertainty(
    y: Any,
    operator: Any,
    config: UQConfig | None = None,
    *,
    dip: Any = None,
    net_input: torch.Tensor | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    generator: torch.Generator | None = None,
    progress: bool = True,
    **overrides: Any,
) -> UQResult:
    """Reconstruct ``y`` with the deep image prior and return it with a calibrated std map.

    Args:
        y: sinogram of shape ``operator.range_shape`` (2D ``(angles, det)``, 3D
            ``(det_rows, angles, det_cols)``).
        operator: a linear map with ``op(x)``, ``op.T(y)``, ``domain_shape``, ``range_shape``
            and a matched adjoint (e.g. :class:`operators.RayTransform`).
        config: a :class:`UQConfig` (default ``UQConfig()``); ``overrides`` replace its fields
            (``n_samples=128``, ``holdout=0``, ``dtype=torch.float32``, ...).
        dip: ``None`` (fit ``config.dip``), a dict of DIP settings (replaces fields of
            ``config.dip``), a :class:`~dip_uq.dip.DIPResult`, or a trained network (then
            ``net_input`` is its input, default the FBP/FDK of the fit views).
        checkpoint_dir: stage checkpoints; a rerun continues from the last completed stage,
            reusing a stage only when its settings and inputs are unchanged.
        resume: ``False`` recomputes every stage (and overwrites the checkpoints).
        generator: seeds the DIP, solver noise and samples.
        progress: tqdm progress bars.

    Returns:
        :class:`UQResult`: ``mean`` = x*, ``std`` = sqrt(Σ_c s_c v_c), the components, their
        scales and the held-out views' record.
    """
    cfg = _config(config, dip, overrides)  # every option validated before any work
    _check_call(dip, net_input, generator)
    y = check_problem(y, operator)
    store = StageStore(checkpoint_dir, resume=resume)
    modes = _modes(dip)
    try:
        return _reconstruct(y, operator, cfg, dip, net_input, store, generator, progress)
    finally:  # the caller's network leaves in the mode it came in (success or failure)
        for module, training in modes.items():
            module.training = training


def _reconstruct(
    y: torch.Tensor,
    operator: Any,
    cfg: UQConfig,
    dip: Any,
    net_input: torch.Tensor | None,
    store: StageStore,
    generator: torch.Generator | None,
    progress: bool,
) -> UQResult:
    """The stages, in order (the arguments are checked)."""
    notes, timings = Notes(), {}
    split = split_heldout(y, operator, float(cfg.holdout), seed=int(cfg.holdout_seed))

    t0 = time.perf_counter()
    d = dip_stage(split, cfg, dip, net_input, store, generator, progress)
    timings["dip"] = time.perf_counter() - t0
    if split.heldout_operator is not None and d.info["source"] != "fit_dip":
        notes.advise(
            "the network was fitted outside this call: if it saw the held-out views "
            f"{split.views}, their scores and the fitted variance scale are optimistic. Fit it "
            "on dip_uq.uq.calibration.split_heldout(...).fit_operator, pass DIP settings as "
            "dip=, or use holdout=0"
        )
    y_lin = split.fit_y.to(cfg.torch_dtype)
    net, z0 = prepare_network(d.net, d.input, y_lin)
    image = d.image.to(cfg.torch_dtype)
    saturated = net.saturated_fraction(z0) if hasattr(net, "saturated_fraction") else 0.0
    if saturated > SATURATION_WARN:
        notes.advise(
            f"the network's output sigmoid is saturated at {100 * saturated:.0f} % of the voxels "
            "(slope < 1e-4): the linearised std there is ~0 whatever the data say, and the DIP "
            "could not change those voxels (small features pushed there are lost). fit_dip's "
            "saturation barrier (on by default) prevents it; so does a linear output "
            "(docs/dip.md)",
            emit=True,
        )

    t0 = time.perf_counter()
    init_noise = cfg.noise_var
    if init_noise is None:
        init_noise = max(d.info["data_misfit"], 1e-8 * float((y_lin.double() ** 2).mean()))
    la = build_laplace(
        net, z0, y_lin, split.fit_operator, prior=cfg.prior, noise_var=init_noise,
        prior_variance=cfg.prior_variance, lengthscale=cfg.lengthscale, generator=generator,
    )  # fmt: skip
    traj, momentum = hyper_stage(la, cfg, store, d.key, split.views, generator, progress, notes)
    timings["hyperparameters"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    settings = {"stage": "samples", "dtype": str(y_lin.dtype), "prior": cfg.prior}
    upstream = digest(d.key, hyper_state(la))
    stats = sample_stage(
        la, cfg, split.heldout_operator, store, upstream, settings, momentum, generator,
        progress, notes,
    )  # fmt: skip
    timings["samples"] = time.perf_counter() - t0
    cov = exact_image_covariance(la) if cfg.exact_covariance else None

    t0 = time.perf_counter()
    sigma2 = float(la.likelihood.noise_var)
    noise = None
    if cfg.noise_term:
        noise = noise_stage(split, y_lin, sigma2, cfg, store, d.key, settings, generator, notes)
    timings["noise_term"] = time.perf_counter() - t0
    components, scales, calib, record = predictive_stage(
        split, image, sigma2, stats, noise, cfg, notes
    )
    misfit_ratio = d.info["data_misfit"] / sigma2
    if misfit_ratio > 1.5:  # EM's σ² follows the linear model's residual: only far above
        notes.advise(
            f"the DIP's data misfit is {misfit_ratio:.2f}x the learned noise variance: it does "
            "not fit its data (more iterations, a smaller TV weight); the std map then has to "
            "describe a biased reconstruction"
        )
    total = sum(scales[c] * v for c, v in components.items())
    return _result(
        image, total, components, scales, calib, record, stats, cov, la, traj, cfg, d, split,
        notes, timings, momentum, init_noise, saturated, noise, misfit_ratio, y_lin, store,
    )  # fmt: skip


def _result(
    image, total, components, scales, calib, record, stats, cov, la, traj, cfg, d, split,
    notes, timings, momentum, init_noise, saturated, noise, misfit_ratio, y_lin, store,
) -> UQResult:  # fmt: skip
    sel = la.selection
    variances = la.prior.variances().detach()
    lengths = la.prior.lengthscales().detach()
    return UQResult(
        mean=image,
        std=total.sqrt(),
        noise_var=float(la.likelihood.noise_var),
        prior_variance={b: float(variances[i]) for i, b in enumerate(sel.block_names)},
        lengthscale={
            b: float(lengths[i])
            for i, b in enumerate(sel.block_names)
            if la.prior.kinds[i] == "matern"
        },
        trajectories=traj,
        diagnostics={
            "config": cfg.to_dict(),
            "solver": cfg.solver,
            "hyper": cfg.hyper,
            "tied": cfg.resolved_tied,
            "prior": cfg.prior,
            "n_samples": int(cfg.n_samples),
            "d": sel.d,
            "n_obs": int(y_lin.numel()),
            "initial_noise_var": float(init_noise),
            "sgd_momentum": momentum,
            "sgd_precond": cfg.solver_opts.get("precond", "lowrank")
            if isinstance(cfg.solver_opts.get("precond", "lowrank"), str | None)
            else "custom",
            "sample_batches": stats.batches,
            "dip": d.info,
            "timings": timings,
            "dtype": cfg.dtype,
            "converged": not notes.warnings,
            "warnings": notes.warnings,
            "advisories": notes.advisories,
            "saturated_fraction": saturated,
            "noise_term": {}
            if noise is None
            else {"alpha": noise.alpha, "n_probes": noise.n_probes, **noise.diagnostics},
            "heldout_views": list(split.views),
            "misfit_over_noise_var": misfit_ratio,
            "recomputed_stages": list(store.recomputed),
        },
        samples=stats.samples,
        covariance=cov,
        laplace=la,
        components=components,
        variance_scales=scales,
        calibration=None if calib is None else calib.to_dict(),
        heldout=record,
    )

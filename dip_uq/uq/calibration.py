"""Calibration without ground truth: held-out projection views (``docs/methods.md`` §6.3).

A few views are left out of the fit. The predictive of the image, x ~ N(x*, C) with
C = Σ_c s_c C_c (components c: the linearised weight posterior, the image-space noise term),
implies a predictive of each held-out measurement,

    y_h,j ~ N((A_h x*)_j, Σ_c s_c v_c,j + σ²),   v_c,j = Var[(A_h u_c)_j],  u_c ~ N(0, C_c),

and what was measured there tests it: coverage of central intervals, the log-likelihood per
measurement and the PIT histogram (uniform when calibrated). The variance scales s_c are
fitted by maximising that held-out likelihood (a tempering of each component: the weight
posterior at scale s is the posterior under noise s σ² and prior s Σ, same mean), never with a
ground truth. Scores of the calibrated predictive are cross-fitted: each held-out view is
scored with scales fitted on the other held-out views.

``predicted_image_coverage``: if the calibrated predictive is right, the image-space coverage
of intervals drawn from variances ``v`` is mean_i [2Φ(z_p (v_i / v_cal,i)^½) − 1]; this is the
held-out views' estimate of the coverage a ground truth would show.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "CALIBRATION_MODES",
    "HeldOutCalibration",
    "HeldOutSplit",
    "holdout_views",
    "split_heldout",
    "fit_variance_scales",
    "measurement_scores",
    "calibrate_on_heldout",
]

#: how the held-out views set the scales s_c: ``"weights"`` fits the weight posterior's scale
#: and keeps the other components only as a floor (scale :data:`FLOOR`);
#: ``"weights+noise"`` fits the weights' scale with the others added at scale 1;
#: ``"per-component"`` fits each; ``"scalar"`` one scale for the sum; ``"none"`` keeps all at 1.
CALIBRATION_MODES = ("weights", "weights+noise", "per-component", "scalar", "none")
#: scale of the non-weight components in ``"weights"`` mode: a floor (5 % of the noise term's
#: variance) that keeps the std positive where the network's Jacobian vanishes (a saturated
#: output sigmoid), small enough not to move the calibration where it does not
FLOOR = 0.05
#: log-normal prior on each fitted scale, centred at the model's own scale 1 with a standard
#: deviation of a factor 10: negligible against hundreds of held-out measurements, it keeps a
#: single held-out view's few correlated rays from sending a scale to 0 or infinity
SCALE_PRIOR_SD = 2.302585092994046  # ln 10
LEVELS = (0.5, 0.9, 0.95)
_LOG_2PI = math.log(2 * math.pi)
_NORMAL = torch.distributions.Normal(0.0, 1.0)


def holdout_views(n_views: int, fraction: float = 0.1, *, seed: int = 0) -> list[int]:
    """Held-out view indices: ``round(fraction · n_views)`` views, at least two (one below 8
    views), stratified (one drawn uniformly from each of that many contiguous blocks of views,
    so they spread over the orbit), reproducible from ``seed``. ``fraction = 0`` returns
    ``[]``."""
    if not 0 <= fraction < 1:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    if fraction == 0:
        return []
    n_views = int(n_views)
    # two views at least where the scan allows it: one view's rays share its image error,
    # and the calibrated scores are cross-fitted over views
    k = max(2 if n_views >= 8 else 1, round(fraction * n_views))
    if n_views - k < 2:
        raise ValueError(
            f"holding out {k} of {n_views} views leaves fewer than 2 to fit: use more views "
            "or holdout=0 (no calibration on held-out views)"
        )
    g = torch.Generator().manual_seed(int(seed))
    edges = [round(i * n_views / k) for i in range(k + 1)]
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        out.append(lo + int(torch.randint(hi - lo, (1,), generator=g)))
    return out


@dataclass
class HeldOutSplit:
    """The measurements split into the fit part and the held-out views.

    Attributes:
        fit_operator, fit_y: the operator and sinogram without the held-out views.
        heldout_operator, heldout_y: only the held-out views (``None`` without a split).
        views: held-out view indices (of the full sinogram); ``fit_views`` the others.
        view_of: per held-out measurement (flattened held-out sinogram), the position of its
            view in ``views`` ``(n_h,)``.
    """

    fit_operator: Any
    fit_y: torch.Tensor
    heldout_operator: Any = None
    heldout_y: torch.Tensor | None = None
    views: list[int] = field(default_factory=list)
    fit_views: list[int] = field(default_factory=list)
    view_of: torch.Tensor | None = None


def split_heldout(
    y: torch.Tensor, operator: Any, fraction: float, *, seed: int = 0
) -> HeldOutSplit:
    """Hold out ``fraction`` of the projection views of the measurements ``y`` of ``operator`` (see
    :func:`holdout_views`); ``fraction = 0`` returns the whole problem as the fit part."""
    from operators.subset import select_views, take_views, view_axis

    rs = tuple(operator.range_shape)
    if fraction == 0:
        return HeldOutSplit(operator, y)
    try:
        ax = view_axis(rs)
    except ValueError as err:
        raise ValueError(f"{err}; pass holdout=0 to fit without held-out views") from err
    n_views = rs[ax]
    views = holdout_views(n_views, fraction, seed=seed)
    fit = [v for v in range(n_views) if v not in views]
    held_y = select_views(y, views, rs)
    pos = torch.arange(len(views)).reshape([-1 if d == ax else 1 for d in range(len(rs))])
    view_of = pos.expand(held_y.shape).reshape(-1)
    return HeldOutSplit(
        fit_operator=take_views(operator, fit),
        fit_y=select_views(y, fit, rs),
        heldout_operator=take_views(operator, views),
        heldout_y=held_y,
        views=views,
        fit_views=fit,
        view_of=view_of,
    )


def _quantile(p: float) -> float:
    return float(_NORMAL.icdf(torch.tensor((1 + p) / 2, dtype=torch.float64)))


def _loglik(r2: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return -0.5 * (r2 / v + v.log() + _LOG_2PI)


def fit_variance_scales(
    resid: torch.Tensor,
    components: dict[str, torch.Tensor],
    noise_var: float,
    *,
    mode: str = "weights",
    fitted: Sequence[str] | None = None,
) -> dict[str, float]:
    """Scales s_c ≥ 0 maximising Σ_j log N(r_j; 0, Σ_c s_c v_c,j + σ²) over held-out residuals
    ``resid`` ``(n,)`` with component variances ``components[c]`` ``(n,)``, plus the log-normal
    prior of :data:`SCALE_PRIOR_SD` on each fitted scale (the posterior mode).

    ``mode`` as in :data:`CALIBRATION_MODES` (``"weights"`` and ``"weights+noise"`` fit the
    component named ``"weights"``, or those ``fitted`` names). Coarse log-grid, then L-BFGS in
    log scale; deterministic.
    """
    if mode not in CALIBRATION_MODES:
        raise ValueError(f"unknown calibration mode {mode!r}; use one of {CALIBRATION_MODES}")
    names = list(components)
    ones = {c: 1.0 for c in names}
    if mode == "none" or resid.numel() == 0:
        return ones
    r2 = resid.double().reshape(-1) ** 2
    V = torch.stack([components[c].double().reshape(-1) for c in names])  # (C, n)
    s2 = float(noise_var)
    if mode == "scalar":
        groups = [names]
    elif mode == "per-component":
        groups = [[c] for c in names]
    else:
        want = list(fitted) if fitted is not None else ["weights"]
        groups = [[c] for c in names if c in want]
        if not groups:
            raise ValueError(f"calibration mode {mode!r}: no component among {want} in {names}")
    free = [c for grp in groups for c in grp]
    rest = {c: (FLOOR if mode == "weights" else 1.0) for c in names if c not in free}
    fixed = sum((rest[c] * V[names.index(c)] for c in rest), torch.zeros_like(r2))
    ones = {c: 1.0 for c in free} | rest
    G = torch.stack([V[[names.index(c) for c in grp]].sum(0) for grp in groups])  # (g, n)

    def nll(logs: torch.Tensor) -> torch.Tensor:
        v = (logs.exp()[:, None] * G).sum(0) + fixed + s2
        return -_loglik(r2, v).sum() + 0.5 * (logs / SCALE_PRIOR_SD).pow(2).sum()

    # a coarse grid first: the likelihood can be flat in a direction the data do not see
    axis = torch.linspace(-4 * math.log(10), 3 * math.log(10), 29, dtype=torch.float64)
    grids = torch.meshgrid(*([axis] * len(groups)), indexing="ij")
    cand = torch.stack([g.reshape(-1) for g in grids], 1)
    with torch.no_grad():
        vals = torch.stack([nll(c) for c in cand]) if len(groups) <= 2 else None
    start = cand[int(torch.argmin(vals))] if vals is not None else torch.zeros(len(groups))
    logs = start.clone().double().requires_grad_(True)
    opt = torch.optim.LBFGS([logs], max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nll(logs.clamp(-30.0, 30.0))
        loss.backward()
        return loss

    opt.step(closure)
    best = logs.detach().clamp(-30.0, 30.0)
    if vals is not None and float(nll(best)) > float(vals.min()):
        best = start  # L-BFGS never makes it worse than the grid
    out = dict(ones)
    for grp, lg in zip(groups, best.tolist()):
        for c in grp:
            out[c] = math.exp(lg)
    return out


def measurement_scores(
    resid: torch.Tensor, variance: torch.Tensor, *, bins: int = 10
) -> dict[str, Any]:
    """Calibration of a Gaussian predictive N(0, variance) for residuals ``resid`` (flat):
    central-interval coverage at 50/90/95 %, mean log-likelihood, z-score std and the PIT
    histogram (fractions in ``bins`` equal bins of Φ(r/√v); uniform = calibrated)."""
    r = resid.double().reshape(-1)
    v = variance.double().reshape(-1)
    z = r / v.sqrt()
    pit = _NORMAL.cdf(z)
    hist = torch.histc(pit, bins=bins, min=0.0, max=1.0) / max(r.numel(), 1)
    return {
        "coverage": {str(p): float((z.abs() <= _quantile(p)).double().mean()) for p in LEVELS},
        "log_likelihood": float(_loglik(r**2, v).mean()),
        "zscore_std": float(z.std()) if r.numel() > 1 else float("nan"),
        "pit_histogram": hist.tolist(),
        "n": int(r.numel()),
    }


def _coverage_if(v_report: torch.Tensor, v_true: torch.Tensor) -> dict[str, float]:
    """Expected coverage of intervals from ``v_report`` when the errors have ``v_true``."""
    ratio = (v_report.double() / v_true.double().clamp_min(1e-300)).sqrt()
    return {str(p): float((2 * _NORMAL.cdf(_quantile(p) * ratio) - 1).mean()) for p in LEVELS}


@dataclass
class HeldOutCalibration:
    """What the held-out views say about the predictive.

    Attributes:
        mode: which scales were fitted (:data:`CALIBRATION_MODES`).
        scales: s_c per component (1 for unfitted ones).
        views: the held-out view indices; ``n_measurements`` their measurement count.
        raw: :func:`measurement_scores` of the uncalibrated predictive (all s_c = 1).
        calibrated: the same for the calibrated predictive, cross-fitted over held-out views
            (in-sample when only one view is held out: ``cross_fitted`` False).
        predicted_image_coverage: ``{"raw": {...}, "calibrated": {...}}``, the held-out
            views' estimate of image-space coverage (module docstring; the calibrated one
            cross-fitted like ``calibrated``).
        fold_scales: the scales fitted without each held-out view.
    """

    mode: str
    scales: dict[str, float]
    views: list[int]
    n_measurements: int
    raw: dict[str, Any]
    calibrated: dict[str, Any]
    predicted_image_coverage: dict[str, dict[str, float]]
    cross_fitted: bool
    fold_scales: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "scales": dict(self.scales),
            "views": list(self.views),
            "n_measurements": self.n_measurements,
            "raw": self.raw,
            "calibrated": self.calibrated,
            "predicted_image_coverage": self.predicted_image_coverage,
            "cross_fitted": self.cross_fitted,
            "fold_scales": self.fold_scales,
        }


def calibrate_on_heldout(
    resid: torch.Tensor,
    components: dict[str, torch.Tensor],
    image_components: dict[str, torch.Tensor],
    noise_var: float,
    view_of: torch.Tensor,
    views: Sequence[int],
    *,
    mode: str = "weights",
) -> HeldOutCalibration:
    """Fit the scales on all held-out measurements and score the predictive.

    Args:
        resid: held-out residuals y_h − A_h x* ``(n,)`` (flattened held-out sinogram).
        components: per component c, Var[(A_h u_c)_j] ``(n,)``.
        image_components: per component c, the voxelwise variance ``(*volume)``.
        noise_var: σ².
        view_of: the held-out view (position in ``views``) of each measurement ``(n,)``.
        views: the held-out view indices (for the record).
        mode: :data:`CALIBRATION_MODES`.
    """
    names = list(components)
    if set(image_components) != set(names):
        raise ValueError(
            f"image components {sorted(image_components)} differ from held-out ones {sorted(names)}"
        )
    r = resid.double().reshape(-1)
    view_of = torch.as_tensor(view_of).reshape(-1)

    def mvar(s: dict[str, float]) -> torch.Tensor:
        return sum(s[c] * components[c].double().reshape(-1) for c in names) + noise_var

    def ivar(s: dict[str, float]) -> torch.Tensor:
        return sum(s[c] * image_components[c].double().reshape(-1) for c in names)

    ones = {c: 1.0 for c in names}
    scales = fit_variance_scales(r, components, noise_var, mode=mode)
    raw = measurement_scores(r, mvar(ones))
    v_cal = ivar(scales)
    n_folds = int(view_of.max()) + 1 if view_of.numel() else 0
    folds: list[dict[str, float]] = []
    if n_folds >= 2 and mode != "none":
        r_cv = torch.empty_like(r)
        v_cv = torch.empty_like(r)
        pred = {str(p): 0.0 for p in LEVELS}
        for f in range(n_folds):
            out = view_of == f
            s_f = fit_variance_scales(
                r[~out], {c: components[c].reshape(-1)[~out] for c in names}, noise_var, mode=mode
            )
            folds.append(s_f)
            r_cv[out] = r[out]
            v_cv[out] = mvar(s_f)[out]
            for k, val in _coverage_if(v_cal, ivar(s_f)).items():
                pred[k] += val / n_folds
        calibrated = measurement_scores(r_cv, v_cv)
        pred_cal, cross = pred, True
    else:
        calibrated = measurement_scores(r, mvar(scales))
        pred_cal, cross = _coverage_if(v_cal, v_cal), False
    return HeldOutCalibration(
        mode=mode,
        scales=scales,
        views=[int(v) for v in views],
        n_measurements=int(r.numel()),
        raw=raw,
        calibrated=calibrated,
        predicted_image_coverage={"raw": _coverage_if(ivar(ones), v_cal), "calibrated": pred_cal},
        cross_fitted=cross,
        fold_scales=folds,
    )

"""Regularised least squares on any linear operator, matrix-free: Tikhonov by conjugate
gradients on the normal equations, several regularisation weights from one Krylov space, and
the weight chosen by the discrepancy principle.

Every function needs only ``op(x)``, ``op.T(y)``, ``op.domain_shape`` and ``op.range_shape``
(a :class:`~operators.RayTransform`, a :class:`~operators.MatrixOperator`, an adapter). The
normal operator is ``M = AᵀA``; a Tikhonov reconstruction with weight ``alpha >= 0`` solves

    (AᵀA + alpha I) x = Aᵀ y,

i.e. minimises ``‖A x − y‖² + alpha ‖x‖²``; in the singular basis of ``A`` it applies the
filter ``s_j / (s_j² + alpha)`` to the data. Arrays keep the operator's shapes: volumes
``(*domain_shape)``, a batch ``(B, *domain_shape)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .base import power_norm

__all__ = [
    "CGInfo",
    "DiscrepancyResult",
    "cg_normal",
    "multishift_cg_normal",
    "tikhonov",
    "discrepancy_tikhonov",
]


@dataclass
class CGInfo:
    """Convergence record of a conjugate-gradient run: ``iterations`` done, final relative
    residuals ``‖b − (M + alpha I) x‖ / ‖b‖`` (one per right-hand side or per shift) and
    whether all reached ``tol``."""

    iterations: int
    residual: list[float]
    converged: bool


def _normal(op: Any, x: torch.Tensor) -> torch.Tensor:
    return op.T(op(x))


def _check_batch(op: Any, b: torch.Tensor, what: str) -> torch.Tensor:
    dom = tuple(op.domain_shape)
    if tuple(b.shape[-len(dom) :]) != dom or b.dim() not in (len(dom), len(dom) + 1):
        raise ValueError(
            f"{what} must have the operator's domain shape {dom} (optionally with one leading "
            f"batch dimension), got {tuple(b.shape)}"
        )
    return b if b.dim() == len(dom) + 1 else b[None]


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample inner products of batches ``(B, ...)`` -> ``(B,)``."""
    return (a * b).flatten(1).sum(1)


def cg_normal(
    op: Any,
    b: torch.Tensor,
    *,
    alpha: float,
    x0: torch.Tensor | None = None,
    tol: float = 1e-4,
    max_iter: int = 500,
) -> tuple[torch.Tensor, CGInfo]:
    """Solve ``(AᵀA + alpha I) x = b`` for a batch ``b`` ``(B, *domain)`` (or one volume) by
    conjugate gradients, all right-hand sides at once (one ``op`` and one ``op.T`` call of
    the whole batch per iteration). Stops when every relative residual is below ``tol``.
    Returns ``x`` (the shape of ``b``) and a :class:`CGInfo`."""
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be finite and >= 0, got {alpha}")
    single = b.dim() == len(tuple(op.domain_shape))
    b = _check_batch(op, b, "b")
    x = torch.zeros_like(b) if x0 is None else _check_batch(op, x0, "x0").clone()
    bnorm = _dot(b, b).sqrt().clamp_min(torch.finfo(b.dtype).tiny)
    r = b - (_normal(op, x) + alpha * x) if x0 is not None else b.clone()
    p = r.clone()
    rr = _dot(r, r)
    it = 0
    with torch.no_grad():
        while it < max_iter and bool((rr.sqrt() / bnorm > tol).any()):
            Mp = _normal(op, p) + alpha * p
            pMp = _dot(p, Mp)
            # a converged column has r = 0: keep its step at zero instead of 0/0
            step = torch.where(pMp > 0, rr / pMp.clamp_min(torch.finfo(b.dtype).tiny), 0.0)
            shape = (-1,) + (1,) * (b.dim() - 1)
            x = x + step.reshape(shape) * p
            r = r - step.reshape(shape) * Mp
            rr_new = _dot(r, r)
            beta = torch.where(rr > 0, rr_new / rr.clamp_min(torch.finfo(b.dtype).tiny), 0.0)
            p = r + beta.reshape(shape) * p
            rr = rr_new
            it += 1
    res = (rr.sqrt() / bnorm).tolist()
    info = CGInfo(iterations=it, residual=res, converged=max(res) <= tol)
    return (x[0] if single else x), info


def multishift_cg_normal(
    op: Any,
    b: torch.Tensor,
    shifts: torch.Tensor,
    *,
    tol: float = 1e-4,
    max_iter: int = 1000,
    stop: Any = None,
) -> tuple[torch.Tensor, CGInfo]:
    """Solve ``(AᵀA + alpha_s I) x_s = b`` for every shift ``alpha_s > 0`` at the cost of one
    CG run: the Krylov space of ``AᵀA`` does not depend on the shift, and the residual of
    every shifted system is a multiple ``zeta_s r`` of the seed system's (multi-shift CG,
    Frommer 2003). The seed is the smallest shift, the slowest to converge.

    ``b`` is one volume ``(*domain)``; returns ``x`` ``(n_shifts, *domain)`` in the order of
    ``shifts`` and a :class:`CGInfo` with the relative residual ``|zeta_s| ‖r‖ / ‖b‖`` per
    shift. ``stop(k, x, residuals)`` may be given to end the run early (called every
    iteration with the current solutions and residuals; return True to stop). Without it the
    run ends when every shift reaches ``tol``.
    """
    shifts = torch.as_tensor(shifts, dtype=b.dtype, device=b.device).reshape(-1)
    if shifts.numel() == 0 or not bool((shifts > 0).all()) or not bool(shifts.isfinite().all()):
        raise ValueError("shifts must be a non-empty list of finite positive numbers")
    dom = tuple(op.domain_shape)
    if tuple(b.shape) != dom:
        raise ValueError(f"b must have the operator's domain shape {dom}, got {tuple(b.shape)}")
    order = torch.argsort(shifts)
    sig = shifts[order]
    d = sig - sig[0]  # shifts relative to the seed (the smallest)
    n = sig.numel()
    view = (-1,) + (1,) * len(dom)
    bnorm = float(b.double().norm()) or 1.0
    r = b.clone()
    x = torch.zeros((n, *dom), dtype=b.dtype, device=b.device)
    p = b[None].repeat(n, *(1,) * len(dom))  # per-shift search directions
    ps = b.clone()  # seed direction
    rr = float((r * r).sum())
    zeta_prev = torch.ones(n, dtype=torch.float64, device=b.device)
    zeta = torch.ones(n, dtype=torch.float64, device=b.device)
    a_prev, beta_prev = 1.0, 0.0
    it = 0
    res = torch.full((n,), math.sqrt(rr) / bnorm, dtype=torch.float64)
    with torch.no_grad():
        while it < max_iter:
            Mp = _normal(op, ps) + float(sig[0]) * ps
            a = rr / float((ps * Mp).sum())
            r_new = r - a * Mp
            rr_new = float((r_new * r_new).sum())
            beta = rr_new / rr
            # shifted coefficients (Jegerlehner's recurrences, in float64)
            dd = d.double()
            denom = a * beta_prev * (zeta_prev - zeta) + zeta_prev * a_prev * (1.0 + dd * a)
            zeta_next = zeta * zeta_prev * a_prev / denom
            # a shift solved to machine precision keeps its solution (zeta would underflow)
            live = zeta.abs() * math.sqrt(rr) / bnorm > 1e-13
            ratio = torch.where(live, zeta_next / torch.where(live, zeta, 1.0), 0.0)
            zeta_next = torch.where(live, zeta_next, zeta)
            a_s = a * ratio
            b_s = beta * ratio**2
            x = x + a_s.to(b.dtype).reshape(view) * p
            p = (
                zeta_next.to(b.dtype).reshape(view) * r_new[None]
                + b_s.to(b.dtype).reshape(view) * p
            )
            ps = r_new + beta * ps
            zeta_prev, zeta = zeta, zeta_next
            a_prev, beta_prev = a, beta
            r, rr = r_new, rr_new
            it += 1
            res = (zeta.abs() * math.sqrt(rr) / bnorm).cpu()
            if stop is not None:
                inv = torch.argsort(order)
                if stop(it, x[inv], res[inv.cpu()]):
                    break
            elif bool((res <= tol).all()):
                break
    inv = torch.argsort(order)
    res_out = res[inv.cpu()].tolist()
    return x[inv], CGInfo(iterations=it, residual=res_out, converged=max(res_out) <= tol)


def tikhonov(
    y: torch.Tensor,
    op: Any,
    alpha: float,
    *,
    tol: float = 1e-4,
    max_iter: int = 500,
    x0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, CGInfo]:
    """The Tikhonov reconstruction ``argmin ‖A x − y‖² + alpha ‖x‖²`` of ``y``
    ``(*range)`` or ``(B, *range)``, by :func:`cg_normal`."""
    return cg_normal(op, op.T(y), alpha=alpha, tol=tol, max_iter=max_iter, x0=x0)


@dataclass
class DiscrepancyResult:
    """The regularisation weight chosen by the discrepancy principle.

    Attributes:
        alpha: the weight at which ``‖y − A x_alpha‖² = tau² n_obs sigma²``.
        x: the Tikhonov reconstruction at ``alpha`` ``(*domain)``.
        misfit: ``‖y − A x‖² / n_obs`` at ``alpha``.
        target: ``tau² sigma²``.
        bracketed: False when even the largest (smallest) weight tried leaves a misfit
            below (above) the target; ``alpha`` is then that end of the range.
        grid: ``(alpha, misfit)`` pairs evaluated, for plots and checks.
        info: the multi-shift CG record.
        refine: the record of the refining solve at ``alpha`` (None when unbracketed).
    """

    alpha: float
    x: torch.Tensor
    misfit: float
    target: float
    bracketed: bool
    grid: list[tuple[float, float]] = field(default_factory=list)
    info: CGInfo | None = None
    refine: CGInfo | None = None


def discrepancy_tikhonov(
    y: torch.Tensor,
    op: Any,
    noise_var: float,
    *,
    tau: float = 1.0,
    n_shifts: int = 25,
    span: float = 1e-6,
    tol: float = 1e-3,
    max_iter: int = 1000,
    norm: float | None = None,
    generator: torch.Generator | None = None,
) -> DiscrepancyResult:
    """Tikhonov weight by Morozov's discrepancy principle: the ``alpha`` whose reconstruction
    leaves the misfit the noise predicts, ``‖y − A x_alpha‖² / n_obs = tau² sigma²``.

    The misfit grows monotonically with ``alpha``. ``n_shifts`` weights, log-spaced over
    ``[span, 1] · ‖A‖²``, are solved together by :func:`multishift_cg_normal` (``‖A‖`` by
    power iteration unless ``norm`` is given); the run stops once the weights around the
    crossing have converged, the crossing is interpolated in ``log alpha`` and refined by one
    warm-started :func:`tikhonov` solve. ``noise_var`` is sigma² (sinogram units²).
    """
    y = torch.as_tensor(y)
    if tuple(y.shape) != tuple(op.range_shape):
        raise ValueError(
            f"y must have the operator's range shape {tuple(op.range_shape)}, got {tuple(y.shape)}"
        )
    if not (math.isfinite(noise_var) and noise_var > 0):
        raise ValueError(f"noise_var must be positive and finite, got {noise_var}")
    if n_shifts < 2 or not (0 < span < 1):
        raise ValueError(f"need n_shifts >= 2 and 0 < span < 1, got {n_shifts}, {span}")
    n_obs = y.numel()
    target = tau**2 * float(noise_var)
    if norm is None:
        norm = power_norm(op, iterations=30, tol=1e-4, generator=generator, dtype=y.dtype)
    top = norm**2
    shifts = top * torch.logspace(math.log10(span), 0.0, n_shifts, dtype=torch.float64)
    b = op.T(y)
    misfits: dict[int, float] = {}

    def misfit(xs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return (op(xs) - y).double().pow(2).flatten(1).sum(1) / n_obs

    def stop(k: int, xs: torch.Tensor, res: torch.Tensor) -> bool:
        if k % 5:
            return False
        conv = torch.nonzero(res <= tol).flatten()
        if conv.numel() == 0:
            return False
        lo = int(conv.min())  # weights from lo upwards have converged (larger converge first)
        fresh = [j for j in range(lo, n_shifts) if j not in misfits]
        if fresh:
            vals = misfit(xs[fresh])
            misfits.update({j: float(v) for j, v in zip(fresh, vals)})
        return misfits[lo] < target  # the crossing lies between lo and lo + 1: bracketed

    xs, info = multishift_cg_normal(
        op, b.to(y.dtype), shifts.to(y.dtype), tol=tol, max_iter=max_iter, stop=stop
    )
    missing = [j for j in range(n_shifts) if j not in misfits]
    if missing:
        vals = misfit(xs[missing])
        misfits.update({j: float(v) for j, v in zip(missing, vals)})
    grid = [(float(shifts[j]), misfits[j]) for j in range(n_shifts)]
    above = [j for j in range(n_shifts) if misfits[j] >= target]
    if not above:  # even the largest weight fits below the noise: the data are all noise
        j = n_shifts - 1
        return DiscrepancyResult(float(shifts[j]), xs[j], misfits[j], target, False, grid, info)
    j1 = min(above)
    if j1 == 0:  # even the smallest weight leaves more than the noise
        return DiscrepancyResult(float(shifts[0]), xs[0], misfits[0], target, False, grid, info)
    j0 = j1 - 1
    # interpolate the crossing in (log alpha, log misfit), then one refining solve
    l0, l1 = math.log(float(shifts[j0])), math.log(float(shifts[j1]))
    m0, m1 = math.log(max(misfits[j0], 1e-300)), math.log(misfits[j1])
    t = (math.log(target) - m0) / (m1 - m0) if m1 > m0 else 0.5
    alpha = math.exp(l0 + min(max(t, 0.0), 1.0) * (l1 - l0))
    x, cg = tikhonov(y, op, alpha, tol=tol, max_iter=max_iter, x0=xs[j1])
    m = float(misfit(x[None])[0])
    return DiscrepancyResult(alpha, x, m, target, True, grid, info, cg)

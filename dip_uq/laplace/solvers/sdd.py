"""Stochastic dual descent (docs/methods.md §2.3) on min_α ½ αᵀ(GΣGᵀ + I)α − αᵀc.

Random blocks of data points (all their observations) give the gradient
g = (n/B) Σ_{i∈I} e_i[((GΣGᵀ + I)α)_i − c_i]; Nesterov momentum at the look-ahead point and
geometric iterate averaging ᾱ ← rα + (1 − r)ᾱ. ΣGᵀα and ΣGᵀ(velocity) are maintained
incrementally, so each step costs one JVP and one VJP on the minibatch only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .sgd import auto_momentum
from .system import LinearSystem, Noise, SolverResult, draw_noise

__all__ = ["sample_sdd"]


def sample_sdd(
    system: LinearSystem,
    n: int = 1,
    generator: torch.Generator | None = None,
    *,
    target: torch.Tensor | None = None,
    noise: Noise | None = None,
    init: torch.Tensor | None = None,
    lr: float | None = None,
    momentum: float | str = 0.9,
    iterations: int = 2000,
    batch_size: int | None = None,
    averaging: float | None = None,
    tol: float = 1e-4,
    check_every: int = 50,
    callback: Callable[[int, Callable[[], torch.Tensor]], bool] | None = None,
) -> SolverResult:
    """SDD samples θ = Lξ + ΣGᵀᾱ (or the mean with c = r).

    ``lr`` defaults to (B/n)/(λ_max(ĜĜᵀ) + 1); ``averaging`` r defaults to min(1, 100/T).
    ``momentum``: ρ = 0.9 (docs/methods.md §2.3); ``"auto"`` uses the conditioning-matched value of
    :func:`~.sgd.auto_momentum` with full batches (plain dual Nesterov), 0.9 with minibatches.
    ``batch_size`` counts data points (None = all: deterministic dual descent).
    ``callback(it, current)`` is called every ``check_every`` iterations with a function
    returning the current θ ``(K, d)`` (from the averaged iterate); True stops the run.
    """
    if system.streaming:
        raise ValueError(
            "sdd is a dual solver: it needs the data in memory (observation space); use cg or "
            "sgd on a streamed source"
        )
    if target is None:
        noise = noise or draw_noise(system, n, generator)
    full = batch_size is None or batch_size >= system.n_data
    if not full and not system.per_datum:
        raise ValueError("minibatches need observations grouped by datum (leading dim = data)")
    frac = 1.0 if full else batch_size / system.n_data
    with torch.no_grad():
        c, theta_p = system.dual_rhs(noise, target)
        cnorm = c.norm(dim=1).clamp_min(1e-30)
        lam_max = None
        if lr is None or (momentum == "auto" and full):
            lam_max = system.lambda_max(generator=generator)
        if lr is None:
            lr = frac / (lam_max + 1.0)
        if momentum == "auto":
            momentum = auto_momentum(lam_max) if full else 0.9
        elif not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"momentum must be in [0, 1) or 'auto', got {momentum!r}")
        r_avg = averaging if averaging is not None else min(1.0, 100.0 / iterations)
        cov_gt = lambda a, idx=None: system.prior.cov_mv(system.Gt(a, idx))  # noqa: E731
        alpha = torch.zeros_like(c) if init is None else init.to(c.dtype).clone()
        s_alpha = (
            cov_gt(alpha) if init is not None else torch.zeros_like(theta_p.expand(c.shape[0], -1))
        )
        vel, s_vel = torch.zeros_like(alpha), torch.zeros_like(s_alpha)
        avg, s_avg = alpha.clone(), s_alpha.clone()
        trace: list[float] = []
        it = 0
        for it in range(1, iterations + 1):
            look = alpha + momentum * vel
            s_look = s_alpha + momentum * s_vel
            if full:
                g = system.G(s_look) + look - c
                s_g = cov_gt(g)
            else:
                idx = torch.randperm(system.n_data, generator=generator, device=system.device)[
                    :batch_size
                ]
                obs = system.obs_index(idx)
                g_i = (system.G(s_look, idx) + look[:, obs] - c[:, obs]) / frac
                g = torch.zeros_like(alpha)
                g[:, obs] = g_i
                s_g = cov_gt(g_i, idx)
            vel = momentum * vel - lr * g
            s_vel = momentum * s_vel - lr * s_g
            alpha = alpha + vel
            s_alpha = s_alpha + s_vel
            avg = r_avg * alpha + (1 - r_avg) * avg
            s_avg = r_avg * s_alpha + (1 - r_avg) * s_avg
            if it % check_every == 0:
                res = float(((system.G(s_avg) + avg - c).norm(dim=1) / cnorm).mean())
                if not math.isfinite(res):
                    raise FloatingPointError(
                        f"SDD diverged: non-finite residual at iteration {it} (lr={lr:.3g}); pass a smaller lr"
                    )
                trace.append(res)
                if res < tol:
                    break
                if callback is not None and callback(it, lambda s=s_avg: theta_p + s):
                    break
        s_final = cov_gt(avg)  # exact recompute, removes drift of the running products
        final = float(((system.G(s_final) + avg - c).norm(dim=1) / cnorm).mean())
        theta = theta_p + s_final
    return SolverResult(theta, it, trace, final < 10 * tol, final, {"alpha": avg, "lr": lr})

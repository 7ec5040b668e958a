"""Primal sample-then-optimise (docs/methods.md §2.1), in prior-whitened coordinates θ = L u.

Each of the K samples minimises the low-variance objective
    ½ ‖Ĝ u − t‖² + ½ ‖u − u₀‖²,   u₀ = ξ + Ĝᵀ ε   (t = 0 for samples),
whose minimiser L u* ~ N(0, H⁻¹). The data term carries no noise, so minibatch gradients
over data points are unbiased without target noise. Whitening by L makes the identity the
prior curvature, which is what makes one step size work across blocks (a g-prior adds
the curvature scaling). Nesterov momentum, optional Polyak averaging, warm starts.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .precond import LowRankPreconditioner, lowrank_preconditioner, preconditioned_lambda_max
from .system import GGNSystem, LinearSystem, Noise, SolverResult, draw_noise

__all__ = ["sample_sgd", "auto_momentum", "resolve_precond"]


def auto_momentum(lam_max: float) -> float:
    """Nesterov momentum (√κ − 1)/(√κ + 1) for κ = λ_max(ĜᵀĜ) + 1, clipped to [0.9, 0.999]."""
    root = math.sqrt(max(float(lam_max), 0.0) + 1.0)
    return float(min(max((root - 1.0) / (root + 1.0), 0.9), 0.999))


def resolve_precond(precond, full: bool):
    """``precond="auto"`` → ``"lowrank"`` for full batches, None (plain sgd) under
    minibatches: the preconditioned step 1/λ_max(P⁻¹P) is tuned to the full-batch
    curvature, and minibatch curvatures that P's subspace misses made it diverge in a test.
    Any other value is returned unchanged."""
    if isinstance(precond, str) and precond == "auto":
        return "lowrank" if full else None
    return precond


def _check_batch(system: GGNSystem, batch_size: int | None) -> bool:
    """Whether the run uses full batches (minibatches need observations grouped by datum;
    a streamed source always steps on its loader's minibatches)."""
    if system.streaming:
        if batch_size is not None:
            raise ValueError(
                "a streamed source takes its minibatches from the loader: set the loader's "
                "batch_size, not the solver's"
            )
        return False
    if batch_size is not None and batch_size < system.n_data and not system.per_datum:
        raise ValueError("minibatches need observations grouped by datum (leading dim = data)")
    return batch_size is None or batch_size >= system.n_data


def _setup_precond(
    system: LinearSystem,
    precond,
    full: bool,
    generator: torch.Generator | None,
    precond_rank: int,
    oversample: int,
    precond_chunk_size: int | None,
    precond_store: bool,
):
    """The P⁻¹ of the run: None, a built :class:`LowRankPreconditioner` or the callable
    passed (``precond`` resolved by :func:`resolve_precond`, then checked)."""
    precond = resolve_precond(precond, full)
    if isinstance(precond, str):
        if precond != "lowrank":
            raise ValueError(
                f"precond must be None, 'auto', 'lowrank' or a callable, got {precond!r}"
            )
        if not full and not precond_store:
            raise ValueError(
                "precond='lowrank' with minibatches needs precond_store=True (the "
                "matrix-free preconditioner touches every data point at each step)"
            )
        precond = lowrank_preconditioner(
            system,
            precond_rank,
            oversample,
            generator,
            chunk_size=precond_chunk_size,
            store=precond_store,
        )
    elif precond is not None and not callable(precond):
        raise TypeError(
            f"precond must be None, 'auto', 'lowrank' or a callable, got {type(precond)}"
        )
    return precond


def _lr_momentum(
    system: LinearSystem,
    precond,
    lr: float | None,
    momentum: float | str,
    generator: torch.Generator | None,
) -> tuple[float, float]:
    """``(lr, momentum)``: defaults from λ_max of the (preconditioned) objective, checked."""
    lam_max = None
    if lr is None or momentum == "auto":
        if precond is None:
            lam_max = system.lambda_max(generator=generator)
        elif isinstance(precond, LowRankPreconditioner):  # cached on the object
            lam_max = precond.lambda_max(generator) - 1.0
        else:  # λ_max(P⁻¹P) − 1, so that "+ 1" below is the preconditioned λ_max
            lam_max = preconditioned_lambda_max(system, precond, generator=generator) - 1.0
    if lr is None:
        lr = 1.0 / (lam_max + 1.0)
    if momentum == "auto":
        momentum = auto_momentum(lam_max)
    elif not 0.0 <= float(momentum) < 1.0:
        raise ValueError(f"momentum must be in [0, 1) or 'auto', got {momentum!r}")
    return lr, momentum


class _Objective:
    """The K objectives ½ uᵀ(ĜᵀĜ + I)u − bᵀu: gradients, values and relative residuals."""

    def __init__(
        self, system: GGNSystem, noise: Noise | None, t: torch.Tensor | None, scale: float
    ) -> None:
        self.system, self.scale = system, scale
        # In memory the gradient (ĜᵀĜ + I)u − b is formed as Ĝᵀ(Ĝu − e) + u − x₀ (e = ε,
        # x₀ = ξ for samples; e = t, x₀ = 0 for the mean), so b = x₀ + Ĝᵀe is never stored:
        # with K samples of a large net every K × d buffer counts. A streamed source has no
        # ε, only Gᵀε: then b is stored and the gradient is s·ĜᵀĜ_batch u + u − b.
        self.b = None
        if t is None and noise.eps is None:
            self.b = system.primal_b(noise)
            self.e, self.x0 = None, noise.xi
            self.bnorm = self.b.norm(dim=1).clamp_min(1e-30)
            return
        self.e = noise.eps if t is None else t
        self.x0 = noise.xi if t is None else None
        e, x0 = self.e, self.x0
        bnorm = (x0 + system.Ghat_t(e)) if x0 is not None else system.Ghat_t(e)
        self.bnorm = bnorm.norm(dim=1).clamp_min(1e-30)

    def grad(self, u, idx, scale: float | None = None):
        """(gradient ``(K, d)``, Ĝu − e on the batch or None) at u; in place where possible.
        ``idx``: a minibatch handle of the system (None: all data), ``scale`` its weight."""
        system, e, x0 = self.system, self.e, self.x0
        scale = (1.0 if idx is None else self.scale) if scale is None else scale
        if self.b is not None:
            g = system.gram_hat(u, idx)
            if scale != 1.0:
                g.mul_(scale)
            return g.add_(u).sub_(self.b), None
        w = system.Ghat(u, idx)
        w = w - (e if idx is None else e[:, system.obs_index(idx)])
        g = system.Ghat_t(w, idx)
        if scale != 1.0:
            g.mul_(scale)
        g.add_(u)
        return (g if x0 is None else g.sub_(x0)), w

    def value(self, u, w, g=None):  # ½uᵀPu − bᵀu = ½‖Ĝu − e‖² + ½‖u − x₀‖² − ½‖e‖² − ½‖x₀‖²
        if self.b is not None:  # with the full gradient g = Pu − b: ½uᵀg − ½uᵀb
            return 0.5 * float(((u * g).sum(1) - (u * self.b).sum(1)).mean())
        e, x0 = self.e, self.x0
        q = (w.square().sum(1) - e.square().sum(1)).mean()
        if x0 is None:
            return 0.5 * float(q + u.square().sum(1).mean())
        return 0.5 * float(q + ((u - x0).square().sum(1) - x0.square().sum(1)).mean())

    def residual(self, g) -> float:
        """Mean relative gradient ‖g‖/‖b‖ over the K objectives."""
        return float((g.norm(dim=1) / self.bnorm).mean())


def _initial_u(system: LinearSystem, init: torch.Tensor | None, x0) -> torch.Tensor:
    """The start u ``(K, d)``: ``init``, else ξ for samples, else 0 for the mean."""
    # samples start at the prior draw ξ: along an eigendirection of ĜᵀĜ with eigenvalue μ
    # u* − ξ is O(1), while u₀ = ξ + Ĝᵀε is off by ~√μ (both exact where μ = 0)
    if init is not None:
        return init.to(system.dtype).clone()
    if x0 is not None:
        return x0.clone()
    return torch.zeros(1, system.d, dtype=system.dtype, device=system.device)


def _iterate(
    obj: _Objective,
    u: torch.Tensor,
    step,
    lr: float,
    momentum: float,
    *,
    iterations: int,
    tol: float,
    full: bool,
    batch_size: int | None,
    generator: torch.Generator | None,
    polyak: bool,
    check_every: int,
    callback,
) -> tuple[torch.Tensor, int, list[float], list[float]]:
    """Nesterov steps on u (in place): ``(u or its Polyak average, iterations run,
    residual trace, objective trace)``."""
    system = obj.system
    apply_ = getattr(step, "apply_", None)  # in-place P⁻¹ (saves one K × d buffer)
    vel = torch.zeros_like(u)
    avg, n_avg = (torch.zeros_like(u) if polyak else None), 0  # K×d: only when used
    trace: list[float] = []
    objective: list[float] = []
    it = 0
    for it in range(1, iterations + 1):
        idx, scale = (None, 1.0) if full else system.minibatch(batch_size, generator)
        look = torch.add(u, vel, alpha=momentum)
        g, w = obj.grad(look, idx, scale)
        check = it % check_every == 0
        if check:
            if full:
                gr, wr = g, w
            else:
                gr, wr = obj.grad(look, None)
            res = obj.residual(gr)
            if not math.isfinite(res):
                raise FloatingPointError(
                    f"SGD diverged: non-finite residual at iteration {it} (lr={lr:.3g}); pass a smaller lr"
                )
            trace.append(res)
            objective.append(obj.value(look, wr, gr))  # its gap shrinks to 0
            del gr, wr
        del look, w
        g = apply_(g) if apply_ is not None else step(g)
        vel.mul_(momentum).sub_(g, alpha=lr)
        del g
        u.add_(vel)
        if polyak and it > iterations // 2:
            n_avg += 1
            avg += (u - avg) / n_avg
        if check:
            if res < tol and not polyak:
                break
            current = avg if (polyak and n_avg > 0) else u
            if callback is not None and callback(it, lambda c=current: system.prior.sqrt_mv(c)):
                break
    out = avg if (polyak and n_avg > 0) else u
    return out, it, trace, objective


def sample_sgd(
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
    tol: float = 1e-4,
    batch_size: int | None = None,
    polyak: bool = False,
    check_every: int = 10,
    callback: Callable[[int, Callable[[], torch.Tensor]], bool] | None = None,
    precond: str | LowRankPreconditioner | Callable[[torch.Tensor], torch.Tensor] | None = "auto",
    precond_rank: int = 200,
    oversample: int = 10,
    precond_chunk_size: int | None = 32,
    precond_store: bool = False,
) -> SolverResult:
    """Run Nesterov SGD on the K objectives together; returns θ = L u ``(K, d)``.

    ``lr`` defaults to 1/(λ_max(ĜᵀĜ) + 1) (power iteration). ``momentum="auto"`` is the
    heavy-ball value for the objective's condition number κ = λ_max + 1 (its prior part is
    the identity), (√κ − 1)/(√κ + 1) clipped to [0.9, 0.999]. Neither dominates on every
    problem (benchmarks/README.md compares them); on DIP Jacobians (κ ~ 1e5-1e6) the
    Ritz preconditioner matters more than either.
    ``batch_size`` counts data
    points (None = full batch; a streamed source always steps on its loader's batches). ``init`` is a warm start for u ``(K, d)`` (default: ξ for
    samples, 0 for the mean). Stops when the
    mean relative gradient ‖(ĜᵀĜ + I)u − b‖/‖b‖ < ``tol`` (checked every ``check_every``).
    ``callback(it, current)`` is called at every check with a function returning the current
    θ ``(K, d)``; returning True stops the run (e.g. once an error against a reference is met).

    ``precond="auto"`` (default) is ``"lowrank"`` for full batches and plain sgd
    (``precond=None``) under minibatches. ``precond="lowrank"`` preconditions the steps with P⁻¹ from
    :func:`~dip_uq.laplace.solvers.precond.lowrank_preconditioner` (rank ``precond_rank`` +
    ``oversample`` Ritz pairs of ĜĜᵀ; ``precond_store`` keeps V ``(d, r)`` instead of one
    extra JVP + VJP per step), or with a prebuilt P⁻¹ (any callable on ``(K, d)``, SPD).
    The fixed point, hence the samples, are unchanged; the step becomes 1/λ_max(P⁻¹P) and
    the condition number drops from λ_max(ĜᵀĜ) + 1 to about the first eigenvalue the
    subspace misses + 1 (at 128², rank 200: from ~10⁴ to ~2). Matrix-free P⁻¹ needs full
    batches (it touches all data); with minibatches pass ``precond_store=True``.
    """
    if target is None:
        noise = noise or draw_noise(system, n, generator)
    with torch.no_grad():
        t = None if target is None else system.primal_rhs(None, target)[1]  # checked (1, n_obs)
        full = _check_batch(system, batch_size)
        precond = _setup_precond(
            system,
            precond,
            full,
            generator,
            precond_rank,
            oversample,
            precond_chunk_size,
            precond_store,
        )
        step = precond if precond is not None else (lambda v: v)  # noqa: E731
        lr, momentum = _lr_momentum(system, precond, lr, momentum, generator)
        obj = _Objective(
            system, noise, t, 1.0 if full or batch_size is None else system.n_data / batch_size
        )
        out, it, trace, objective = _iterate(
            obj,
            _initial_u(system, init, obj.x0),
            step,
            lr,
            momentum,
            iterations=iterations,
            tol=tol,
            full=full,
            batch_size=batch_size,
            generator=generator,
            polyak=polyak,
            check_every=check_every,
            callback=callback,
        )
        final = obj.residual(obj.grad(out, None)[0])
        theta = system.prior.sqrt_mv(out)
    return SolverResult(
        theta,
        it,
        trace,
        final < 10 * tol,
        final,
        {"u": out, "lr": lr, "momentum": momentum, "objective": objective, "precond": precond},
    )

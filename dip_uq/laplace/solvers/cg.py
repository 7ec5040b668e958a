"""Observation-space Matheron samples with batched preconditioned CG (docs/methods.md §2.2).

z = Lξ + ΣGᵀα with (GΣGᵀ + I) α = ε − GLξ (whitened, unit noise). The preconditioner is a
randomised Nyström approximation U Λ Uᵀ of GΣGᵀ (rank r + oversampling), inverted by
Woodbury: P⁻¹ v = v + U((Λ + 1)⁻¹ − 1)Uᵀ v.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from .system import LinearSystem, Noise, SolverResult, draw_noise

__all__ = ["sample_cg", "nystrom_preconditioner", "refreshed_preconditioner", "PRECOND_SEED"]

PRECOND_SEED = 0  # seed of the probe matrix when no generator is given (deterministic default)
_SHIFT_TRIES = 4  # Cholesky attempts with the shift ×10 each before the eigh fallback


def _chunked(fn, a: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
    """``fn`` applied to the rows of ``a`` ``(s, n)`` ``chunk_size`` rows at a time."""
    if chunk_size is None or chunk_size >= a.shape[0]:
        return fn(a)
    return torch.cat([fn(a[i : i + chunk_size]) for i in range(0, a.shape[0], chunk_size)])


def _nystrom_factor(Q: torch.Tensor, Y: torch.Tensor, eps: float):
    """U ``(n, k)``, Λ ``(k,)`` with U Λ Uᵀ = Y (QᵀY)⁺ Yᵀ, the Nyström approximation of a PSD
    K from Y = K Q (float64, Q orthonormal ``(n, s)``), and a dict saying how it was formed.

    Stabilised as in the standard algorithm: Y_ν = Y + νQ, C = chol(Qᵀ Y_ν), B = Y_ν C⁻ᵀ,
    U S Vᵀ = B, Λ = S² − ν. Y carries the round-off of the (possibly float32) kernel, so
    Qᵀ Y_ν can be indefinite: the shift ν (from eps·‖Y‖_F) grows ×10 up to ``_SHIFT_TRIES``
    times, then an eigendecomposition of Qᵀ Y_ν that drops its non-positive part is used
    (B = Y_ν V₊ D₊^{-½}); this never fails.
    """
    scale = float(Y.norm())
    if scale == 0.0:  # GΣGᵀ = 0 on the probes: the identity preconditioner
        return Q[:, :0], Y.new_zeros(0), {"method": "zero", "shift": 0.0}
    for k in range(_SHIFT_TRIES):
        nu = eps * scale * 10.0**k
        Yn = Y + nu * Q
        core = Q.T @ Yn
        core = 0.5 * (core + core.T)
        C, info = torch.linalg.cholesky_ex(core)
        if int(info) == 0:
            B = torch.linalg.solve_triangular(C, Yn.T, upper=False).T
            if bool(torch.isfinite(B).all()):
                U, S, _ = torch.linalg.svd(B, full_matrices=False)
                return U, (S**2 - nu).clamp_min(0.0), {"method": "cholesky", "shift": nu}
    D, V = torch.linalg.eigh(core)
    keep = D > eps * float(D.abs().max()) * D.shape[0]
    if not bool(keep.any()):
        return Q[:, :0], Y.new_zeros(0), {"method": "eigh", "shift": nu}
    B = (Yn @ V[:, keep]) * D[keep].rsqrt()
    U, S, _ = torch.linalg.svd(B, full_matrices=False)
    return U, (S**2 - nu).clamp_min(0.0), {"method": "eigh", "shift": nu}


def _probe_setup(system, rank: int, oversample: int, generator, chunk_size):
    """Checks the randomised-preconditioner options; returns (generator, number of probes):
    a fixed-seed generator when None (deterministic by default), s = min(rank + oversample,
    n_obs)."""
    if rank < 1 or oversample < 0:
        raise ValueError(f"rank must be >= 1 and oversample >= 0, got {rank}, {oversample}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    if generator is None:
        generator = torch.Generator(device=system.device).manual_seed(PRECOND_SEED)
    return generator, min(rank + oversample, system.n_obs)


def nystrom_preconditioner(
    system: LinearSystem,
    rank: int = 200,
    oversample: int = 10,
    generator: torch.Generator | None = None,
    *,
    chunk_size: int | None = 32,
):
    """Randomised Nyström eigendecomposition of GΣGᵀ; returns ``(apply, Λ)`` where
    ``apply(v)`` = P⁻¹ v on ``(K, n_obs)`` and Λ ``(≤ rank,)`` are the eigenvalue estimates
    (float64, descending). ``apply.info`` records the factorisation used and its shift.

    The kernel is applied to the s = rank + oversample probe vectors ``chunk_size`` at a time
    (None: all at once), so the peak memory is that of a ``chunk_size``-sample batch.
    Without a ``generator`` the probes come from a fixed-seed generator (``PRECOND_SEED``) on
    the system's device, so the preconditioner, hence CG, is deterministic by default.
    Round-off in a float32 kernel cannot make it fail (see :func:`_nystrom_factor`).
    """
    generator, s = _probe_setup(system, rank, oversample, generator, chunk_size)
    with torch.no_grad():
        omega = torch.randn(
            system.n_obs, s, generator=generator, dtype=torch.float64, device=system.device
        )
        Q, _ = torch.linalg.qr(omega)
        # GΣGᵀ Q directly (not (GΣGᵀ + I)Q − Q, which loses small eigenvalues to round-off)
        Y = _chunked(lambda a: system.gram_mv(a.to(system.dtype)).double(), Q.T, chunk_size).T
        if not bool(torch.isfinite(Y).all()):
            raise ValueError(
                "cg preconditioner: the kernel product GΣGᵀQ has NaN or inf entries "
                "(non-finite Jacobian products or hyperparameters)"
            )
        U, lam, info = _nystrom_factor(Q, Y, torch.finfo(system.dtype).eps)
        lam, U = lam[:rank], U[:, :rank]
        pre = _woodbury(U, lam, system.dtype, info)
        pre.rq = _rayleigh(system, pre.U, REFRESH_PROBES)
    return pre, lam


REFRESH_PROBES = 8  # top eigenvectors whose Rayleigh quotients track the kernel's scale


def _rayleigh(system: LinearSystem, U: torch.Tensor, k: int) -> torch.Tensor:
    """u_iᵀ(GΣGᵀ)u_i for the first ``k`` columns of U (float64; one batched product)."""
    k = min(k, U.shape[1])
    if k == 0:
        return U.new_zeros(0, dtype=torch.float64)
    with torch.no_grad():
        Ku = system.gram_mv(U[:, :k].T.contiguous()).double()
    return (Ku * U[:, :k].T.double()).sum(1)


def _woodbury(U: torch.Tensor, lam: torch.Tensor, dtype: torch.dtype, info: dict):
    """P⁻¹ v = v + U((Λ + 1)⁻¹ − 1)Uᵀ v, carrying U and Λ (float64) for a later refresh."""
    coef = (1.0 / (lam + 1.0) - 1.0).to(dtype)
    U_d = U.to(dtype)

    def apply(v: torch.Tensor) -> torch.Tensor:
        return v + ((v @ U_d) * coef) @ U_d.T

    apply.info, apply.U, apply.lam = info, U_d, lam
    return apply


def preconditioner_state(pre) -> dict | None:
    """The factors of a Nyström P⁻¹ (U in the system's dtype, Λ, the Rayleigh quotients a
    refresh compares against, how it was formed) as tensors and numbers, for a checkpoint;
    None for no preconditioner or one of another kind."""
    if pre is None or not all(hasattr(pre, a) for a in ("U", "lam", "rq", "info")):
        return None
    return {"U": pre.U, "lam": pre.lam, "rq": pre.rq, "info": dict(pre.info)}


def preconditioner_from_state(state: dict):
    """The P⁻¹ of :func:`preconditioner_state`, equal to the saved one bit for bit."""
    U = state["U"]
    pre = _woodbury(U.double(), state["lam"], U.dtype, dict(state["info"]))
    pre.rq = state["rq"]
    return pre


def refreshed_preconditioner(system: LinearSystem, old):
    """``old`` (from :func:`nystrom_preconditioner` or an earlier refresh) rescaled to the
    system's current hyperparameters: Λ ← f Λ, f = the median over its top
    ``REFRESH_PROBES`` eigenvectors of u_iᵀK_new u_i / u_iᵀK_old u_i (the old quotients are
    kept from the build; one batched kernel product instead of a rank-r build).

    Exact when the kernel only changed by a scale (a tied prior variance, the noise
    variance); an approximation when lengthscales or per-block variances moved, which
    costs CG iterations, never accuracy (any SPD P⁻¹ gives the same solution).
    """
    U, lam = old.U, old.lam
    if lam.numel() == 0:
        return old
    rq = _rayleigh(system, U, old.rq.numel())
    f = float((rq / old.rq.clamp_min(1e-300)).median())
    if not (f > 0 and f < float("inf")):
        raise ValueError(f"cg preconditioner refresh: non-finite or non-positive scale {f}")
    new = _woodbury(U.double(), lam * f, system.dtype, {**old.info, "refresh": f})
    new.rq = rq
    return new


def batched_pcg(matvec, c, precond, x0=None, tol=1e-6, max_iter=500, callback=None):
    """Solve A x = c for each row of ``c`` ``(K, n)``; returns x, iterations, residual trace.

    ``callback(it, x)`` runs after every iteration; returning True stops. A row whose
    curvature pᵀAp or preconditioned residual rᵀP⁻¹r is not positive and finite (round-off
    breakdown of an ill-conditioned float32 system or preconditioner; both are SPD in exact
    arithmetic) is frozen at its last iterate with a ``RuntimeWarning``, so it shows as
    unconverged instead of turning into inf/NaN."""
    x = torch.zeros_like(c) if x0 is None else x0.clone()
    frozen = torch.zeros(c.shape[0], dtype=torch.bool, device=c.device)
    cnorm = c.norm(dim=1).clamp_min(1e-30)
    r = c - matvec(x) if x0 is not None else c.clone()
    z = precond(r)
    p = z.clone()
    rz = (r * z).sum(1)
    trace = [float((r.norm(dim=1) / cnorm).max())]
    it = 0
    for it in range(1, max_iter + 1):
        if trace[-1] < tol:
            it -= 1
            break
        Ap = matvec(p)
        pAp = (p * Ap).sum(1)
        active = ((r.norm(dim=1) / cnorm) >= tol) & ~frozen
        healthy = torch.isfinite(pAp) & (pAp > 0) & torch.isfinite(rz) & (rz > 0)
        broken = active & ~healthy
        if bool(broken.any()):
            frozen |= broken
            active &= ~broken
            warnings.warn(
                f"CG breakdown at iteration {it}: pᵀAp or rᵀP⁻¹r ≤ 0 or non-finite for "
                f"{int(broken.sum())} of {c.shape[0]} systems (ill-conditioned in "
                f"{c.dtype}); they keep their last iterate. Use float64.",
                RuntimeWarning,
                stacklevel=2,
            )
        tiny = torch.finfo(rz.dtype).tiny  # 1e-300 is 0 in float32
        alpha = torch.where(active, rz / pAp.clamp_min(tiny), torch.zeros_like(rz))
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * torch.where(active[:, None], Ap, torch.zeros_like(Ap))
        trace.append(float((r.norm(dim=1) / cnorm).max()))
        z = precond(r)
        rz_new = (r * z).sum(1)
        beta = torch.where(active, rz_new / rz.clamp_min(tiny), torch.zeros_like(rz))
        p = torch.where(active[:, None], z + beta[:, None] * p, p)
        rz = torch.where(active, rz_new, rz)
        if frozen.any() and not bool((((r.norm(dim=1) / cnorm) >= tol) & ~frozen).any()):
            break  # the rest converged; frozen rows cannot progress
        if callback is not None and callback(it, x):
            break
    return x, it, trace


def sample_cg(
    system: LinearSystem,
    n: int = 1,
    generator: torch.Generator | None = None,
    *,
    target: torch.Tensor | None = None,
    noise: Noise | None = None,
    init: torch.Tensor | None = None,
    tol: float = 1e-6,
    iterations: int = 500,
    precond_rank: int = 200,
    oversample: int = 10,
    precond_chunk_size: int | None = 32,
    callback: Callable[[int, Callable[[], torch.Tensor]], bool] | None = None,
    precond: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> SolverResult:
    """Matheron samples (or the mean ΣGᵀ(GΣGᵀ + I)⁻¹r) by preconditioned CG.

    At most ``iterations`` CG steps, stopping once every relative residual is below
    ``tol``. ``precond_rank = 0`` disables the preconditioner; ``precond_chunk_size`` is the number of
    probe vectors per kernel product while building it (bounds its memory). ``init``
    warm-starts α ``(K, n_obs)``. The preconditioner draws its probes from ``generator``
    (a fixed-seed generator when None), so results are deterministic under a seed.
    ``callback(it, current)`` runs after every CG iteration with a function returning the
    current θ ``(K, d)`` (one VJP); returning True stops the run. ``precond``: a prebuilt
    P⁻¹ (from :func:`nystrom_preconditioner` at the same hyperparameters) to reuse instead
    of building one (EM's mode and sample solves of one cycle share it).

    A streamed source (``system.streaming``) has no observation space: CG then runs on the
    primal system (ĜᵀĜ + I) u = ξ + Ĝᵀε, z = L u (one pass over the data per iteration,
    ``init`` warm-starts u, no preconditioner unless ``precond`` is given).
    """
    if system.streaming:
        return _sample_cg_primal(system, n, generator, target, noise, init, tol, iterations,
                                 callback, precond)  # fmt: skip
    if target is None:
        noise = noise or draw_noise(system, n, generator)
    with torch.no_grad():
        c, theta_p = system.dual_rhs(noise, target)
        if precond is not None:
            pass
        elif precond_rank > 0:
            precond, _ = nystrom_preconditioner(
                system, precond_rank, oversample, generator, chunk_size=precond_chunk_size
            )
        else:
            precond = lambda v: v  # noqa: E731
        hook = None
        if callback is not None:

            def hook(it, a):
                return callback(it, lambda: theta_p + system.prior.cov_mv(system.Gt(a)))

        alpha, it, trace = batched_pcg(system.kernel_mv, c, precond, init, tol, iterations, hook)
        theta = theta_p + system.prior.cov_mv(system.Gt(alpha))
    return SolverResult(theta, it, trace, trace[-1] < tol, trace[-1], {"alpha": alpha})


def _sample_cg_primal(
    system, n, generator, target, noise, init, tol, iterations, callback, precond
):
    """Primal CG on (ĜᵀĜ + I) u = b for a streamed source (see :func:`sample_cg`)."""
    if target is not None:
        raise ValueError(
            "a streamed source has no observation-space target: pass the mean's right-hand "
            "side as noise=Noise(0, None, Gᵀr)"
        )
    noise = noise or draw_noise(system, n, generator)
    with torch.no_grad():
        b = system.primal_b(noise)
        hook = None
        if callback is not None:

            def hook(it, u):
                return callback(it, lambda: system.prior.sqrt_mv(u))

        step = precond if precond is not None else (lambda v: v)  # noqa: E731
        u, it, trace = batched_pcg(system.primal_mv, b, step, init, tol, iterations, hook)
        theta = system.prior.sqrt_mv(u)
    return SolverResult(theta, it, trace, trace[-1] < tol, trace[-1], {"u": u})

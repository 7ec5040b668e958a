"""Linearised Laplace over a DataLoader: every quantity is a sum over minibatches (docs/methods.md §2.1, §3).

The engine's :class:`~dip_uq.laplace.solvers.LinearSystem` holds all inputs; here the data
stream through a loader and nothing of size ``n_data`` is kept. For a
:class:`~dip_uq.laplace.jacobian.FunctionalModel` (J = ∂f/∂θ at θ*) and a likelihood curvature
B_n at the network's outputs (Gaussian: σ⁻² I; softmax: diag(p_n) − p_n p_nᵀ + 1e-6 I, optionally
at the tangent model's outputs f_n + J_n δ, see ``curvature_shift``):

- GGN products   M v = Σ_n J_nᵀ B_n J_n v            (one JVP + one VJP per batch, K directions);
- noise          Σ_n J_nᵀ L_n ε_n ~ N(0, M)            (L_n L_nᵀ = B_n in closed form, no Cholesky);
- EM statistics  γ_b = mean_k z_{k,b}ᵀ (M z_k)_b,  Σ_n ‖y_n − f_n − J_n(θ_lin − θ*)‖²;
- dense M (float64) for small references.

Solvers work in prior-whitened coordinates θ = L u (Σ = L Lᵀ, from the engine's BlockPrior) on
P u = (Lᵀ M L + I) u = b: :func:`cg_solve` (full passes, K right-hand sides together) and
:func:`sgd_solve` (Nesterov SGD over minibatches; the data term carries no noise, all
randomness sits in b, so minibatch gradients are unbiased).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch.func import jvp, vjp, vmap

from .checks import check_labels, check_targets
from .jacobian import FunctionalModel

__all__ = ["StreamingProblem", "SolveInfo", "cg_solve", "sgd_solve"]

JITTER = 1e-6


@dataclass
class SolveInfo:
    """Diagnostics of a streaming solve: iterations (CG steps or SGD epochs), the relative
    residual trace ‖P u − b‖/‖b‖ (mean over right-hand sides) and a converged flag."""

    iterations: int = 0
    trace: list[float] = field(default_factory=list)
    residual: float = float("nan")
    converged: bool = False


class StreamingProblem:
    """Data-pass machinery for one model, likelihood and loader.

    Args:
        fmodel: the functional model (eval-mode copy, selected parameters θ).
        kind: ``"gaussian"`` or ``"categorical"``.
        loader: re-iterable of ``(x, y)`` batches (a DataLoader); passed over once per product.
        noise_var: σ² for Gaussian (a callable returning the current value).
        chunk_size: ``vmap`` chunk size for many directions (bounds memory).
        curvature_shift: softmax only; ``None`` evaluates B_n at the network's logits f_n
            (docs/methods.md §1), a ``(d,)`` tensor δ at the tangent model's logits
            f_n + J_n δ (δ = θ_lin − θ*: the Laplace approximation of the linear model at its
            own mode). One extra JVP direction per batch.
    """

    def __init__(
        self,
        fmodel: FunctionalModel,
        kind: str,
        loader: Iterable,
        noise_var: Callable[[], float],
        chunk_size: int | None = None,
        curvature_shift: torch.Tensor | None = None,
    ) -> None:
        if kind not in ("gaussian", "categorical"):
            raise ValueError(f"unknown likelihood kind {kind!r}")
        if kind == "gaussian":
            curvature_shift = None  # B = σ⁻² I does not depend on the logits
        self.fmodel, self.kind, self.loader = fmodel, kind, loader
        self.noise_var = noise_var
        self.chunk_size = chunk_size
        self.theta = fmodel.theta_star()
        self.d = fmodel.d
        self.dtype = self.theta.dtype
        self.device = self.theta.device
        self.shift = None if curvature_shift is None else curvature_shift.detach().to(self.theta)

    def with_shift(self, curvature_shift: torch.Tensor | None) -> StreamingProblem:
        """The same problem with the curvature evaluated at another point (see the class)."""
        return StreamingProblem(
            self.fmodel, self.kind, self.loader, self.noise_var, self.chunk_size, curvature_shift
        )

    # ---- data -------------------------------------------------------------------------
    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(x, y)`` on the model's device; x cast to the model's float dtype."""
        for batch in self.loader:
            if not isinstance(batch, list | tuple) or len(batch) < 2:
                raise TypeError(
                    "the loader must yield (inputs, targets) pairs, got "
                    f"{type(batch).__name__}{'' if not hasattr(batch, '__len__') else f' of length {len(batch)}'}"
                )
            x, y = batch[0], batch[1]
            if not torch.is_tensor(x) or not torch.is_tensor(y):
                raise TypeError("the loader must yield tensors (inputs, targets)")
            x = x.to(self.device)
            if x.is_floating_point():
                x = x.to(self.dtype)
            y = y.to(self.device)
            if self.kind == "categorical":
                y = check_labels(y)
            else:
                y = y.to(self.dtype)
            yield x, y

    # ---- per-batch pieces -------------------------------------------------------------
    def _f(self, th: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.fmodel(th, x)

    def output_and_jvp(self, x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f(x; θ*) and J(x) v for ``v`` ``(K, d)`` -> ``(*f.shape)``, ``(K, *f.shape)``."""
        theta = self.theta.to(v.dtype)
        with torch.no_grad():
            f = self.fmodel.output(x)
            jv = vmap(
                lambda t: jvp(lambda th: self._f(th, x), (theta,), (t,))[1],
                chunk_size=self.chunk_size,
            )(v)
        return f, jv

    def curvature_outputs_and_jvp(
        self, x: torch.Tensor, v: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The outputs at which B is evaluated (f, or f + J δ with the curvature shift δ) and
        J v for ``v`` ``(K, d)`` or ``None``, sharing one batched JVP."""
        if self.shift is None:
            if v is None:
                with torch.no_grad():
                    return self.fmodel.output(x), None
            return self.output_and_jvp(x, v)
        dirs = self.shift[None] if v is None else torch.cat([v, self.shift[None].to(v.dtype)])
        f, jv = self.output_and_jvp(x, dirs)
        return f + jv[-1].to(f.dtype), (None if v is None else jv[:-1])

    def vjp(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """J(x)ᵀ u for cotangents ``u`` ``(K, *f.shape)`` -> ``(K, d)``."""
        theta = self.theta.to(u.dtype)
        with torch.no_grad():
            _, fn = vjp(lambda th: self._f(th, x), theta)
            return vmap(lambda c: fn(c)[0], chunk_size=self.chunk_size)(u)

    def curvature_mv(self, f: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """B u per datum for ``u`` ``(K, *f.shape)`` at the network's outputs f (docs/methods.md §1)."""
        if self.kind == "gaussian":
            return u / self.noise_var()
        p = torch.softmax(f, dim=-1).to(u.dtype)
        return p * u - p * (p * u).sum(-1, keepdim=True) + JITTER * u

    def curvature_sqrt(
        self, f: torch.Tensor, eps: torch.Tensor, eps2: torch.Tensor
    ) -> torch.Tensor:
        """L ε with L Lᵀ = B (unit noise for Gaussian: L = I, σ⁻¹ is applied by the caller).

        Softmax: √p⊙ε − p(√pᵀε) has covariance diag(p) − ppᵀ (since Σ p = 1); the jitter part
        adds √jitter·ε₂."""
        if self.kind == "gaussian":
            return eps
        p = torch.softmax(f, dim=-1).to(eps.dtype)
        sp = p.sqrt()
        return sp * eps - p * (sp * eps).sum(-1, keepdim=True) + math.sqrt(JITTER) * eps2

    # ---- passes over the data ---------------------------------------------------------
    def ggn_mv(self, v: torch.Tensor) -> torch.Tensor:
        """M v = Σ_n J_nᵀ B_n J_n v for ``v`` ``(K, d)`` (one pass)."""
        out = torch.zeros_like(v)
        for x, _ in self.batches():
            f, jv = self.curvature_outputs_and_jvp(x, v)
            out += self.vjp(x, self.curvature_mv(f, jv))
        return out

    def ggn_mv_batch(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        f, jv = self.curvature_outputs_and_jvp(x, v)
        return self.vjp(x, self.curvature_mv(f, jv))

    def noise_pass(
        self, k: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, int, int]:
        """Σ_n J_nᵀ L_n ε_n ``(k, d)`` (unit noise for Gaussian), the number of data points and
        of scalar outputs per datum, in one pass. ε is drawn on the generator's device."""
        gdev = generator.device if generator is not None else torch.device("cpu")
        acc = torch.zeros(k, self.d, dtype=self.dtype, device=self.device)
        n, m = 0, None
        for x, _ in self.batches():
            f, _ = self.curvature_outputs_and_jvp(x, None)
            shape = (k, *f.shape)
            eps = torch.randn(shape, generator=generator, dtype=self.dtype, device=gdev)
            eps2 = (
                torch.randn(shape, generator=generator, dtype=self.dtype, device=gdev)
                if self.kind == "categorical"
                else eps
            )
            w = self.curvature_sqrt(f, eps.to(self.device), eps2.to(self.device))
            acc += self.vjp(x, w)
            n += f.shape[0]
            m = f[0].numel()
        if n == 0:
            raise ValueError("the loader yielded no data")
        return acc, n, int(m)

    def mode_rhs(self) -> tuple[torch.Tensor, float]:
        """Gaussian affine tangent model: c = Σ_n J_nᵀ (y_n − f_n + J_n θ*)/σ² ``(d,)`` and
        Σ_n ‖y_n − f_n‖² (one pass)."""
        c = torch.zeros(1, self.d, dtype=self.dtype, device=self.device)
        ss = 0.0
        for x, y in self.batches():
            f, jt = self.output_and_jvp(x, self.theta[None])
            ytil = y.reshape(f.shape) - f + jt[0]
            c += self.vjp(x, ytil[None] / self.noise_var())
            ss += float(((y.reshape(f.shape) - f) ** 2).sum())
        return c[0], ss

    def categorical_grad(self, theta: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Gradient and value of the linear model's data term Σ_n CE(y_n, f_n + J_n(θ − θ*))."""
        delta = (theta - self.theta)[None]
        g = torch.zeros_like(delta)
        loss = 0.0
        for x, y in self.batches():
            f, jd = self.output_and_jvp(x, delta)
            logits = f + jd[0]
            logp = torch.log_softmax(logits, dim=-1)
            loss -= float(logp.gather(1, y[:, None]).sum())
            resid = logp.exp()
            resid[torch.arange(y.shape[0], device=y.device), y] -= 1.0
            g += self.vjp(x, resid[None])
        return g[0], loss

    def categorical_loss(self, theta: torch.Tensor) -> float:
        """Σ_n CE(y_n, f_n + J_n(θ − θ*)) (one JVP pass)."""
        delta = (theta - self.theta)[None]
        loss = 0.0
        for x, y in self.batches():
            f, jd = self.output_and_jvp(x, delta)
            logp = torch.log_softmax(f + jd[0], dim=-1)
            loss -= float(logp.gather(1, y[:, None]).sum())
        return loss

    def validate(self) -> tuple[int, int]:
        """One forward pass: check output shapes against the likelihood, labels, finiteness and
        determinism of the first batch; returns (number of data points, outputs per datum)."""
        n, m, first = 0, None, None
        for x, y in self.batches():
            try:
                f = self.fmodel.output(x)
            except RuntimeError as err:
                raise ValueError(
                    f"the model cannot evaluate inputs of shape {tuple(x.shape)}: {err}"
                ) from err
            if f.shape[0] != x.shape[0]:
                raise ValueError(
                    f"model output has batch size {f.shape[0]} for {x.shape[0]} inputs"
                )
            if not torch.all(torch.isfinite(f)):
                raise ValueError("the model output is not finite")
            if self.kind == "categorical":
                if f.dim() != 2 or f.shape[1] < 2:
                    raise ValueError(
                        "classification expects logits of shape (batch, classes >= 2), got "
                        f"{tuple(f.shape)}; use likelihood='regression' for other outputs"
                    )
                if y.shape != f.shape[:1]:
                    raise ValueError(
                        f"classification labels: expected shape ({f.shape[0]},), got {tuple(y.shape)}"
                    )
                if y.numel() and (int(y.min()) < 0 or int(y.max()) >= f.shape[1]):
                    raise ValueError(
                        f"labels out of range: got [{int(y.min())}, {int(y.max())}], the model has "
                        f"{f.shape[1]} classes [0, {f.shape[1] - 1}]"
                    )
            else:
                check_targets(y, f)
                if not torch.all(torch.isfinite(y)):
                    raise ValueError("regression targets contain NaN or inf")
            if first is None:
                first = (x, f)
            m = f[0].numel()
            n += f.shape[0]
        if n == 0:
            raise ValueError("the loader yielded no data")
        # determinism probe: the first batch again (only meaningful for non-shuffling loaders)
        sampler = getattr(self.loader, "sampler", None)
        if isinstance(sampler, torch.utils.data.SequentialSampler):
            x2, _ = next(iter(self.batches()))
            if x2.shape == first[0].shape and not torch.equal(x2, first[0]):
                warnings.warn(
                    "the loader yields different features for the same data on two passes "
                    "(augmentation?): features are non-deterministic, so the curvature and EM "
                    "statistics are inconsistent; fit on an augmentation-free loader",
                    stacklevel=3,
                )
        return n, int(m)

    def residual_ss(self, theta_lin: torch.Tensor) -> float:
        """Σ_n ‖y_n − f_n − J_n(θ_lin − θ*)‖², the tangent model's residual (Gaussian; one
        pass, one JVP per batch)."""
        ss = 0.0
        direction = (theta_lin - self.theta)[None]
        for x, y in self.batches():
            f, jv = self.output_and_jvp(x, direction.to(self.dtype))
            ss += float(((y.reshape(f.shape) - f - jv[0]) ** 2).sum())
        return ss

    def dense(self) -> dict[str, torch.Tensor | float]:
        """Dense float64 M₁ ``(d, d)`` (Gaussian: Σ JᵀJ at unit noise; softmax: Σ Jᵀ B J) and,
        for Gaussian, b₁ = Σ Jᵀỹ, c₀ = Σ‖ỹ‖² with ỹ = y − f + Jθ* (small models only)."""
        d = self.d
        M = torch.zeros(d, d, dtype=torch.float64, device=self.device)
        b1 = torch.zeros(d, dtype=torch.float64, device=self.device)
        c0 = 0.0
        theta = self.theta.double()
        for x, y in self.batches():
            f = self.fmodel.output(x).double()
            J = self.fmodel.dense_jacobian(x).double().reshape(f.shape[0], -1, d)  # (b, m, d)
            if self.kind == "gaussian":
                M += torch.einsum("bmd,bme->de", J, J)
                ytil = y.double().reshape(f.shape[0], -1) - f.reshape(f.shape[0], -1)
                ytil = ytil + J @ theta
                b1 += torch.einsum("bmd,bm->d", J, ytil)
                c0 += float((ytil**2).sum())
            else:
                fc = f if self.shift is None else f + (J @ self.shift.double()).reshape(f.shape)
                p = torch.softmax(fc, dim=-1)
                B = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
                B = B + JITTER * torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
                M += torch.einsum("bmd,bmn,bne->de", J, B, J)
        return {"M": M, "b1": b1, "c0": c0}


# ---- solvers in whitened coordinates --------------------------------------------------
def cg_solve(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    init: torch.Tensor | None = None,
    tol: float = 1e-3,
    max_iter: int = 200,
) -> tuple[torch.Tensor, SolveInfo]:
    """Conjugate gradients for P u = b with K right-hand sides ``b`` ``(K, d)`` together
    (P symmetric positive definite, here Lᵀ M L + I ≥ I). Stops when every column's relative
    residual ‖P u − b‖/‖b‖ < ``tol``. One ``matvec`` = one pass over the data."""
    u = torch.zeros_like(b) if init is None else init.to(b.dtype).clone()
    bnorm = b.norm(dim=1).clamp_min(1e-30)
    r = b - matvec(u) if init is not None else b.clone()
    p = r.clone()
    rs = (r * r).sum(1)
    info = SolveInfo()
    rel = r.norm(dim=1) / bnorm
    info.trace.append(float(rel.mean()))
    it = 0
    while float(rel.max()) >= tol and it < max_iter:
        ap = matvec(p)
        alpha = rs / (p * ap).sum(1).clamp_min(1e-300)
        u = u + alpha[:, None] * p
        r = r - alpha[:, None] * ap
        rs_new = (r * r).sum(1)
        p = r + (rs_new / rs.clamp_min(1e-300))[:, None] * p
        rs = rs_new
        it += 1
        rel = r.norm(dim=1) / bnorm
        info.trace.append(float(rel.mean()))
    info.iterations = it
    info.residual = float(rel.max())
    info.converged = info.residual < tol
    if not info.converged:
        warnings.warn(
            f"streaming CG stopped after {it} passes with relative residual {info.residual:.2e} "
            f"(tol {tol:.1e}); raise max_iter or loosen tol",
            stacklevel=3,
        )
    return u, info


def sgd_solve(
    problem: StreamingProblem,
    whiten: Callable[[torch.Tensor], torch.Tensor],
    whiten_t: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    n_data: int,
    init: torch.Tensor | None = None,
    *,
    epochs: int = 50,
    lr: float | None = None,
    momentum: float = 0.9,
    polyak: bool = True,
    check: bool = True,
) -> tuple[torch.Tensor, SolveInfo]:
    """Nesterov SGD over the loader's minibatches for min_u ½ uᵀLᵀMLu + ½‖u − b‖² (K rows).

    Minibatch gradient (n/|batch|) Lᵀ M_batch L u + u − b is unbiased (no target noise: the
    randomness is in b = u₀, docs/methods.md §2.1). ``lr`` defaults to 0.5/(λ̂ + 1) with λ̂ a power
    iteration estimate of λ_max((n/|batch|) Lᵀ M_batch L) on the first batch. Polyak averaging
    over the second half of the epochs. ``check`` computes the final full-pass residual."""
    u = b.clone() if init is None else init.to(b.dtype).clone()
    info = SolveInfo()
    if lr is None:
        x0, _ = next(iter(problem.batches()))
        scale0 = n_data / x0.shape[0]
        v = torch.randn(1, b.shape[1], dtype=b.dtype, device=b.device)
        lam = 0.0
        for _ in range(15):
            v = v / v.norm()
            w = scale0 * whiten_t(problem.ggn_mv_batch(x0, whiten(v)))
            lam = float((w * v).sum())
            v = w
        lr = 0.5 / (1.05 * max(lam, 0.0) + 1.0)
    vel = torch.zeros_like(u)
    avg, n_avg = torch.zeros_like(u), 0
    for epoch in range(1, epochs + 1):
        for x, _ in problem.batches():
            look = u + momentum * vel
            g = (n_data / x.shape[0]) * whiten_t(problem.ggn_mv_batch(x, whiten(look))) + look - b
            vel = momentum * vel - lr * g
            u = u + vel
        if polyak and epoch > epochs // 2:
            n_avg += 1
            avg += (u - avg) / n_avg
    out = avg if n_avg > 0 else u
    info.iterations = epochs
    if check:
        res = whiten_t(problem.ggn_mv(whiten(out))) + out - b
        rel = res.norm(dim=1) / b.norm(dim=1).clamp_min(1e-30)
        info.residual = float(rel.mean())
        info.trace.append(info.residual)
        info.converged = info.residual < 1e-2
    return out, info

"""The engine's one linear operator: the whitened Jacobian G = W J and the prior around it.

For a linear-Gaussian surrogate with GGN M = GᵀG (W from the likelihood, WᵀW = B), prior
Σ = L Lᵀ and unit whitened noise, every solver works with
- primal: (Ĝᵀ Ĝ + I) u = b with Ĝ = G L, θ = L u (size d);
- dual:   (Ĝ Ĝᵀ + I) α = c = (G Σ Gᵀ + I) α (size n_obs).
Shared noise (ξ ~ N(0, I_d), ε ~ N(0, I_nobs)) gives identical samples z ~ N(0, H⁻¹) on both
sides, H = M + Σ⁻¹: primal b = ξ + Ĝᵀε; dual z = Lξ + ΣGᵀ(Ĝ Ĝᵀ + I)⁻¹(ε − GLξ).

:class:`GGNSystem` is the contract every solver sees; it has two data sources:
:class:`LinearSystem` (all inputs in memory: the DIP's one input, a tensor batch; primal and
dual solvers) and :class:`~dip_uq.laplace.streaming.StreamingSystem` (a DataLoader streamed
once per product; primal solvers only, its noise arrives as Gᵀε accumulated in one pass).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["GGNSystem", "LinearSystem", "SolverResult", "Noise", "draw_noise"]


@dataclass
class SolverResult:
    """Samples ``(K, d)`` (zero-mean posterior draws, or the mean when a target was given)
    plus diagnostics: iterations, a relative-residual trace, and a converged flag."""

    samples: torch.Tensor
    iterations: int
    trace: list[float] = field(default_factory=list)
    converged: bool = True
    residual: float = 0.0
    state: dict = field(default_factory=dict)  # warm-start material (u, alpha, ...)


@dataclass
class Noise:
    """Fixed draws of a sample batch: ξ ``(K, d)`` and ε ``(K, n_obs)`` (reused across EM).

    A streamed data source never holds ε: it carries ``gt_eps`` = Gᵀε ``(K, d)`` instead
    (``eps`` None), which is all the primal solvers need (b = ξ + Lᵀ Gᵀε)."""

    xi: torch.Tensor
    eps: torch.Tensor | None
    gt_eps: torch.Tensor | None = None


def draw_noise(system: GGNSystem, n: int, generator: torch.Generator | None = None) -> Noise:
    """Standard normal ξ ``(n, d)`` and ε ``(n, n_obs)`` (drawn in that order), or for a
    streamed source ξ and Gᵀε (:meth:`GGNSystem.draw_noise`)."""
    if n < 1:
        raise ValueError(f"number of samples must be >= 1, got {n}")
    return system.draw_noise(n, generator)


class GGNSystem:
    """What every solver sees: the whitened GGN Ĝᵀ Ĝ = Lᵀ M L over a data source.

    Subclasses provide ``d``, ``dtype``, ``device``, ``prior``, ``n_data``, ``n_obs``,
    ``per_datum``, :meth:`ggn_mv` (M v over all data or one minibatch), :meth:`draw_noise`,
    :meth:`minibatch` and :meth:`dense_ggn`; the primal products are shared here.
    ``streaming`` says whether observation-space (dual) products exist.
    """

    streaming = False

    def ggn_mv(self, v: torch.Tensor, batch=None) -> torch.Tensor:
        """M v = Gᵀ G v for ``v`` ``(K, d)`` (only ``batch`` when given, unscaled)."""
        raise NotImplementedError

    def gram_hat(self, u: torch.Tensor, batch=None) -> torch.Tensor:
        """Ĝᵀ Ĝ u = Lᵀ M L u for ``u`` ``(K, d)`` (only ``batch`` when given, unscaled)."""
        return self.prior.sqrt_t_mv(self.ggn_mv(self.prior.sqrt_mv(u), batch))

    def primal_mv(self, u: torch.Tensor) -> torch.Tensor:
        """(Ĝᵀ Ĝ + I) u for ``u`` ``(K, d)``."""
        return self.gram_hat(u) + u

    def primal_b(self, noise: Noise) -> torch.Tensor:
        """b = ξ + Ĝᵀε ``(K, d)``, the right-hand side whose solution L u ~ N(0, H⁻¹)."""
        if noise.eps is None:  # a streamed source's Gᵀε, or b itself in ξ (gt_eps None)
            return (
                noise.xi if noise.gt_eps is None else noise.xi + self.prior.sqrt_t_mv(noise.gt_eps)
            )
        return noise.xi + self.Ghat_t(noise.eps)

    def lambda_batch(self):
        """The data a power iteration for λ_max runs on, with its scale: (None, 1.0) = all."""
        return None, 1.0

    def lambda_max(self, iterations: int = 20, generator: torch.Generator | None = None) -> float:
        """Power-iteration estimate of λ_max(Ĝᵀ Ĝ) (padded by 5%); a streamed source
        estimates it on its first minibatch scaled to the data size (:meth:`lambda_batch`)."""
        batch, scale = self.lambda_batch()
        v = torch.randn(1, self.d, generator=generator, dtype=self.dtype, device=self.device)
        lam = 0.0
        with torch.no_grad():
            for _ in range(iterations):
                v = v / v.norm()
                w = scale * self.gram_hat(v, batch)
                lam = float((w * v).sum())
                v = w
        return 1.05 * max(lam, 0.0)

    def draw_noise(self, n: int, generator: torch.Generator | None = None) -> Noise:
        raise NotImplementedError

    def minibatch(self, batch_size: int | None, generator: torch.Generator | None):
        """The next minibatch handle for stochastic solvers and its scale n_data / size."""
        raise NotImplementedError

    def dense_ggn(self) -> torch.Tensor:
        """Dense M = GᵀG ``(d, d)`` in float64: small references only."""
        raise NotImplementedError


class LinearSystem(GGNSystem):
    """G = W J at the stored inputs, with the prior, as batched matrix-free products.

    Args:
        fmodel: :class:`~dip_uq.laplace.jacobian.FunctionalModel`.
        likelihood: Gaussian or Categorical (already ``setup``).
        prior: :class:`~dip_uq.laplace.priors.BlockPrior`.
        inputs: model inputs ``(n_data, ...)`` (for the DIP a single fixed input).
    """

    def __init__(self, fmodel, likelihood, prior, inputs: torch.Tensor) -> None:
        self.fmodel, self.lik, self.prior, self.inputs = fmodel, likelihood, prior, inputs
        f_star = fmodel.output(inputs)
        self.f_shape = tuple(f_star.shape)
        self.obs_shape = tuple(likelihood.whiten(f_star[None]).shape[1:])
        self.n_obs = 1
        for s in self.obs_shape:
            self.n_obs *= s
        self.n_data = inputs.shape[0]
        # minibatching over data needs observations grouped by datum (leading dim kept)
        self.per_datum = (
            len(self.obs_shape) > 0
            and self.obs_shape[0] == self.n_data
            and f_star.shape[0] == self.n_data
        )
        self.d = fmodel.d
        self.dtype = f_star.dtype
        self.device = f_star.device

    def _x(self, idx):
        return self.inputs if idx is None else self.inputs[idx]

    def _shape(self, idx):
        return self.obs_shape if idx is None else (len(idx), *self.obs_shape[1:])

    def obs_index(self, idx: torch.Tensor) -> torch.Tensor:
        """Flat observation coordinates belonging to data points ``idx``."""
        m = self.n_obs // self.n_data
        return (idx[:, None] * m + torch.arange(m, device=idx.device)).reshape(-1)

    def G(self, v: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """G v: ``(K, d)`` -> ``(K, n_obs)`` (only data ``idx`` when given)."""
        f = self.fmodel.jvp(self._x(idx), v)
        return self.lik.whiten(f, idx).reshape(v.shape[0], -1)

    def Gt(self, w: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Gᵀ w: ``(K, n_obs)`` -> ``(K, d)``."""
        u = self.lik.whiten_t(w.reshape(w.shape[0], *self._shape(idx)), idx)
        return self.fmodel.vjp(self._x(idx), u)

    def Ghat(self, u: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Ĝ u = G L u."""
        return self.G(self.prior.sqrt_mv(u), idx)

    def Ghat_t(self, w: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Ĝᵀ w = Lᵀ Gᵀ w."""
        return self.prior.sqrt_t_mv(self.Gt(w, idx))

    def gram_mv(self, a: torch.Tensor) -> torch.Tensor:
        """G Σ Gᵀ a for ``a`` ``(K, n_obs)`` (the kernel without the unit noise)."""
        return self.G(self.prior.cov_mv(self.Gt(a)))

    def kernel_mv(self, a: torch.Tensor) -> torch.Tensor:
        """(G Σ Gᵀ + I) a for ``a`` ``(K, n_obs)``."""
        return self.gram_mv(a) + a

    def ggn_mv(self, v: torch.Tensor, batch=None) -> torch.Tensor:
        """M v = Gᵀ G v (``batch``: data indices, or None for all)."""
        return self.Gt(self.G(v, batch), batch)

    def draw_noise(self, n: int, generator: torch.Generator | None = None) -> Noise:
        """ξ ``(n, d)`` then ε ``(n, n_obs)``, standard normal."""
        kw = dict(generator=generator, dtype=self.dtype, device=self.device)
        return Noise(torch.randn(n, self.d, **kw), torch.randn(n, self.n_obs, **kw))

    def minibatch(self, batch_size: int | None, generator: torch.Generator | None):
        """``batch_size`` data indices drawn without replacement (None: all data)."""
        if batch_size is None or batch_size >= self.n_data:
            return None, 1.0
        idx = torch.randperm(self.n_data, generator=generator, device=self.device)[:batch_size]
        return idx, self.n_data / batch_size

    def dense_ggn(self) -> torch.Tensor:
        G = self.dense_G()
        return G.T @ G

    def dense_G(self) -> torch.Tensor:
        """Dense G ``(n_obs, d)`` in float64: small references only."""
        J = self.fmodel.dense_jacobian(self.inputs)  # (n_f, d)
        Jt = J.T.reshape(self.d, *self.f_shape)
        return self.lik.whiten(Jt).reshape(self.d, -1).T.double()

    def _target(self, target: torch.Tensor) -> torch.Tensor:
        r = target.reshape(1, -1).to(self.dtype)
        if r.shape[1] != self.n_obs:
            raise ValueError(
                f"target: expected {self.n_obs} whitened observations, got {r.shape[1]}"
            )
        return r

    def primal_rhs(self, noise: Noise | None, target: torch.Tensor | None):
        """Primal problem min_u ½‖Ĝu − t‖² + ½‖u − u₀‖²: returns (u₀, t).

        Samples (low-variance objective, all randomness in the regulariser): u₀ = ξ + Ĝᵀε,
        t = None (zero targets). Mean (whitened targets r ``(n_obs,)``): u₀ = 0, t = r.
        """
        if target is not None:
            return torch.zeros(1, self.d, dtype=self.dtype, device=self.device), self._target(
                target
            )
        return self.primal_b(noise), None

    def dual_rhs(self, noise: Noise | None, target: torch.Tensor | None):
        """Dual problem (ĜĜᵀ + I) α = c, θ = θ' + ΣGᵀα: returns (c, θ').

        Samples (Matheron): θ' = L ξ, c = ε − G θ'. Mean: θ' = 0, c = r.
        """
        if target is not None:
            return self._target(target), torch.zeros(
                1, self.d, dtype=self.dtype, device=self.device
            )
        if noise.eps is None:
            raise ValueError("the dual solvers need the observation noise ε, not only Gᵀε")
        theta_p = self.prior.sqrt_mv(noise.xi)
        return noise.eps - self.G(theta_p), theta_p

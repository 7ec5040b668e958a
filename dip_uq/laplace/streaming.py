"""The engine's GGN over a DataLoader: every product is a sum over minibatches (docs/methods.md §2.1, §3).

:class:`StreamingSystem` is the second data source of the one engine
(:class:`~dip_uq.laplace.solvers.system.GGNSystem`): where
:class:`~dip_uq.laplace.solvers.LinearSystem` keeps its inputs in memory, the data here stream
through a loader and nothing of size ``n_data`` is kept. The same likelihood objects whiten
each batch (W_nᵀ W_n = B_n: Gaussian σ⁻² I; softmax diag(p_n) − p_n p_nᵀ + jitter·I at the
network's logits, or at the tangent model's logits f_n + J_n δ, see ``curvature_shift``), and
the same registered solvers run on it (primal cg, sgd over the loader's minibatches, exact):

- GGN products   M v = Σ_n J_nᵀ W_nᵀ W_n J_n v     (one JVP + one VJP per batch, K directions);
- noise          Gᵀε = Σ_n J_nᵀ W_nᵀ ε_n ~ N(0, M)  (one pass; ε is never kept);
- the data passes the front door's mode, EM and evidence need (targets, residuals, losses).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator

import torch

from .checks import check_labels, check_targets
from .jacobian import FunctionalModel
from .likelihoods import Categorical, Gaussian
from .solvers.system import GGNSystem, Noise

__all__ = ["StreamingSystem"]


class StreamingSystem(GGNSystem):
    """The whitened GGN of ``fmodel`` over ``loader`` with ``prior`` (a streamed data source).

    Args:
        fmodel: the functional model (eval-mode copy, selected parameters θ).
        likelihood: :class:`Gaussian` (no operator; its σ² is read at every product) or
            :class:`Categorical` (a template: each batch is whitened at its own logits).
        prior: the :class:`~dip_uq.laplace.priors.BlockPrior` (Σ = L Lᵀ).
        loader: re-iterable of ``(x, y)`` batches (a DataLoader); passed over once per product.
        curvature_shift: softmax only; ``None`` evaluates B_n at the network's logits f_n
            (docs/methods.md §1), a ``(d,)`` tensor δ at the tangent model's logits
            f_n + J_n δ (δ = θ_lin − θ*: the Laplace approximation of the linear model at its
            own mode). One extra JVP direction per batch.
        n_data, n_outputs: the data count and outputs per datum (from :meth:`validate`).
    """

    streaming = True
    per_datum = True

    def __init__(
        self,
        fmodel: FunctionalModel,
        likelihood: Gaussian | Categorical,
        prior,
        loader: Iterable,
        curvature_shift: torch.Tensor | None = None,
        n_data: int | None = None,
        n_outputs: int | None = None,
    ) -> None:
        self.fmodel, self.lik, self.prior, self.loader = fmodel, likelihood, prior, loader
        self.kind = likelihood.kind
        self.theta = fmodel.theta_star()
        self.d = fmodel.d
        self.dtype = self.theta.dtype
        self.device = self.theta.device
        if self.kind == "gaussian":
            curvature_shift = None  # B = σ⁻² I does not depend on the logits
        self.shift = None if curvature_shift is None else curvature_shift.detach().to(self.theta)
        self.n_data, self.n_outputs = n_data, n_outputs
        self._cycle: Iterator | None = None

    @property
    def n_obs(self) -> int:
        return self.n_data * self.n_outputs

    def with_shift(self, curvature_shift: torch.Tensor | None) -> StreamingSystem:
        """The same system with the curvature evaluated at another point (see the class)."""
        return StreamingSystem(
            self.fmodel, self.lik, self.prior, self.loader, curvature_shift, self.n_data,
            self.n_outputs,
        )  # fmt: skip

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
            y = check_labels(y) if self.kind == "categorical" else y.to(self.dtype)
            yield x, y

    def minibatch(self, batch_size: int | None, generator: torch.Generator | None):
        """The loader's next batch (cycling over epochs) and its scale n_data / |batch|."""
        for _ in range(2):
            if self._cycle is None:
                self._cycle = self.batches()
            try:
                x, y = next(self._cycle)
                return (x, y), self.n_data / x.shape[0]
            except StopIteration:
                self._cycle = None
        raise ValueError("the loader yielded no data")

    def lambda_batch(self):
        """The first batch and its scale n_data / |batch| (λ_max of a minibatch GGN, the
        curvature one stochastic step sees)."""
        x, y = next(iter(self.batches()))
        return (x, y), self.n_data / x.shape[0]

    # ---- per-batch pieces -------------------------------------------------------------
    def output_and_jvp(self, x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """f(x; θ*) and J(x) v for ``v`` ``(K, d)`` -> ``(*f.shape)``, ``(K, *f.shape)``."""
        with torch.no_grad():
            return self.fmodel.output(x), self.fmodel.jvp(x, v.to(self.dtype))

    def vjp(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """J(x)ᵀ u for cotangents ``u`` ``(K, *f.shape)`` -> ``(K, d)``."""
        with torch.no_grad():
            return self.fmodel.vjp(x, u)

    def whitening(self, x: torch.Tensor, v: torch.Tensor | None = None):
        """(W for the batch, J v or None, f(x; θ*)), sharing one batched JVP with the
        curvature shift.

        Gaussian: the likelihood itself (W = σ⁻¹ I). Softmax: a :class:`Categorical` set up at
        the curvature point's logits (f, or f + J δ)."""
        dirs = v
        if self.shift is not None:
            s = self.shift[None]
            dirs = s if v is None else torch.cat([v, s.to(v.dtype)])
        if dirs is None:
            f, jv = self.fmodel.output(x), None
        else:
            f, jv = self.output_and_jvp(x, dirs)
        fc = f
        if self.shift is not None:
            fc, jv = f + jv[-1].to(f.dtype), (None if v is None else jv[:-1])
        if self.kind == "gaussian":
            return self.lik, jv, f
        w = Categorical(self.lik.jitter)
        w.setup(fc, None)
        return w, jv, f

    # ---- passes over the data ---------------------------------------------------------
    def ggn_mv(self, v: torch.Tensor, batch=None) -> torch.Tensor:
        """M v = Σ_n J_nᵀ B_n J_n v for ``v`` ``(K, d)`` (one pass, or one ``batch`` (x, y))."""
        out = torch.zeros_like(v)
        for x, _ in self.batches() if batch is None else [batch]:
            w, jv, _ = self.whitening(x, v)
            out += self.vjp(x, w.whiten_t(w.whiten(jv)))
        return out

    def noise_t(
        self, k: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, int, int]:
        """Gᵀε = Σ_n J_nᵀ W_nᵀ ε_n ``(k, d)``, ε ~ N(0, I) drawn batch by batch on the
        generator's device, with the number of data points and outputs per datum (one pass)."""
        gdev = generator.device if generator is not None else torch.device("cpu")
        acc = torch.zeros(k, self.d, dtype=self.dtype, device=self.device)
        n, m = 0, None
        for x, _ in self.batches():
            w, _, f = self.whitening(x)
            eps = torch.randn((k, *f.shape), generator=generator, dtype=self.dtype, device=gdev)
            acc += self.vjp(x, w.whiten_t(eps.to(self.device)))
            n += f.shape[0]
            m = f[0].numel()
        if n == 0:
            raise ValueError("the loader yielded no data")
        return acc, n, m

    def draw_noise(self, n: int, generator: torch.Generator | None = None) -> Noise:
        """ξ ``(n, d)`` then Gᵀε (:meth:`noise_t`), the order :class:`LinearSystem` draws ξ, ε."""
        gdev = generator.device if generator is not None else torch.device("cpu")
        xi = torch.randn(n, self.d, generator=generator, dtype=self.dtype, device=gdev)
        return Noise(xi.to(self.device), None, self.noise_t(n, generator)[0])

    def target_t(self) -> tuple[torch.Tensor, float]:
        """Gaussian affine tangent model: Gᵀr = Σ_n J_nᵀ (y_n − f_n + J_n θ*)/σ² ``(d,)`` (the
        mode's right-hand side, r the whitened targets) and Σ_n ‖y_n − f_n‖² (one pass)."""
        c = torch.zeros(1, self.d, dtype=self.dtype, device=self.device)
        ss = 0.0
        nv = self.lik.noise_var.to(self.dtype)
        for x, y in self.batches():
            f, jt = self.output_and_jvp(x, self.theta[None])
            ytil = y.reshape(f.shape) - f + jt[0]
            c += self.vjp(x, ytil[None] / nv)
            ss += float(((y.reshape(f.shape) - f) ** 2).sum())
        return c[0], ss

    def categorical_grad(self, theta: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Gradient and value of the linear model's data term Σ_n CE(y_n, f_n + J_n(θ − θ*))."""
        delta = (theta - self.theta)[None]
        g = torch.zeros_like(delta)
        loss = 0.0
        for x, y in self.batches():
            f, jd = self.output_and_jvp(x, delta)
            logp = torch.log_softmax(f + jd[0], dim=-1)
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

    def residual_ss(self, theta_lin: torch.Tensor) -> float:
        """Σ_n ‖y_n − f_n − J_n(θ_lin − θ*)‖², the tangent model's residual (Gaussian; one
        pass, one JVP per batch)."""
        ss = 0.0
        direction = (theta_lin - self.theta)[None]
        for x, y in self.batches():
            f, jv = self.output_and_jvp(x, direction)
            ss += float(((y.reshape(f.shape) - f - jv[0]) ** 2).sum())
        return ss

    def _validate_batch(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        try:
            f = self.fmodel.output(x)
        except RuntimeError as err:
            raise ValueError(
                f"the model cannot evaluate inputs of shape {tuple(x.shape)}: {err}"
            ) from err
        if f.shape[0] != x.shape[0]:
            raise ValueError(f"model output has batch size {f.shape[0]} for {x.shape[0]} inputs")
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
        return f

    def validate(self) -> tuple[int, int]:
        """One forward pass: check output shapes against the likelihood, labels, finiteness and
        determinism of the first batch; sets and returns (data points, outputs per datum)."""
        n, m, first, self.n_batches = 0, None, None, 0
        for x, y in self.batches():
            f = self._validate_batch(x, y)
            self.n_batches += 1
            if first is None:
                first = x
            m = f[0].numel()
            n += f.shape[0]
        if n == 0:
            raise ValueError("the loader yielded no data")
        # determinism probe: the first batch again (only meaningful for non-shuffling loaders)
        sampler = getattr(self.loader, "sampler", None)
        if isinstance(sampler, torch.utils.data.SequentialSampler):
            x2, _ = next(iter(self.batches()))
            if x2.shape == first.shape and not torch.equal(x2, first):
                warnings.warn(
                    "the loader yields different features for the same data on two passes "
                    "(augmentation?): features are non-deterministic, so the curvature and EM "
                    "statistics are inconsistent; fit on an augmentation-free loader",
                    stacklevel=3,
                )
        self.n_data, self.n_outputs = n, int(m)
        return n, int(m)

    def _dense_jacobian_tangents(self, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """J(x) as ``d`` output-space tangents ``(d, *f.shape)`` in float64."""
        J = self.fmodel.dense_jacobian(x).double()  # (numel f, d)
        return J.T.reshape(self.d, *f.shape)

    def dense_ggn(self) -> torch.Tensor:
        """Dense M = Σ_n J_nᵀ B_n J_n ``(d, d)`` in float64 (small models only)."""
        M = torch.zeros(self.d, self.d, dtype=torch.float64, device=self.device)
        for x, _ in self.batches():
            w, _, f = self.whitening(x)
            wj = w.whiten(self._dense_jacobian_tangents(x, f).to(f.dtype)).double()
            wj = wj.reshape(self.d, -1)
            M += wj @ wj.T
        return M

    def dense_moments(self) -> dict[str, torch.Tensor | float]:
        """Gaussian, at unit noise, float64 (small models only): M₁ = Σ JᵀJ ``(d, d)``,
        b₁ = Σ Jᵀỹ ``(d,)`` and c₀ = Σ‖ỹ‖² with ỹ = y − f + Jθ* (the evidence's pieces)."""
        M = torch.zeros(self.d, self.d, dtype=torch.float64, device=self.device)
        b1 = torch.zeros(self.d, dtype=torch.float64, device=self.device)
        c0 = 0.0
        theta = self.theta.double()
        for x, y in self.batches():
            f = self.fmodel.output(x).double()
            J = self._dense_jacobian_tangents(x, f).reshape(self.d, -1)  # (d, b·m)
            ytil = y.double().reshape(-1) - f.reshape(-1) + theta @ J
            M += J @ J.T
            b1 += J @ ytil
            c0 += float((ytil**2).sum())
        return {"M": M, "b1": b1, "c0": c0}

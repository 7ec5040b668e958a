"""``Laplace``: linearised Laplace for any trained torch model, with laplace-torch's verbs.

    la = Laplace(model, "classification", subset_of_weights="all", prior="layerwise")
    la.fit(train_loader)                          # streams the data (never all in memory)
    la.optimize_prior_precision(method="em")      # sample-based EM (+ noise σ² for regression)
    probs = la(x, link_approx="probit")           # regression: (mean, variance)

The model is the engine's linear-Gaussian surrogate (docs/methods.md §1): tangent model
h(x; θ) = f(x; θ*) + J(x)(θ − θ*), prior θ ~ N(0, Σ) block-diagonal (one σ_b² per layer,
one for all, or a g-prior θ = S w), curvature B_n at the network's outputs. Posterior
precision H = M + Σ⁻¹ with M = Σ_n J_nᵀ B_n J_n. Samples z ~ N(0, H⁻¹) by
sample-then-optimise over the loader (docs/methods.md §2.1); predictive moments from J(x) z_k by
JVPs, so no Jacobian is ever formed (except by ``solver="exact"``, for small models).

θ_lin is the mode of the *affine* tangent model with the prior centred at 0 (as in
:mod:`dip_uq.laplace.posterior`): argmin Σ_n ℓ(y_n, f_n + J_n(θ − θ*)) + ½ θᵀΣ⁻¹θ.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .checks import check_options, count, warn_if_random_transform
from .front_hyper import (
    block_gamma,
    exact_evidence,
    newton_mode,
    run_em,
    run_marglik,
)
from .jacobian import FunctionalModel
from .likelihoods import Categorical, Gaussian, class_probabilities
from .mstep import BlockGamma
from .params import all_weights, last_layer_predicate
from .priors import BlockPrior
from .solvers import Noise, Solver, SolverResult, make_solver, solver_class
from .solvers.exact import robust_cholesky
from .streaming import StreamingSystem

__all__ = ["Laplace"]

_BN = nn.modules.batchnorm._BatchNorm
_LIKELIHOODS = {"regression": "gaussian", "classification": "categorical"}


class Laplace(nn.Module):
    """Linearised Laplace approximation of a trained ``model`` (laplace-torch-compatible verbs).

    Args:
        model: trained network ``x (B, ...) -> f (B, *out)`` (logits ``(B, C)`` for
            classification). Copied in eval mode (BatchNorm running statistics); never mutated.
        likelihood: ``"regression"`` (Gaussian, noise σ²) or ``"classification"`` (softmax).
        subset_of_weights: ``"all"`` (trainable, normalisation affine excluded), ``"last_layer"``
            or a predicate ``(name, param, module) -> bool``.
        prior: ``"layerwise"`` (one precision per layer), ``"scalar"`` (one for all) or
            ``"g-prior"`` (θ = S w, s_i = M_ii^{-½}, one precision for w). Default:
            ``"g-prior"`` for networks with BatchNorm, else ``"layerwise"``.
        prior_precision: initial λ = 1/σ_b².
        sigma_noise: initial noise std σ (regression).
        n_samples: number K of posterior samples kept for predictions and EM.
        solver: a registered engine solver on the streamed data: ``"cg"`` (primal CG, one
            pass per iteration; default), ``"sgd"`` (Nesterov SGD over the loader's
            minibatches, Polyak-averaged) or ``"exact"`` (dense float64 M, small models only).
        solver_opts: the solver's options (:func:`~dip_uq.laplace.solvers.make_solver`; an
            unknown one raises ``ValueError``). The engine's defaults (cg ``tol`` 1e-6 per
            right-hand side: regression's σ² is read off θ_lin's residual), except
            classification cg ``tol=1e-3`` and sgd ``polyak=True``, ``iterations`` = 50
            epochs, ``check_every`` = one epoch, ``lr`` = 0.1/(λ̂ + 1) (λ̂: the first
            minibatch's scaled λ_max).
        chunk_size: ``vmap`` chunk size for JVP/VJP over samples (bounds memory).
        generator: default generator for all random draws.
        newton_steps: at most this many damped Newton steps for the classification θ_lin.
        curvature: classification only. ``"mode"`` (default): B_n at the tangent model's
            logits f_n + J_n(θ_lin − θ*), i.e. the Laplace approximation of the linearised
            model at its own mode (Newton for θ_lin uses the curvature at each iterate; the
            sample noise is redrawn with the same seed when θ_lin moves). ``"network"``
            (docs/methods.md §1, laplace-torch's GLM): B_n at the network's logits
            f(x_n; θ*). For a network trained to near-zero training loss B is ~0 at its
            logits and the posterior stays at the prior in most directions; at θ_lin it does
            not. The default is the one that was at least as good on every classification
            set of the benchmark (docs/laplace.md).
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str = "classification",
        *,
        subset_of_weights: str | Callable = "all",
        prior: str | None = None,
        prior_precision: float = 1.0,
        sigma_noise: float = 1.0,
        n_samples: int = 64,
        solver: str = "cg",
        solver_opts: dict | None = None,
        chunk_size: int | None = None,
        generator: torch.Generator | None = None,
        newton_steps: int = 8,
        curvature: str = "mode",
    ) -> None:
        super().__init__()
        check_options(
            likelihood=likelihood, likelihoods=_LIKELIHOODS, solver=solver,
            prior_precision=prior_precision, sigma_noise=sigma_noise, n_samples=n_samples,
            chunk_size=chunk_size, newton_steps=newton_steps, curvature=curvature,
            generator=generator,
        )  # fmt: skip
        has_bn = any(isinstance(m, _BN) for m in model.modules())
        if prior is None:
            prior = "g-prior" if has_bn else "layerwise"
        if prior not in ("layerwise", "scalar", "g-prior"):
            raise ValueError(f"unknown prior {prior!r}; use 'layerwise', 'scalar' or 'g-prior'")
        if model.training and any(
            isinstance(m, _BN | nn.modules.dropout._DropoutNd) for m in model.modules()
        ):
            warnings.warn(
                "the model is in train mode with BatchNorm/dropout: Laplace linearises a copy "
                "in eval mode (BatchNorm running statistics, dropout off); call model.eval() to "
                "silence this",
                stacklevel=2,
            )
        if subset_of_weights == "all":
            include: str | Callable = all_weights
        elif subset_of_weights == "last_layer":
            include = last_layer_predicate(model)
        elif callable(subset_of_weights):
            include = subset_of_weights
        else:
            raise ValueError(
                f"unknown subset_of_weights {subset_of_weights!r}; use 'all', 'last_layer' or a predicate"
            )
        blocks = "layer" if prior == "layerwise" else "single"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the train-mode warning was given above
            self.fmodel = FunctionalModel(model, include, blocks, chunk_size)
        self.selection = self.fmodel.selection
        self.likelihood = likelihood
        self.kind = _LIKELIHOODS[likelihood]
        self.prior_kind = prior
        self.prior = BlockPrior(self.selection, "normal", 1.0 / prior_precision)
        self.lik = Gaussian(sigma_noise**2) if self.kind == "gaussian" else Categorical()
        self.n_samples = n_samples
        self.solver = solver
        self.solver_opts = dict(solver_opts or {})
        self.generator = generator
        self.newton_steps = newton_steps
        self.curvature = curvature
        # the weights θ at which the softmax curvature is evaluated (None: θ*); see `curvature`
        self._curv_theta: torch.Tensor | None = None
        self._curv_version = 0
        self.noise_seed: int | None = None
        self._noise_device = "cpu"
        # fitted state (buffers, so state_dict / .to(device) carry them)
        for name in ("xi", "noise_t", "samples", "theta_lin"):
            self.register_buffer(name, None)
        self.n_data: int | None = None
        self.n_outputs: int | None = None
        self.n_batches: int | None = None
        self._exact: tuple | None = None
        self.loader: Iterable | None = None
        self._dense: dict | None = None
        self.history: dict[str, list] = {}

    # ---- basic quantities -------------------------------------------------------------
    @property
    def d(self) -> int:
        """Number of linearised parameters."""
        return self.selection.d

    @property
    def log_sigma2(self) -> torch.Tensor:
        """log σ² (the Gaussian likelihood's parameter; 0 for classification)."""
        if self.kind == "gaussian":
            return self.lik.log_noise_var
        return torch.zeros((), dtype=torch.float64, device=self.prior.log_variance.device)

    @property
    def sigma_noise(self) -> float:
        return self._noise_var() ** 0.5

    @property
    def prior_precision(self) -> torch.Tensor:
        """λ_b = 1/σ_b² per block ``(n_blocks,)`` (in w coordinates for the g-prior)."""
        return 1.0 / self.prior.variances().detach()

    @property
    def _exact_traces(self) -> bool:
        """Whether the solver has exact (dense) traces: EM then uses exact γ."""
        return solver_class(self.solver).exact_traces

    def _noise_var(self) -> float:
        return float(self.lik.noise_var) if self.kind == "gaussian" else 1.0

    def _system(self) -> StreamingSystem:
        """The engine's GGN over the fitted loader at the current hyperparameters."""
        if self.loader is None:
            raise RuntimeError("call fit(train_loader) first")
        return StreamingSystem(
            self.fmodel, self.lik, self.prior, self.loader, self._shift(), self.n_data,
            self.n_outputs,
        )  # fmt: skip

    def _shift(self) -> torch.Tensor | None:
        """δ = θ_c − θ* for the curvature point θ_c (None: the network's logits)."""
        if self._curv_theta is None or self.kind != "categorical":
            return None
        theta = self.fmodel.theta_star()
        return self._curv_theta.to(theta) - theta

    def _set_curvature_point(self, theta: torch.Tensor | None) -> None:
        """Move the softmax curvature to weights ``theta`` (``curvature="mode"`` only); the
        dense caches depend on it."""
        if self.curvature != "mode" or self.kind != "categorical":
            return
        self._curv_theta = None if theta is None else theta.detach().clone()
        self._curv_version += 1
        self._dense = None
        self._exact = None

    def _mode_noise(self, system: StreamingSystem) -> torch.Tensor:
        """Gᵀε at the current curvature point with the fit's fixed ξ, ε (their seed)."""
        gen = torch.Generator(device=self._noise_device).manual_seed(self.noise_seed)
        return system.draw_noise(self.n_samples, gen).gt_eps

    def _check_fitted(self) -> None:
        if self.samples is None:
            raise RuntimeError("call fit(train_loader) before predicting or sampling")

    # ---- whitened-coordinate products (θ = L u, the engine prior's products) -----------
    @torch.no_grad()
    def _L(self, u: torch.Tensor) -> torch.Tensor:
        return self.prior.sqrt_mv(u)

    @torch.no_grad()
    def _Lt(self, v: torch.Tensor) -> torch.Tensor:
        return self.prior.sqrt_t_mv(v)

    @torch.no_grad()
    def _Linv(self, v: torch.Tensor) -> torch.Tensor:
        return self.prior.sqrt_inv_mv(v)

    # ---- fit --------------------------------------------------------------------------
    def fit(
        self,
        train_loader: Iterable,
        *,
        num_data: int | None = None,
        generator: torch.Generator | None = None,
        solve: bool = True,
    ) -> Laplace:
        """Stream ``train_loader`` (``(x, y)`` batches; any re-iterable, e.g. a DataLoader over an
        IterableDataset, then ``num_data`` is checked against the count). Validates shapes and
        labels, draws the fixed sample noise (ξ ~ N(0, I_d) and Σ_n J_nᵀ L_n ε_n, one pass of
        VJPs), installs the g-prior scale, computes θ_lin and K posterior samples."""
        gen = generator if generator is not None else self.generator
        warn_if_random_transform(train_loader)
        probe = StreamingSystem(self.fmodel, self.lik, self.prior, train_loader)
        n_seen, m_out = probe.validate()
        if num_data is not None and num_data != n_seen:
            warnings.warn(
                f"num_data={num_data} but the loader yielded {n_seen} data points; using {n_seen}",
                stacklevel=2,
            )
        self.loader = train_loader
        self.n_data, self.n_outputs, self.n_batches = n_seen, m_out, probe.n_batches
        self._set_curvature_point(None)
        system = self._system()
        gdev = gen.device if gen is not None else torch.device("cpu")
        if self.curvature == "mode" and self.kind == "categorical":
            # ε is redrawn whenever the curvature point moves: keep its seed, not ε (n_data-sized)
            self.noise_seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gdev))
            self._noise_device = str(gdev)
            noise_gen = torch.Generator(device=gdev).manual_seed(self.noise_seed)
        else:
            self.noise_seed, noise_gen = None, gen
        # ξ then ε, the order of the in-memory engine (same seed, same samples)
        xi = torch.randn(self.n_samples, self.d, generator=noise_gen, dtype=system.dtype,
                         device=gdev).to(system.device)  # fmt: skip
        gt_eps, n2, _ = system.noise_t(self.n_samples, noise_gen)
        if n2 != n_seen:
            warnings.warn(
                "the loader yielded a different number of data points on a second pass "
                f"({n_seen} then {n2}): is it an exhausted iterator or does it drop data at random?",
                stacklevel=2,
            )
        # kept at unit noise (Σ Jᵀ W̃ᵀε with σ = 1): EM moves σ² under fixed draws
        self.noise_t = gt_eps * math.sqrt(self._noise_var())
        self.xi = xi
        self._dense = None
        self._exact = None
        if self.prior_kind == "g-prior":
            # Hutchinson estimate of diag M reusing the sample noise (docs/methods.md §4)
            diag = (self.noise_t**2).mean(0) / self._noise_var()
            diag = diag + 1e-6 * diag.mean().clamp_min(torch.finfo(diag.dtype).tiny)
            self.prior.set_scale(diag.rsqrt().double())
        if solve:
            self._solve_all()
        return self

    # ---- solves -----------------------------------------------------------------------
    def _sample_rhs(self, xi: torch.Tensor, noise_t: torch.Tensor) -> torch.Tensor:
        """u₀ = ξ + Lᵀ Gᵀε with Gᵀε = σ⁻¹ Σ Jᵀε (Gaussian) or Σ Jᵀ L_n ε_n (softmax)."""
        return xi + self._Lt(noise_t / math.sqrt(self._noise_var()))

    def _engine_solver(self, system: StreamingSystem) -> Solver:
        """The registered solver with the front door's defaults and ``solver_opts``; the
        exact one holds its dense factors, cached while the hyperparameters are unchanged
        (the Newton steps for θ_lin and the sample solve of one EM cycle share them)."""
        base = solver_class(self.solver).stream_defaults(
            system, self.kind == "categorical", self.n_batches, set(self.solver_opts)
        )
        solver = make_solver(self.solver, **{**base, **self.solver_opts})
        if not solver.exact_traces:  # only the dense factors are worth caching
            return solver
        std = self._coord_std().detach()
        key = (self._noise_var(), self._curv_version)
        cached = self._exact
        if cached is None or cached[1] != key or not torch.equal(cached[0], std):
            self._exact = (std.clone(), key, solver.precondition(system))
        return self._exact[2]

    def _solve(
        self, system: StreamingSystem, b: torch.Tensor, init: torch.Tensor | None
    ) -> tuple[torch.Tensor, SolverResult]:
        """u = (Lᵀ M L + I)⁻¹ b for right-hand sides ``b`` ``(K, d)`` by the engine's solver."""
        res = self._engine_solver(system).sample(
            system, b.shape[0], noise=Noise(b, None), init=init
        )
        u = res.state.get("u")
        return (self._Linv(res.samples) if u is None else u), res

    def _dense_chol(self) -> torch.Tensor:
        """Cholesky factor of the dense P = Lᵀ M L + I (the exact solver's cached factors)."""
        return self._engine_solver(self._system()).options.factors["chol"]

    def _dense_M(self) -> dict:
        """Dense float64 pieces of the evidence: Gaussian M₁ = Σ JᵀJ, b₁, c₀ at unit noise;
        softmax M = Σ Jᵀ B J (cached; small models only)."""
        if self._dense is None:
            if self.d > 20000:
                raise ValueError(
                    f"the exact (dense) path needs a d×d matrix; d = {self.d} is too large: use "
                    "solver='cg' or 'sgd' and EM"
                )
            system = self._system()
            self._dense = (
                system.dense_moments() if self.kind == "gaussian" else {"M": system.dense_ggn()}
            )
        return self._dense

    def _coord_std(self) -> torch.Tensor:
        """Diagonal of L (all front-door priors are diagonal): σ_b s_i per coordinate, float64."""
        var = self.prior.variances()[self.selection.block_index.to(self.prior.log_variance.device)]
        std = var.sqrt()
        if self.prior.scale is not None:
            std = std * self.prior.scale.double()
        return std

    def _dense_P(self, noise_var: torch.Tensor | None = None, std: torch.Tensor | None = None):
        dm = self._dense_M()
        std = self._coord_std().detach() if std is None else std
        nv = (
            torch.as_tensor(self._noise_var(), dtype=torch.float64)
            if noise_var is None
            else noise_var
        )
        M = dm["M"] / nv if self.kind == "gaussian" else dm["M"]
        eye = torch.eye(self.d, dtype=torch.float64, device=M.device)
        return std[:, None] * M * std[None, :] + eye

    def linear_mode(
        self,
        system: StreamingSystem | None = None,
        init: torch.Tensor | None = None,
        n_newton: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """θ_lin (and its whitened u) of the affine tangent model.

        Gaussian: one solve P u = Lᵀc, c = Σ Jᵀ(y − f + Jθ*)/σ². Softmax: damped Newton steps
        with a backtracking line search on Σ CE + ½‖u‖² (the objective is convex); the step's
        curvature P is the one at the network's logits (``curvature="network"``, a fixed
        preconditioner) or at the current iterate (``"mode"``: exact Newton, and the
        curvature point is left at the returned θ_lin)."""
        system = system or self._system()
        if self.kind == "gaussian":
            c, _ = system.target_t()
            u, _ = self._solve(system, self._Lt(c[None]), init)
            return self._L(u)[0], u
        return newton_mode(self, system, init, n_newton)

    def _solve_all(self, u_mode=None, u_samp=None) -> tuple[SolverResult, SolverResult]:
        """θ_lin and K samples at the current hyperparameters (warm-started in u)."""
        system = self._system()
        if self.kind == "gaussian":
            b = self._sample_rhs(self.xi, self.noise_t)
            # one solve for the mode and the K samples together (same matrix P)
            c, _ = system.target_t()
            rhs = torch.cat([self._Lt(c[None]), b])
            init = None
            if u_mode is not None and u_samp is not None:
                init = torch.cat([u_mode, u_samp])
            u, info = self._solve(system, rhs, init)
            u_mode, u_samp = u[:1], u[1:]
            theta_lin = self._L(u_mode)[0]
            info_m = info_s = info
        else:
            theta_lin, u_mode = self.linear_mode(system, u_mode)
            if self.curvature == "mode" and self.kind == "categorical":
                system = self._system()  # the curvature now sits at θ_lin
                self.noise_t = self._mode_noise(system)
            b = self._sample_rhs(self.xi, self.noise_t)
            u_samp, info_s = self._solve(system, b, u_samp)
            info_m = info_s
        self.theta_lin = theta_lin.detach()
        self.samples = self._L(u_samp).detach()
        self._u_mode, self._u_samp = u_mode, u_samp
        return info_m, info_s

    # ---- hyperparameters --------------------------------------------------------------
    def optimize_prior_precision(
        self,
        method: str = "em",
        *,
        n_steps: int = 10,
        fit_noise: bool = True,
        tied_steps: int | None = None,
        verbose: bool = False,
    ) -> dict[str, list]:
        """Fit the prior precisions (and σ² for regression).

        ``"em"`` (scales): sample-based EM, docs/methods.md §3, ``n_steps`` cycles, each one solve for
        θ_lin and the K samples (warm-started; fixed noise) and one statistics pass; MacKay
        updates σ_b² = ‖θ_lin,b‖²_{Σ_b⁻¹σ_b²}/γ_b (γ̂_b as in docs/laplace.md), and
        σ² = Σ‖y − ŷ_lin‖²/(n·m − γ). ``"marglik"``: maximise :meth:`log_marginal_likelihood`
        (dense, small models) with L-BFGS. Returns the history (also ``self.history``)."""
        self._check_fitted()
        if method == "em":
            return run_em(self, n_steps, fit_noise, tied_steps, verbose)
        if method == "marglik":
            return run_marglik(self, fit_noise, n_steps)
        raise ValueError(f"unknown method {method!r}; use 'em' or 'marglik'")

    def _block_gamma(self) -> BlockGamma:
        return block_gamma(self)

    def _exact_evidence(self, log_s2: torch.Tensor, theta_fixed: torch.Tensor) -> torch.Tensor:
        return exact_evidence(self, log_s2, theta_fixed)

    def log_marginal_likelihood(self) -> torch.Tensor:
        """Log evidence of the linearised model at the current hyperparameters (dense M; exact for
        regression, the Laplace approximation of the linear model for classification)."""
        self._check_fitted()
        with torch.no_grad():
            return self._exact_evidence(self.log_sigma2.double(), self.theta_lin.double())

    # ---- samples and predictions ------------------------------------------------------
    def _draw(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        """``n`` fresh zero-mean posterior samples z ~ N(0, H⁻¹) ``(n, d)``."""
        self._check_fitted()
        gen = generator if generator is not None else self.generator
        system = self._system()
        noise = system.draw_noise(n, gen)
        u, _ = self._solve(system, system.primal_b(noise), None)
        return self._L(u)

    def _z(self, n: int | None, generator: torch.Generator | None) -> torch.Tensor:
        self._check_fitted()
        if n is not None:
            count("n_samples", n)
        if n is None or n <= self.samples.shape[0]:
            return self.samples if n is None else self.samples[:n]
        return self._draw(n, generator)

    def sample(
        self, n_samples: int = 100, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Posterior weight samples θ* + z ``(n, d)`` (fresh draws; the model is not modified)."""
        count("n_samples", n_samples)
        return self.fmodel.theta_star()[None] + self._draw(n_samples, generator)

    def _jz(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.fmodel.theta_star().device)
        if x.is_floating_point():
            x = x.to(z.dtype)
        f = self.fmodel.output(x)
        with torch.no_grad():
            jz = self.fmodel.jvp(x, z)
        return f, jz

    def functional_samples(
        self,
        x: torch.Tensor,
        n_samples: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Samples of the linearised function f(x; θ*) + J(x) z_k ``(n, *f(x).shape)``."""
        f, jz = self._jz(x, self._z(n_samples, generator))
        return f[None] + jz

    def predictive_samples(
        self,
        x: torch.Tensor,
        n_samples: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Classification: softmax of functional samples ``(n, B, C)``; regression: functional
        samples plus observation noise σε ``(n, *f.shape)``."""
        fs = self.functional_samples(x, n_samples, generator)
        if self.kind == "categorical":
            return torch.softmax(fs, dim=-1)
        gen = generator if generator is not None else self.generator
        gdev = gen.device if gen is not None else torch.device("cpu")
        eps = torch.randn(fs.shape, generator=gen, dtype=fs.dtype, device=gdev).to(fs.device)
        return fs + self.sigma_noise * eps

    def forward(
        self,
        x: torch.Tensor,
        pred_type: str = "glm",
        link_approx: str = "probit",
        n_samples: int | None = None,
        generator: torch.Generator | None = None,
    ):
        """Predictive at inputs ``x``.

        Classification: probabilities ``(B, C)``; ``link_approx="mc"`` averages softmax over the
        logit samples f + J z_k, ``"probit"`` is softmax(f·κ), κ = (1 + π/8 v)^{-½} with
        v = mean_k (J z_k)². Regression: ``(mean, variance)`` of the linearised function, both
        of f(x)'s shape (per-output variances; add ``sigma_noise**2`` for the observation
        predictive)."""
        if pred_type != "glm":
            raise ValueError(f"pred_type {pred_type!r} is not supported; use 'glm'")
        if self.kind != "gaussian" and link_approx not in ("probit", "mc"):
            raise ValueError(f"unknown link_approx {link_approx!r}; use 'probit' or 'mc'")
        f, jz = self._jz(x, self._z(n_samples, generator))
        if self.kind == "gaussian":
            return f, (jz**2).mean(0)
        return class_probabilities(f, jz, link_approx)

    def exact_functional_variance(self, x: torch.Tensor) -> torch.Tensor:
        """Exact diag J(x) H⁻¹ J(x)ᵀ (dense, float64; small models): reference for tests."""
        self._check_fitted()
        f = self.fmodel.output(x)
        J = self.fmodel.dense_jacobian(x).double()  # (numel f, d)
        JL = J * self._coord_std().detach()[None]
        C, _ = robust_cholesky(self._dense_P())
        var = (JL * torch.cholesky_solve(JL.T, C).T).sum(1)
        return var.reshape(f.shape)

    # ---- state ------------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        return {
            "names": list(self.selection.names),
            "d": self.d,
            "n_data": self.n_data,
            "n_outputs": self.n_outputs,
            "likelihood": self.likelihood,
            "prior_kind": self.prior_kind,
            "curvature": self.curvature,
            "noise_seed": self.noise_seed,
            "noise_device": self._noise_device,
        }

    def set_extra_state(self, state: dict) -> None:
        if state.get("names") != list(self.selection.names) or state.get("d") != self.d:
            raise ValueError(
                f"state_dict was saved for a different parameter selection (d={state.get('d')}); "
                f"this object has d={self.d}"
            )
        if state.get("likelihood") != self.likelihood:
            raise ValueError(
                f"state_dict is for likelihood {state.get('likelihood')!r}, not {self.likelihood!r}"
            )
        if state.get("curvature", "network") != self.curvature:
            raise ValueError(
                f"state_dict was fitted with curvature={state.get('curvature')!r}, this object "
                f"has curvature={self.curvature!r}"
            )
        self.n_data, self.n_outputs = state.get("n_data"), state.get("n_outputs")
        self.noise_seed = state.get("noise_seed")
        self._noise_device = state.get("noise_device", "cpu")

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # buffers that are None until fit() must exist to receive the saved tensors
        for name in ("xi", "noise_t", "samples", "theta_lin"):
            if name in state_dict and getattr(self, name) is None:
                setattr(self, name, torch.empty_like(state_dict[name]))
        scale = state_dict.get("prior.scale")
        if scale is not None and self.prior.scale is None:
            self.prior.scale = torch.ones_like(scale)
        out = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if self.curvature == "mode" and self.theta_lin is not None:
            self._set_curvature_point(self.theta_lin)
        return out

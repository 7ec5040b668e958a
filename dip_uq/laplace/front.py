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

from .checks import check_options, check_targets, count
from .jacobian import FunctionalModel
from .mstep import (
    BlockGamma,
    exact_gamma_from_precision,
    mackay_update,
    noise_update,
    paired_block_gamma,
)
from .params import NORM_LAYERS, all_weights
from .priors import BlockPrior
from .solvers.exact import robust_cholesky
from .streaming import SolveInfo, StreamingProblem, cg_solve, sgd_solve

__all__ = ["Laplace"]

_BN = nn.modules.batchnorm._BatchNorm
_LIKELIHOODS = {"regression": "gaussian", "classification": "categorical"}


def _last_layer_predicate(model: nn.Module) -> Callable:
    """Select the parameters of the last module (in definition order) that owns trainable,
    non-normalisation parameters."""
    last = None
    for name, mod in model.named_modules():
        if isinstance(mod, NORM_LAYERS):
            continue
        if any(p.requires_grad for p in mod.parameters(recurse=False)):
            last = name
    if last is None:
        raise ValueError("subset_of_weights='last_layer': the model has no trainable layer")
    prefix = f"{last}." if last else ""

    def pred(name: str, param: nn.Parameter, module: nn.Module) -> bool:
        return (
            param.requires_grad and name.startswith(prefix) and name.count(".") == prefix.count(".")
        )

    return pred


def _warn_if_random_transform(loader: Iterable) -> None:
    ds = getattr(loader, "dataset", None)
    for attr in ("transform", "transforms"):
        if getattr(ds, attr, None) is not None:
            warnings.warn(
                f"the loader's dataset has a {attr!r}: if it augments at random, the features "
                "are non-deterministic and the curvature, noise and EM statistics of different "
                "passes disagree; fit on an augmentation-free loader",
                stacklevel=3,
            )
            return


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
        solver: ``"cg"`` (streaming primal CG, default), ``"sgd"`` (minibatch Nesterov SGD)
            or ``"exact"`` (dense float64 M, small models only).
        solver_opts: options for the solver (cg: ``tol``, ``max_iter``; sgd: ``epochs``,
            ``lr``, ``momentum``, ``polyak``).
        chunk_size: ``vmap`` chunk size for JVP/VJP over samples (bounds memory).
        generator: default generator for all random draws.
        newton_steps: at most this many damped Newton steps for the classification θ_lin.
        curvature: classification only. ``"network"`` (default, docs/methods.md §1): B_n at the
            network's logits f(x_n; θ*), as laplace-torch's GLM. ``"mode"``: B_n at the tangent
            model's logits f_n + J_n(θ_lin − θ*), i.e. the Laplace approximation of the
            linearised model at its own mode (Newton for θ_lin uses the curvature at each
            iterate; the sample noise is redrawn with the same seed when θ_lin moves). For
            a network trained to near-zero training loss B is ~0 at its logits and the posterior
            stays at the prior in most directions; at θ_lin it does not (docs/laplace.md).
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
        curvature: str = "network",
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
            include = _last_layer_predicate(model)
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
        self.register_buffer(
            "log_sigma2", torch.tensor(2 * math.log(sigma_noise), dtype=torch.float64)
        )
        self.n_samples = n_samples
        self.solver = solver
        self.solver_opts = dict(solver_opts or {})
        self.chunk_size = chunk_size
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
        self.loader: Iterable | None = None
        self._dense: dict | None = None
        self.history: dict[str, list] = {}

    # ---- basic quantities -------------------------------------------------------------
    @property
    def d(self) -> int:
        """Number of linearised parameters."""
        return self.selection.d

    @property
    def sigma_noise(self) -> float:
        return float(self.log_sigma2.exp().sqrt())

    @property
    def prior_precision(self) -> torch.Tensor:
        """λ_b = 1/σ_b² per block ``(n_blocks,)`` (in w coordinates for the g-prior)."""
        return 1.0 / self.prior.variances().detach()

    def _noise_var(self) -> float:
        return float(self.log_sigma2.exp()) if self.kind == "gaussian" else 1.0

    def _problem(self, loader: Iterable | None = None) -> StreamingProblem:
        loader = loader if loader is not None else self.loader
        if loader is None:
            raise RuntimeError("call fit(train_loader) first")
        return StreamingProblem(
            self.fmodel, self.kind, loader, self._noise_var, self.chunk_size, self._shift()
        )

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
        self._chol_cache = None

    def _mode_noise(self, problem: StreamingProblem) -> torch.Tensor:
        """Σ_n J_nᵀ L_n ε_n at the current curvature point with the fit's fixed ε (its seed)."""
        gen = torch.Generator(device=self._noise_device).manual_seed(self.noise_seed)
        return problem.noise_pass(self.n_samples, gen)[0]

    def _check_fitted(self) -> None:
        if self.samples is None:
            raise RuntimeError("call fit(train_loader) before predicting or sampling")

    # ---- whitened-coordinate products (θ = L u) ---------------------------------------
    # Every front-door prior is diagonal (block Normal, optionally g-prior scaled), so L is the
    # per-coordinate std: products are elementwise in the vectors' own dtype (no float64 copy
    # of a (K, d) block, which at ResNet-18 size is K × 90 MB).
    def _std_as(self, v: torch.Tensor) -> torch.Tensor:
        return self._coord_std().detach().to(device=v.device, dtype=v.dtype)

    @torch.no_grad()
    def _L(self, u: torch.Tensor) -> torch.Tensor:
        return u * self._std_as(u)

    @torch.no_grad()
    def _Lt(self, v: torch.Tensor) -> torch.Tensor:
        return v * self._std_as(v)

    @torch.no_grad()
    def _Linv(self, v: torch.Tensor) -> torch.Tensor:
        return v / self._std_as(v)

    def _P(self, problem: StreamingProblem) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda u: self._Lt(problem.ggn_mv(self._L(u))) + u

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
        _warn_if_random_transform(train_loader)
        n_seen, m_out = self._validate(train_loader)
        if num_data is not None and num_data != n_seen:
            warnings.warn(
                f"num_data={num_data} but the loader yielded {n_seen} data points; using {n_seen}",
                stacklevel=2,
            )
        self.loader = train_loader
        self.n_data, self.n_outputs = n_seen, m_out
        self._set_curvature_point(None)
        problem = self._problem()
        gdev = gen.device if gen is not None else torch.device("cpu")
        if self.curvature == "mode" and self.kind == "categorical":
            # ε is redrawn whenever the curvature point moves: keep its seed, not ε (n_data-sized)
            self.noise_seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gdev))
            self._noise_device = str(gdev)
            noise_gen = torch.Generator(device=gdev).manual_seed(self.noise_seed)
        else:
            self.noise_seed, noise_gen = None, gen
        noise_t, n2, _ = problem.noise_pass(self.n_samples, noise_gen)
        if n2 != n_seen:
            warnings.warn(
                "the loader yielded a different number of data points on a second pass "
                f"({n_seen} then {n2}): is it an exhausted iterator or does it drop data at random?",
                stacklevel=2,
            )
        self.noise_t = noise_t
        self.xi = torch.randn(
            self.n_samples, self.d, generator=gen, dtype=problem.dtype, device=gdev
        ).to(problem.device)
        self._dense = None
        self._chol_cache = None
        if self.prior_kind == "g-prior":
            # Hutchinson estimate of diag M reusing the sample noise (docs/methods.md §4)
            diag = (self.noise_t**2).mean(0) / self._noise_var()
            diag = diag + 1e-6 * diag.mean().clamp_min(torch.finfo(diag.dtype).tiny)
            self.prior.set_scale(diag.rsqrt().double())
        if solve:
            self._solve_all()
        return self

    def _validate(self, loader: Iterable) -> tuple[int, int]:
        """One forward pass: check output shapes against the likelihood, labels, finiteness and
        determinism of the first batch; returns (number of data points, outputs per datum)."""
        problem = StreamingProblem(self.fmodel, self.kind, loader, self._noise_var)
        n, m, first = 0, None, None
        for x, y in problem.batches():
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
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, torch.utils.data.SequentialSampler):
            x2, _ = next(iter(problem.batches()))
            if x2.shape == first[0].shape and not torch.equal(x2, first[0]):
                warnings.warn(
                    "the loader yields different features for the same data on two passes "
                    "(augmentation?): features are non-deterministic, so the curvature and EM "
                    "statistics are inconsistent; fit on an augmentation-free loader",
                    stacklevel=3,
                )
        return n, int(m)

    # ---- solves -----------------------------------------------------------------------
    def _sample_rhs(self, xi: torch.Tensor, noise_t: torch.Tensor) -> torch.Tensor:
        """u₀ = ξ + Lᵀ Gᵀε with Gᵀε = σ⁻¹ Σ Jᵀε (Gaussian) or Σ Jᵀ L_n ε_n (softmax)."""
        return xi + self._Lt(noise_t / math.sqrt(self._noise_var()))

    def _solve(
        self, problem: StreamingProblem, b: torch.Tensor, init: torch.Tensor | None
    ) -> tuple[torch.Tensor, SolveInfo]:
        opts = dict(self.solver_opts)
        if self.solver == "exact":
            u = torch.cholesky_solve(b.double().T, self._dense_chol()).T.to(b.dtype)
            return u, SolveInfo(0, [], 0.0, True)
        if self.solver == "cg":
            return cg_solve(self._P(problem), b, init, **opts)
        return sgd_solve(problem, self._L, self._Lt, b, self.n_data, init, **opts)

    def _dense_M(self) -> dict:
        if self._dense is None:
            if self.d > 20000:
                raise ValueError(
                    f"the exact (dense) path needs a d×d matrix; d = {self.d} is too large: use "
                    "solver='cg' or 'sgd' and EM"
                )
            self._dense = self._problem().dense()
        return self._dense

    def _dense_chol(self) -> torch.Tensor:
        """Cholesky factor of the dense P, cached while the hyperparameters are unchanged (the
        Newton steps for θ_lin and the sample solve of one EM cycle share it)."""
        std = self._coord_std().detach()
        key = (std, (self._noise_var(), self._curv_version))
        cache = getattr(self, "_chol_cache", None)
        if (
            cache is None
            or cache[1] != key[1]
            or cache[0].device != std.device
            or not torch.equal(cache[0], std)
        ):
            C, _ = robust_cholesky(self._dense_P())
            self._chol_cache = (std.clone(), key[1], C)
        return self._chol_cache[2]

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
        problem: StreamingProblem | None = None,
        init: torch.Tensor | None = None,
        n_newton: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """θ_lin (and its whitened u) of the affine tangent model.

        Gaussian: one solve P u = Lᵀc, c = Σ Jᵀ(y − f + Jθ*)/σ². Softmax: damped Newton steps
        with a backtracking line search on Σ CE + ½‖u‖² (the objective is convex); the step's
        curvature P is the one at the network's logits (``curvature="network"``, a fixed
        preconditioner) or at the current iterate (``"mode"``: exact Newton, and the
        curvature point is left at the returned θ_lin)."""
        problem = problem or self._problem()
        if self.kind == "gaussian":
            c, _ = problem.mode_rhs()
            u, _ = self._solve(problem, self._Lt(c[None]), init)
            return self._L(u)[0], u
        u = (
            self._Linv(problem.theta[None]) if init is None else init.clone()
        )  # start at θ* (or warm)
        obj = problem.categorical_loss(self._L(u)[0]) + 0.5 * float((u**2).sum())
        at_mode = self.curvature == "mode"
        for _ in range(self.newton_steps if n_newton is None else n_newton):
            if at_mode:
                self._set_curvature_point(self._L(u)[0])
                problem = problem.with_shift(self._shift())
            g_data, _ = problem.categorical_grad(self._L(u)[0])
            g = self._Lt(g_data[None]) + u
            step, _ = self._solve(problem, g, None)
            half_decrement = 0.5 * float((g * step).sum())
            if half_decrement < 1e-7 * max(abs(obj), 1.0):
                # quadratic region: the predicted decrease is below what a float32 objective
                # resolves, so a line search would reject the (good) full step
                u = u - step
                break
            t = 1.0
            for _ls in range(10):
                u_new = u - t * step
                obj_new = problem.categorical_loss(self._L(u_new)[0]) + 0.5 * float(
                    (u_new**2).sum()
                )
                if obj_new <= obj - 1e-4 * t * float((g * step).sum()):
                    break
                t *= 0.5
            else:
                break
            decrease = obj - obj_new
            u, obj = u_new, obj_new
            if decrease < 1e-6 * max(abs(obj), 1.0):
                break
        if at_mode:
            self._set_curvature_point(self._L(u)[0])
        return self._L(u)[0], u

    def _solve_all(self, u_mode=None, u_samp=None) -> tuple[SolveInfo, SolveInfo]:
        """θ_lin and K samples at the current hyperparameters (warm-started in u)."""
        problem = self._problem()
        if self.kind == "gaussian" and self.solver != "exact":
            b = self._sample_rhs(self.xi, self.noise_t)
            # one solve for the mode and the K samples together (same matrix P)
            c, _ = problem.mode_rhs()
            rhs = torch.cat([self._Lt(c[None]), b])
            init = None
            if u_mode is not None and u_samp is not None:
                init = torch.cat([u_mode, u_samp])
            u, info = self._solve(problem, rhs, init)
            u_mode, u_samp = u[:1], u[1:]
            theta_lin = self._L(u_mode)[0]
            info_m = info_s = info
        else:
            theta_lin, u_mode = self.linear_mode(problem, u_mode)
            if self.curvature == "mode" and self.kind == "categorical":
                problem = self._problem()  # the curvature now sits at θ_lin
                self.noise_t = self._mode_noise(problem)
            b = self._sample_rhs(self.xi, self.noise_t)
            u_samp, info_s = self._solve(problem, b, u_samp)
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
        updates σ_b² = ‖θ_lin,b‖²_{Σ_b⁻¹σ_b²}/γ_b with the function-space γ̂_b, and
        σ² = Σ‖y − ŷ_lin‖²/(n·m − γ). ``"marglik"``: maximise :meth:`log_marginal_likelihood`
        (dense, small models) with L-BFGS. Returns the history (also ``self.history``)."""
        self._check_fitted()
        if method == "em":
            return self._em(n_steps, fit_noise, tied_steps, verbose)
        if method == "marglik":
            return self._marglik(fit_noise, n_steps)
        raise ValueError(f"unknown method {method!r}; use 'em' or 'marglik'")

    def _em(self, n_cycles, fit_noise, tied, verbose) -> dict[str, list]:
        if n_cycles < 1:
            raise ValueError(f"n_steps must be >= 1, got {n_cycles}")
        prior, sel = self.prior, self.selection
        nb = sel.n_blocks
        if tied is None:
            tied = min(2, n_cycles // 2) if nb > 1 else 0
        sizes = sel.block_sizes().to(prior.log_variance.device).double()
        n_obs = self.n_data * self.n_outputs
        hist: dict[str, list] = {
            "prior_precision": [],
            "sigma_noise": [],
            "gamma": [],
            "unresolved": [],
            "residual": [],
            "converged": [],
        }
        u_mode, u_samp = getattr(self, "_u_mode", None), getattr(self, "_u_samp", None)
        for cycle in range(n_cycles):
            if cycle > 0:
                info_m, info_s = self._solve_all(u_mode, u_samp)
            else:
                info_m = info_s = SolveInfo(0, [], 0.0, True)
            theta_lin, z = self.theta_lin, self.samples
            g = self._block_gamma()
            with torch.no_grad():
                var_old = prior.variances().double()
                q_b = var_old * prior.block_quadratic(theta_lin[None].double())[0]
                new_var, gamma, unresolved, _ = mackay_update(
                    var_old, q_b, g, sizes, tied=cycle < tied, n_obs=n_obs
                )
                z_old, th_old = z, theta_lin  # not modified in place below
                prior.set_variances(new_var.clamp_min(1e-30))
                if self.kind == "gaussian" and fit_noise:
                    ss = self._problem().residual_ss(theta_lin)
                    floor = 1e-6 * ss / max(n_obs, 1) + 1e-30
                    s2, _ = noise_update(ss, n_obs, gamma, g.total_se)
                    self.log_sigma2.fill_(math.log(max(s2, floor)))
                # warm starts: the same θ under the new prior
                u_mode = self._Linv(th_old[None]).to(z.dtype)
                u_samp = self._Linv(z_old).to(z.dtype)
            hist["prior_precision"].append(self.prior_precision.clone())
            hist["sigma_noise"].append(self.sigma_noise)
            hist["gamma"].append(g.gamma.clone())
            hist["unresolved"].append(unresolved.clone())
            hist["residual"].append(max(info_m.residual, info_s.residual))
            hist["converged"].append(info_m.converged and info_s.converged)
            if verbose:
                print(
                    f"EM {cycle + 1}/{n_cycles}: gamma={gamma:.1f} "
                    f"lambda={self.prior_precision.tolist()} sigma={self.sigma_noise:.4g}"
                )
        self._solve_all(u_mode, u_samp)
        if nb > 1 and bool(unresolved.any()) and n_cycles > tied:
            blocks = unresolved.nonzero().flatten().tolist()
            why = (
                "have γ ≈ 0: the data do not use them, so the evidence is flat in their "
                "precision (it grows without bound; the predictive is unaffected)"
                if self.solver == "exact"
                else f"have γ within 3 Monte-Carlo standard errors of zero with "
                f"{self.n_samples} samples: they kept their variance (raise n_samples, or "
                "use prior='scalar')"
            )
            warnings.warn(f"EM: prior block(s) {blocks} {why}", stacklevel=3)
        self.history = hist
        return hist

    def _block_gamma(self) -> BlockGamma:
        """γ_b at the current hyperparameters: exact from the dense factor (solver='exact'),
        else the paired estimate from the fit's prior draws ξ and whitened samples u."""
        if self.solver == "exact":
            return exact_gamma_from_precision(self._dense_chol(), self.selection.block_sum)
        u = self._Linv(self.samples)
        return paired_block_gamma(self.xi, u, self.selection.block_sum)

    def _marglik(self, fit_noise: bool, rounds: int) -> dict[str, list]:
        params = [self.prior.log_variance]
        log_s2 = self.log_sigma2.detach().clone().requires_grad_(True)
        if self.kind == "gaussian" and fit_noise:
            params.append(log_s2)
        hist: dict[str, list] = {"log_marginal_likelihood": [], "prior_precision": []}
        for _ in range(max(1, rounds if self.kind == "categorical" else 1)):
            theta_fixed = self.theta_lin.double()
            opt = torch.optim.LBFGS(params, lr=1.0, max_iter=100, line_search_fn="strong_wolfe")

            def closure(opt=opt, theta_fixed=theta_fixed):
                opt.zero_grad()
                loss = -self._exact_evidence(log_s2, theta_fixed)
                loss.backward()
                return loss

            self.prior.log_variance.requires_grad_(True)
            try:
                opt.step(closure)
            finally:
                self.prior.log_variance.grad = None
            with torch.no_grad():
                self.log_sigma2.copy_(log_s2.detach())
            self._solve_all()
            hist["log_marginal_likelihood"].append(float(self.log_marginal_likelihood()))
            hist["prior_precision"].append(self.prior_precision.clone())
        self.history = hist
        return hist

    def _exact_evidence(self, log_s2: torch.Tensor, theta_fixed: torch.Tensor) -> torch.Tensor:
        """Exact log evidence (dense, float64, differentiable in log σ_b², log σ²).

        Gaussian (exact for the affine tangent model): with l = diag L, P = l M₁ l/σ² + I,
        u = P⁻¹ l b₁/σ², θ = l u: −½ SS(θ)/σ² − ½‖u‖² − ½ log|P| − (n_obs/2) log 2πσ²,
        SS(θ) = c₀ − 2θᵀb₁ + θᵀM₁θ. Softmax (Laplace approximation of the linear model at a
        fixed θ_lin): Σ log p(y|θ_lin) − ½ θ_linᵀΣ⁻¹θ_lin − ½ log|P|."""
        dm = self._dense_M()
        std = self._coord_std()
        if self.kind == "gaussian":
            s2 = log_s2.exp()
            P = self._dense_P(s2, std)
            C, _ = robust_cholesky(P)
            bw = std * dm["b1"] / s2
            u = torch.cholesky_solve(bw[:, None], C)[:, 0]
            th = std * u
            ss = dm["c0"] - 2 * th @ dm["b1"] + th @ dm["M"] @ th
            n_obs = self.n_data * self.n_outputs
            return (
                -0.5 * ss / s2
                - 0.5 * u @ u
                - C.diagonal().log().sum()
                - 0.5 * n_obs * (math.log(2 * math.pi) + log_s2)
            )
        P = self._dense_P(None, std)
        C, _ = robust_cholesky(P)
        loglik = -self._problem().categorical_loss(theta_fixed.to(self.fmodel.theta_star().dtype))
        return loglik - 0.5 * ((theta_fixed / std) ** 2).sum() - C.diagonal().log().sum()

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
        problem = self._problem()
        noise_t, _, _ = problem.noise_pass(n, gen)
        gdev = gen.device if gen is not None else torch.device("cpu")
        xi = torch.randn(n, self.d, generator=gen, dtype=problem.dtype, device=gdev).to(
            problem.device
        )
        u, _ = self._solve(problem, self._sample_rhs(xi, noise_t), None)
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
        f, jz = self._jz(x, self._z(n_samples, generator))
        if self.kind == "gaussian":
            return f, (jz**2).mean(0)
        if link_approx == "mc":
            return torch.softmax(f[None] + jz, dim=-1).mean(0)
        if link_approx == "probit":
            v = (jz**2).mean(0)
            return torch.softmax(f / torch.sqrt(1 + math.pi / 8 * v), dim=-1)
        raise ValueError(f"unknown link_approx {link_approx!r}; use 'probit' or 'mc'")

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

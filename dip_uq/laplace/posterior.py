"""``LinearisedLaplace``: the public object of the engine (docs/methods.md §1, §2, §7).

The linear-Gaussian surrogate of a trained network f(x; θ*): tangent model
h(x; θ) = f(x; θ*) + J(x)(θ − θ*), prior θ ~ N(0, Σ) (block-diagonal), likelihood curvature
B at f(x; θ*). Posterior precision H = GᵀG + Σ⁻¹ with G = W J (W from the likelihood).

Linear-model mode (documented choice): θ_lin is the mode of the *affine* tangent model with
the prior centred at 0, θ_lin = argmin ½‖W(f* + J(θ − θ*)) − W y‖² + ½ θᵀΣ⁻¹θ, i.e. the
posterior mean of the linear-Gaussian model with pseudo-targets y − A f* + A J θ*. Its exact
evidence is log N(y − A f* + A J θ*; 0, A J Σ Jᵀ Aᵀ + σ² I), the quantity EM maximises; θ*
never enters a ‖θ‖² term (docs/methods.md §3).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .jacobian import FunctionalModel
from .likelihoods import Categorical, Gaussian, class_probabilities
from .priors import BlockPrior
from .solvers import LinearSystem, Noise, Solver, SolverResult, make_solver
from .solvers.exact import robust_cholesky
from .stats import SampleBank, Welford

__all__ = ["LinearisedLaplace"]


class LinearisedLaplace(nn.Module):
    """Linearised Laplace posterior of ``model`` at its current weights.

    Args:
        model: trained network; copied and evaluated in eval mode (never mutated).
        likelihood: :class:`Gaussian` (optionally with an operator A) or :class:`Categorical`.
        inputs: model inputs ``(n, ...)`` (the DIP: its one fixed input ``z0`` of shape (1, ...)).
        targets: Gaussian: observations of shape ``A f(inputs)``; categorical: labels ``(n,)``.
        params: ``"default"`` (trainable, norm affine excluded), ``"conv_weights"`` or a
            predicate ``(name, param, module) -> bool``.
        blocks: ``"layer"``, ``"single"`` or a callable ``param name -> block name``.
        prior: ``"normal"``, ``"matern"`` or a callable ``block name -> kind``.
        prior_variance, lengthscale: initial σ_b², ℓ_b.
        chunk_size: optional ``vmap`` chunk size for JVP/VJP batches.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: Gaussian | Categorical,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        *,
        params: str | Callable = "default",
        blocks: str | Callable = "layer",
        prior: str | Callable = "normal",
        prior_variance: float = 1.0,
        lengthscale: float = 0.1,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(likelihood, Gaussian | Categorical):
            raise TypeError(
                f"likelihood must be Gaussian or Categorical, got {type(likelihood).__name__}"
            )
        if not torch.is_tensor(inputs) or not torch.is_tensor(targets):
            raise TypeError("inputs and targets must be torch tensors")
        if inputs.is_floating_point() and not torch.all(torch.isfinite(inputs)):
            raise ValueError("inputs contain NaN or inf")
        self.fmodel = FunctionalModel(model, params, blocks, chunk_size)
        self.selection = self.fmodel.selection
        self.likelihood = likelihood
        self.prior = BlockPrior(self.selection, prior, prior_variance, lengthscale)
        self.register_buffer("inputs", inputs.detach().clone())
        self.register_buffer("targets", targets.detach().clone())
        try:
            f_star = self.fmodel.output(self.inputs)
        except RuntimeError as err:
            raise ValueError(
                f"the model cannot evaluate the inputs of shape {tuple(inputs.shape)}: {err}"
            ) from err
        if not torch.all(torch.isfinite(f_star)):
            raise ValueError("the model output at the inputs is not finite")
        self.likelihood.setup(f_star, self.targets)

    # ---- basic quantities -----------------------------------------------------------
    @property
    def d(self) -> int:
        """Number of linearised parameters."""
        return self.selection.d

    def system(self) -> LinearSystem:
        """The matrix-free linear system (G = W J, prior) at the current hyperparameters."""
        return LinearSystem(self.fmodel, self.likelihood, self.prior, self.inputs)

    def theta_star(self) -> torch.Tensor:
        return self.fmodel.theta_star()

    def _gaussian(self, what: str) -> Gaussian:
        if not isinstance(self.likelihood, Gaussian):
            raise NotImplementedError(f"{what} is implemented for Gaussian likelihoods only")
        return self.likelihood

    def whitened_targets(self, system: LinearSystem | None = None) -> torch.Tensor:
        """r = σ⁻¹(y − A f* + A J θ*) ``(n_obs,)``: targets of the affine tangent model."""
        lik = self._gaussian("the linear-model mode")
        system = system or self.system()
        with torch.no_grad():
            pred = lik.observe(self.fmodel.output(self.inputs))
            r = lik.whitened_residual(self.targets, pred).reshape(-1)
            return r + system.G(self.theta_star()[None])[0]

    def linear_prediction(self, theta: torch.Tensor) -> torch.Tensor:
        """Observation-space prediction of the tangent model A(f* + J(θ − θ*))."""
        lik = self._gaussian("linear_prediction")
        with torch.no_grad():
            f = self.fmodel.output(self.inputs)
            delta = (theta - self.theta_star())[None]
            return lik.observe(f + self.fmodel.jvp(self.inputs, delta)[0])

    # ---- solvers ---------------------------------------------------------------------
    def linear_mode(
        self, solver: str | Solver = "cg", *, init: torch.Tensor | None = None, **opts
    ) -> SolverResult:
        """θ_lin (affine tangent model, prior mean 0) by ``solver`` (a name or a
        :class:`~dip_uq.laplace.solvers.Solver`, with ``opts`` as its options);
        ``.samples[0]`` is θ_lin."""
        system = self.system()
        return make_solver(solver, **opts).sample(
            system, 1, target=self.whitened_targets(system), init=init
        )

    def sample(
        self,
        n: int,
        solver: str | Solver = "exact",
        generator: torch.Generator | None = None,
        *,
        noise: Noise | None = None,
        **opts,
    ) -> SolverResult:
        """``n`` zero-mean posterior weight samples z ~ N(0, H⁻¹) ``(n, d)`` with diagnostics.

        Posterior weight samples are θ* + z (the predictive mean is f(x; θ*)). ``solver``:
        ``exact``, ``sgd``, ``cg`` or ``sdd``, or a :class:`~dip_uq.laplace.solvers.Solver`;
        ``opts`` are its options (:func:`~dip_uq.laplace.solvers.make_solver`: an unknown
        one raises ``ValueError``).
        """
        return make_solver(solver, **opts).sample(self.system(), n, generator, noise=noise)

    def functional_samples(self, z: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """J(x) z for samples ``z`` ``(K, d)`` -> ``(K, *f(x).shape)`` (x defaults to the inputs)."""
        x = self.inputs if x is None else x
        with torch.no_grad():
            return self.fmodel.jvp(x, z.to(self.inputs.dtype if x.is_floating_point() else z.dtype))

    def functional_variance(
        self,
        x: torch.Tensor | None = None,
        n_samples: int = 256,
        solver: str | Solver = "cg",
        generator: torch.Generator | None = None,
        *,
        batch_size: int = 64,
        bank: SampleBank | None = None,
        **opts,
    ) -> torch.Tensor:
        """Var[J(x) z] per output, streamed over sample batches (Welford, zero-mean samples).

        Returns a tensor of shape ``f(x).shape`` (the DIP: the voxelwise variance map). When a
        ``bank`` is given, the weight samples are added to it (save/resume it yourself).
        """
        acc = Welford()
        done = 0
        solver = make_solver(solver, **opts)
        if n_samples > batch_size:  # one preconditioner for all batches (same hyperparameters)
            solver = solver.precondition(self.system())
        while done < n_samples:
            k = min(batch_size, n_samples - done)
            res = self.sample(k, solver, generator)
            if bank is not None:
                bank.add(res.samples)
            acc.update(self.functional_samples(res.samples, x))
            done += k
        return acc.second_moment()

    def predictive(
        self,
        x: torch.Tensor,
        n_samples: int = 256,
        solver: str | Solver = "cg",
        generator: torch.Generator | None = None,
        **opts,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Regression predictive ``(f(x; θ*), Var[J(x) z])`` (laplace-torch's ``(f_mu, f_var)``)."""
        return self.fmodel.output(x), self.functional_variance(
            x, n_samples, solver, generator, **opts
        )

    def predict_proba(self, x: torch.Tensor, z: torch.Tensor, link: str = "probit") -> torch.Tensor:
        """Class probabilities ``(n, C)`` from logit samples f(x) + J(x) z_k.

        ``"mc"``: mean over k of softmax; ``"probit"``: softmax(f·κ), κ = (1 + π/8 v)^{-½},
        v = mean_k (J z_k)²."""
        if link not in ("probit", "mc"):
            raise ValueError(f"unknown link {link!r}; use 'probit' or 'mc'")
        return class_probabilities(self.fmodel.output(x), self.functional_samples(z, x), link)

    # ---- hyperparameters -------------------------------------------------------------
    def set_g_prior(
        self, method: str = "ggn", n_probes: int = 64, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Install the g-prior θ = S w, s_i = d_i^{-½} (docs/methods.md §4); returns s ``(d,)``.

        ``"ggn"``: d_i = M_ii, Hutchinson estimate mean_k (Gᵀε_k)_i², ε ~ N(0, I).
        ``"column_rms"`` (Gaussian): d_i = mean_j (A J)_ji², the observation-space column RMS².
        A floor of 1e-6·mean(d) keeps weights without curvature finite.
        """
        if n_probes < 1:
            raise ValueError(f"n_probes must be >= 1, got {n_probes}")
        self.prior.set_scale(None)
        system = self.system()
        with torch.no_grad():
            eps = torch.randn(
                n_probes,
                system.n_obs,
                generator=generator,
                dtype=system.dtype,
                device=system.device,
            )
            diag = (system.Gt(eps) ** 2).mean(0)
        if method == "column_rms":
            lik = self._gaussian("the column-RMS g-prior")
            diag = diag * lik.noise_var.to(diag.dtype) / system.n_obs
        elif method != "ggn":
            raise ValueError(f"unknown g-prior method {method!r}; use 'ggn' or 'column_rms'")
        diag = diag + 1e-6 * diag.mean().clamp_min(torch.finfo(diag.dtype).tiny)
        scale = diag.rsqrt()
        self.prior.set_scale(scale)
        return scale

    def log_marginal_likelihood(self, dense_AJ: torch.Tensor | None = None) -> torch.Tensor:
        """Exact log evidence (Gaussian; small problems), differentiable in the hyperparameters.

        log N(ỹ; 0, A J Σ Jᵀ A ᵀ + σ² I) with ỹ = y − A f* + A J θ*, assembled in float64.
        ``dense_AJ`` ``(n_obs, d)`` may be passed to reuse the dense Jacobian (see
        :meth:`dense_observation_jacobian`).
        """
        lik = self._gaussian("the exact marginal likelihood")
        AJ = self.dense_observation_jacobian() if dense_AJ is None else dense_AJ
        with torch.no_grad():
            pred = lik.observe(self.fmodel.output(self.inputs)).reshape(-1).double()
            ytil = self.targets.reshape(-1).double() - pred + AJ @ self.theta_star().double()
        K = AJ @ self.prior.cov_mv(AJ).T + lik.noise_var.double() * torch.eye(
            AJ.shape[0], dtype=torch.float64, device=AJ.device
        )
        C, _ = robust_cholesky(K)
        a = torch.cholesky_solve(ytil[:, None], C)[:, 0]
        n = ytil.numel()
        return -0.5 * (ytil @ a) - C.diagonal().log().sum() - 0.5 * n * math.log(2 * math.pi)

    def dense_observation_jacobian(self) -> torch.Tensor:
        """Dense A J ``(n_obs, d)`` in float64 (small references only)."""
        lik = self._gaussian("the dense observation Jacobian")
        with torch.no_grad():
            return self.system().dense_G() * lik.noise_var.double().sqrt()

    def fit_hyperparameters(self, **kwargs):
        """Sample-based EM (docs/methods.md §3); see :func:`dip_uq.laplace.em.fit_em` for options."""
        from .em import fit_em

        return fit_em(self, **kwargs)

    # ---- state -----------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        return {
            "names": list(self.selection.names),
            "d": self.d,
            "blocks": list(self.selection.block_names),
        }

    def set_extra_state(self, state: dict) -> None:
        if state.get("names") != list(self.selection.names) or state.get("d") != self.d:
            raise ValueError(
                f"state_dict was saved for a different parameter selection (d={state.get('d')}, "
                f"{len(state.get('names', []))} tensors); this object has d={self.d}, {len(self.selection.names)} tensors"
            )
        if state.get("blocks") != list(self.selection.block_names):
            raise ValueError(
                f"state_dict blocks {state.get('blocks')} differ from {self.selection.block_names}"
            )

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        scale = state_dict.get("prior.scale")
        if scale is not None and self.prior.scale is None:
            self.prior.scale = torch.ones_like(scale)
        if scale is None and self.prior.scale is not None:
            self.prior.scale = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

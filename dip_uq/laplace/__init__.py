"""Model-agnostic linearised Laplace engine (docs/methods.md §1-4, §7).

Knows nothing about CT or U-Nets: it takes a torch model, a parameter selection, an
observation model (Gaussian with an optional linear operator, or categorical) and a
block-diagonal prior, and works only through Jacobian-vector products.

Typical use (the DIP: one fixed input ``z0``, image ``net(z0)`` of shape (1, 1, H, W), a
matched operator ``A`` with ``A(x)``/``A.T(y)``, measurements ``y`` of shape ``A(net(z0))``)::

    la = LinearisedLaplace(net, Gaussian(noise_var, operator=A), z0, y,
                           params="conv_weights", blocks=lambda name: name.split(".")[0],
                           prior="matern")
    opts = {"precond": "lowrank"}      # sgd: see below
    history = la.fit_hyperparameters(n_cycles=10, n_samples=64, solver="sgd", solver_opts=opts)
    std_map = la.functional_variance(n_samples=256, solver="sgd", **opts).sqrt()  # (1,1,H,W)

Solvers: ``exact`` (dense, small), ``cg`` and ``sdd`` (observation space, need a matched
adjoint), ``sgd`` (primal sample-then-optimise). All share one noise convention, so the same
:class:`Noise` gives the same samples from every solver. DIP Jacobians have condition
numbers κ ~ 1e4-1e6, which plain ``sgd`` (``precond=None``, the methods' algorithm)
crosses only in thousands of steps; the default ``precond="auto"`` (a rank-200 Ritz
preconditioner, :mod:`~dip_uq.laplace.solvers.precond`, for full batches; plain sgd under
minibatches) takes it to a handful.
"""

from .front import Laplace
from .jacobian import FunctionalModel
from .likelihoods import Categorical, Gaussian
from .params import NORM_LAYERS, ParameterSelection, all_weights, conv_weights
from .posterior import LinearisedLaplace
from .priors import BlockPrior, matern_correlation
from .solvers import LinearSystem, Noise, SolverResult, draw_noise, get_solver
from .stats import SampleBank, Welford

__all__ = [
    "BlockPrior",
    "Categorical",
    "FunctionalModel",
    "Gaussian",
    "Laplace",
    "LinearSystem",
    "LinearisedLaplace",
    "NORM_LAYERS",
    "Noise",
    "ParameterSelection",
    "SampleBank",
    "SolverResult",
    "Welford",
    "all_weights",
    "conv_weights",
    "draw_noise",
    "get_solver",
    "matern_correlation",
]

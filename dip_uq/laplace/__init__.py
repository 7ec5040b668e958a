"""Model-agnostic linearised Laplace engine (methods §1-4, §7).

Knows nothing about CT or U-Nets: it takes a torch model, a parameter selection, an
observation model (Gaussian with an optional linear operator, or categorical) and a
block-diagonal prior, and works only through Jacobian-vector products.
"""

from .jacobian import FunctionalModel
from .likelihoods import Categorical, Gaussian, check_operator
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
    "LinearSystem",
    "LinearisedLaplace",
    "NORM_LAYERS",
    "Noise",
    "ParameterSelection",
    "SampleBank",
    "SolverResult",
    "Welford",
    "all_weights",
    "check_operator",
    "conv_weights",
    "draw_noise",
    "get_solver",
    "matern_correlation",
]

"""Small reference problems shared by the Laplace engine tests (no tests here).

(a) Bayesian linear regression (one linear layer, d = 50); (b) a small MLP regression;
(c) a small CNN whose image passes through a dense matrix operator (CT-like, d ≈ 5k,
d_y = 200); (d) a small softmax classifier. All float64.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dip_uq.laplace import Categorical, Gaussian, LinearisedLaplace


class MatrixOperator:
    """Dense matrix acting on the trailing ``in_shape`` dims: (..., *in_shape) -> (..., m)."""

    matched = True

    def __init__(self, matrix: torch.Tensor, in_shape: tuple[int, ...]) -> None:
        self.matrix, self.in_shape = matrix, tuple(in_shape)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[: x.dim() - len(self.in_shape)]
        return (x.reshape(*lead, -1) @ self.matrix.T.to(x.dtype)).reshape(
            *lead, self.matrix.shape[0]
        )

    @property
    def T(self):  # noqa: N802
        op = self

        class _Adj:
            def __call__(self, y):
                lead = y.shape[:-1]
                return (y @ op.matrix.to(y.dtype)).reshape(*lead, *op.in_shape)

        return _Adj()


def blr(n: int = 200, p: int = 49, noise: float = 0.3, seed: int = 0, **kw) -> LinearisedLaplace:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g, dtype=torch.float64)
    w = 0.5 * torch.randn(p, 1, generator=g, dtype=torch.float64)
    y = X @ w + noise * torch.randn(n, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    model = nn.Linear(p, 1).double()
    kw.setdefault("blocks", "single")
    return LinearisedLaplace(model, Gaussian(kw.pop("noise_var", 0.1)), X, y, **kw)


def mlp(n: int = 40, seed: int = 0, **kw) -> LinearisedLaplace:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).double()
    with torch.no_grad():
        y = model(X) + 0.1 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    return LinearisedLaplace(model, Gaussian(kw.pop("noise_var", 0.05)), X, y, **kw)


def cnn_model(channels: int = 16, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    c = channels
    return nn.Sequential(
        nn.Conv2d(1, c, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(c, c, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(c, c, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(c, 1, 3, padding=1),
    ).double()


def ct_like(
    side: int = 16, n_meas: int = 200, channels: int = 16, noise: float = 0.05, seed: int = 0, **kw
) -> LinearisedLaplace:
    """CNN image (1, 1, side, side) through a dense 200 × side² operator; conv weights only."""
    g = torch.Generator().manual_seed(seed)
    model = cnn_model(channels, seed)
    z0 = torch.randn(1, 1, side, side, generator=g, dtype=torch.float64)
    op = MatrixOperator(
        torch.randn(n_meas, side * side, generator=g, dtype=torch.float64) / side, (1, side, side)
    )
    with torch.no_grad():
        y = op(model(z0)) + noise * torch.randn(1, n_meas, generator=g, dtype=torch.float64)
    kw.setdefault("params", "conv_weights")
    return LinearisedLaplace(
        model, Gaussian(kw.pop("noise_var", noise**2), operator=op), z0, y, **kw
    )


def classifier(n: int = 30, classes: int = 3, seed: int = 0, **kw) -> LinearisedLaplace:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 4, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, classes)).double()
    y = torch.randint(0, classes, (n,), generator=g)
    return LinearisedLaplace(model, Categorical(), X, y, **kw)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These problems are tiny: intra-op threads only add OpenMP contention on shared cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

"""Jacobian products of a network with respect to selected parameters, via ``torch.func``.

``J = ∂f(x; θ)/∂θ`` at the linearisation point θ*. The engine only ever uses
``J v`` (forward mode, K directions at once) and ``Jᵀ u`` (reverse mode, K cotangents at
once); the dense Jacobian exists for small references and tests.

The model is a private deep copy in eval mode (BatchNorm uses running statistics; dropout is
off). Unselected parameters and buffers are frozen, so normalisation tangents are zero.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from torch.func import functional_call, jvp, vjp, vmap

from .params import ParameterSelection

__all__ = ["FunctionalModel"]

_STOCHASTIC = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


class FunctionalModel(nn.Module):
    """``f(x; θ)`` as a function of the flat selected parameters θ ``(d,)``.

    Args:
        model: the trained network; it is copied, put in eval mode and never mutated.
        selection: which parameters θ are (see :class:`ParameterSelection`); built on the copy
            from ``include``/``blocks`` when not given.
        chunk_size: optional ``vmap`` chunk size bounding memory for many directions.
    """

    def __init__(
        self,
        model: nn.Module,
        include="default",
        blocks="layer",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if model.training and any(isinstance(m, _STOCHASTIC) for m in model.modules()):
            warnings.warn(
                "the model is in train mode and has BatchNorm/dropout layers: the engine "
                "linearises a copy in eval mode (BatchNorm running statistics, no dropout)",
                stacklevel=3,
            )
        self.net = copy.deepcopy(model).eval()
        self.selection = ParameterSelection(self.net, include, blocks)  # sees requires_grad
        self.net.requires_grad_(False)
        self.chunk_size = chunk_size

    @property
    def d(self) -> int:
        return self.selection.d

    def theta_star(self) -> torch.Tensor:
        """The linearisation point θ*, shape ``(d,)`` (a copy)."""
        return self.selection.flatten(self.net).detach().clone()

    def forward(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``f(x; θ)`` with the selected parameters replaced by ``theta`` ``(d,)``."""
        params = {**dict(self.net.named_parameters()), **dict(self.net.named_buffers())}
        params.update(self.selection.unflatten(theta))
        return functional_call(self.net, params, (x,))

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """``f(x; θ*)`` without gradients."""
        with torch.no_grad():
            return self.net(x)

    def jvp(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``J(x) v`` for directions ``v`` ``(K, d)`` -> ``(K, *f(x).shape)``."""
        if v.dim() != 2 or v.shape[1] != self.d:
            raise ValueError(f"jvp directions: expected shape (K, {self.d}), got {tuple(v.shape)}")
        theta = self.theta_star().to(v.dtype)

        def one(t: torch.Tensor) -> torch.Tensor:
            return jvp(lambda th: self(th, x), (theta,), (t,))[1]

        return vmap(one, chunk_size=self.chunk_size)(v)

    def vjp(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``J(x)ᵀ u`` for cotangents ``u`` ``(K, *f(x).shape)`` -> ``(K, d)``."""
        theta = self.theta_star().to(u.dtype)
        out, fn = vjp(lambda th: self(th, x), theta)
        if tuple(u.shape[1:]) != tuple(out.shape):
            raise ValueError(
                f"vjp cotangents: expected shape (K, {tuple(out.shape)}), got {tuple(u.shape)}"
            )
        return vmap(lambda c: fn(c)[0], chunk_size=self.chunk_size)(u)

    def dense_jacobian(self, x: torch.Tensor) -> torch.Tensor:
        """The dense ``J(x)`` of shape ``(f(x).numel(), d)``: small references only."""
        theta = self.theta_star()
        jac = torch.func.jacrev(lambda th: self(th, x).reshape(-1))(theta)
        return jac

"""Parameter selection: which weights are linearised and put under the prior.

A :class:`ParameterSelection` picks named parameters of a model by a predicate, orders them,
and maps between the flat vector ``theta`` (shape ``(..., d)``) and named tensors
(``{name: (..., *shape)}``). Every selected parameter belongs to one named *block*; each block
carries its own prior hyperparameters. Everything not selected stays frozen at its value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "NORM_LAYERS",
    "ParamSpec",
    "ParameterSelection",
    "all_weights",
    "conv_weights",
]

#: Normalisation layers whose affine parameters are excluded by default (docs/methods.md §5).
NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*d and InstanceNorm*d
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

Predicate = Callable[[str, nn.Parameter, nn.Module], bool]
BlockFn = Callable[[str], str]


def all_weights(name: str, param: nn.Parameter, module: nn.Module) -> bool:
    """Default predicate: every trainable parameter except normalisation-layer affine ones."""
    return param.requires_grad and not isinstance(module, NORM_LAYERS)


def conv_weights(name: str, param: nn.Parameter, module: nn.Module) -> bool:
    """Convolution kernels only (the linearised DIP's choice); biases stay frozen."""
    return (
        param.requires_grad
        and isinstance(module, nn.modules.conv._ConvNd)
        and name.rsplit(".", 1)[-1] == "weight"
    )


_PREDICATES: dict[str, Predicate] = {
    "all": all_weights,
    "default": all_weights,
    "conv_weights": conv_weights,
}


@dataclass(frozen=True)
class ParamSpec:
    """One selected parameter: its slice ``[offset, offset + numel)`` of the flat vector.

    ``kernel`` is the spatial kernel shape for convolution weights (``(k, k)`` or ``(k, k, k)``),
    else ``()``; ``n_filters`` = out·in channels (number of independent filters).
    """

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int
    block: str
    kernel: tuple[int, ...]

    @property
    def n_filters(self) -> int:
        taps = 1
        for k in self.kernel:
            taps *= k
        return self.numel // taps if self.kernel else self.numel


def _block_by_layer(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


class ParameterSelection:
    """Selected parameters of ``model`` with their flat layout and blocks.

    Args:
        model: the network (never modified).
        include: ``"all"``/``"default"`` (trainable, norm-layer affine excluded),
            ``"conv_weights"``, or a predicate ``(name, param, owning_module) -> bool``.
        blocks: ``"layer"`` (one block per owning module, the default), ``"single"``
            (one block ``"all"``), or a callable mapping a parameter name to a block name
            (e.g. a module-name prefix such as ``"down.0"``).

    Raises:
        ValueError: when nothing is selected or ``include``/``blocks`` is unknown.
    """

    def __init__(
        self,
        model: nn.Module,
        include: str | Predicate = "default",
        blocks: str | BlockFn = "layer",
    ) -> None:
        if isinstance(include, str):
            if include not in _PREDICATES:
                raise ValueError(
                    f"unknown parameter selection {include!r}; use one of {sorted(_PREDICATES)} or a callable"
                )
            include = _PREDICATES[include]
        if isinstance(blocks, str):
            if blocks == "layer":
                block_fn: BlockFn = _block_by_layer
            elif blocks == "single":
                block_fn = lambda name: "all"  # noqa: E731
            else:
                raise ValueError(
                    f"unknown blocks {blocks!r}; use 'layer', 'single' or a callable name -> block"
                )
        else:
            block_fn = blocks

        specs: list[ParamSpec] = []
        offset = 0
        for mod_name, module in model.named_modules():
            for p_name, param in module.named_parameters(recurse=False):
                name = f"{mod_name}.{p_name}" if mod_name else p_name
                if not include(name, param, module):
                    continue
                kernel: tuple[int, ...] = ()
                if isinstance(module, nn.modules.conv._ConvNd) and p_name == "weight":
                    kernel = tuple(param.shape[2:])
                block = str(block_fn(name))
                specs.append(
                    ParamSpec(name, tuple(param.shape), offset, param.numel(), block, kernel)
                )
                offset += param.numel()
        if not specs:
            raise ValueError(
                "the parameter selection is empty: the predicate matched no trainable parameter"
            )
        self.specs: list[ParamSpec] = specs
        self.d: int = offset
        self.names: list[str] = [s.name for s in specs]
        self.block_names: list[str] = list(dict.fromkeys(s.block for s in specs))
        ids = {b: i for i, b in enumerate(self.block_names)}
        self.block_of_param: list[int] = [ids[s.block] for s in specs]
        index = torch.empty(self.d, dtype=torch.long)
        for s, b in zip(specs, self.block_of_param):
            index[s.offset : s.offset + s.numel] = b
        #: block id of every coordinate of the flat vector, shape ``(d,)``
        self.block_index: torch.Tensor = index

    @property
    def n_blocks(self) -> int:
        return len(self.block_names)

    def block_sizes(self) -> torch.Tensor:
        """Number of coordinates in each block, shape ``(n_blocks,)``."""
        return torch.bincount(self.block_index, minlength=self.n_blocks)

    def flatten(self, tensors: dict[str, torch.Tensor] | nn.Module) -> torch.Tensor:
        """Named tensors ``{name: (..., *shape)}`` (or a model's parameters) -> ``(..., d)``."""
        if isinstance(tensors, nn.Module):
            tensors = dict(tensors.named_parameters())
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise KeyError(f"missing selected parameters: {missing[:5]}")
        parts = []
        for s in self.specs:
            t = tensors[s.name]
            batch = t.shape[: t.dim() - len(s.shape)]
            if tuple(t.shape[len(batch) :]) != s.shape:
                raise ValueError(
                    f"parameter {s.name}: expected trailing shape {s.shape}, got {tuple(t.shape)}"
                )
            parts.append(t.reshape(*batch, s.numel))
        return torch.cat(parts, dim=-1)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(..., d)`` -> ``{name: (..., *shape)}`` (views, no copies)."""
        if flat.shape[-1] != self.d:
            raise ValueError(
                f"flat parameter vector: expected last dim {self.d}, got {tuple(flat.shape)}"
            )
        batch = flat.shape[:-1]
        return {
            s.name: flat[..., s.offset : s.offset + s.numel].reshape(*batch, *s.shape)
            for s in self.specs
        }

    def block_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum ``(..., d)`` coordinates per block -> ``(..., n_blocks)``."""
        out = values.new_zeros(*values.shape[:-1], self.n_blocks)
        return out.index_add(-1, self.block_index.to(values.device), values)


def last_layer_predicate(model: nn.Module) -> Callable:
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

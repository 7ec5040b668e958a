"""Block-diagonal Gaussian priors θ ~ N(0, Σ) over the selected parameters (docs/methods.md §4).

Per block b (hyperparameters in log space, differentiable):
- ``"normal"``: Σ_b = σ_b² I.
- ``"matern"``: every k×k (or k×k×k) convolution filter is i.i.d. N(0, Σ_b) with
  (Σ_b)_pq = σ_b² exp(−‖r_p − r_q‖/ℓ_b) + 1e-6 δ_pq over tap coordinates r; parameters of
  the block that are not such filters (1×1 convs, linear layers, biases) get σ_b² I.
- g-prior: θ = S w with S = diag(s) fixed (see :func:`g_prior_scale`), w ~ N(0, Σ_w), so
  Σ_θ = S Σ_w S.

Products act on flat vectors ``(..., d)``: Σv, Lv and Lᵀv (Σ = L Lᵀ, L block Cholesky),
Σ⁻¹v, L⁻¹v, and log|Σ|.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .params import ParameterSelection

__all__ = ["BlockPrior", "matern_correlation"]

MATERN_JITTER = 1e-6
MIN_LOG_VAR_MATERN = -6.9


def matern_correlation(kernel: tuple[int, ...], lengthscale: torch.Tensor) -> torch.Tensor:
    """exp(−‖r_p − r_q‖/ℓ) over the tap grid of ``kernel`` (row-major taps), ``(T, T)``."""
    grids = torch.meshgrid(
        *[torch.arange(k, dtype=lengthscale.dtype, device=lengthscale.device) for k in kernel],
        indexing="ij",
    )
    r = torch.stack([g.reshape(-1) for g in grids], dim=-1)
    dist = torch.cdist(r, r)
    return torch.exp(-dist / lengthscale)


class BlockPrior(nn.Module):
    """Block-diagonal Gaussian prior, one hyperparameter set per block of ``selection``.

    Args:
        selection: the parameter selection (defines blocks and filter shapes).
        kind: ``"normal"``, ``"matern"`` or a callable ``block name -> kind``.
        variance: initial σ_b² (> 0), scalar.
        lengthscale: initial ℓ_b (> 0) for Matérn blocks.
    """

    def __init__(
        self,
        selection: ParameterSelection,
        kind: str | Callable[[str], str] = "normal",
        variance: float = 1.0,
        lengthscale: float = 0.1,
    ) -> None:
        super().__init__()
        if not (variance > 0 and math.isfinite(variance)):
            raise ValueError(f"prior variance must be positive and finite, got {variance}")
        if not (lengthscale > 0 and math.isfinite(lengthscale)):
            raise ValueError(f"prior lengthscale must be positive and finite, got {lengthscale}")
        kind_fn = (lambda b: kind) if isinstance(kind, str) else kind
        self.selection = selection
        self.kinds = [kind_fn(b) for b in selection.block_names]
        for b, k in zip(selection.block_names, self.kinds):
            if k not in ("normal", "matern"):
                raise ValueError(
                    f"block {b!r}: unknown prior kind {k!r} (use 'normal' or 'matern')"
                )
        nb = selection.n_blocks
        self.log_variance = nn.Parameter(torch.full((nb,), math.log(variance), dtype=torch.float64))
        self.log_lengthscale = nn.Parameter(
            torch.full((nb,), math.log(lengthscale), dtype=torch.float64)
        )
        # coordinates with a diagonal prior; Matérn filters are handled per parameter
        self._filters: list[
            tuple[int, int, int, tuple[int, ...], int]
        ] = []  # offset, numel, n_filt, kernel, block
        diag = torch.ones(selection.d, dtype=torch.bool)
        for spec, b in zip(selection.specs, selection.block_of_param):
            taps = math.prod(spec.kernel) if spec.kernel else 1
            if self.kinds[b] == "matern" and len(spec.kernel) in (2, 3) and taps > 1:
                self._filters.append((spec.offset, spec.numel, spec.n_filters, spec.kernel, b))
                diag[spec.offset : spec.offset + spec.numel] = False
        self.register_buffer("diag_mask", diag, persistent=False)
        self.register_buffer("scale", None)  # g-prior s (d,), or None

    # ---- hyperparameters -------------------------------------------------------------
    def variances(self) -> torch.Tensor:
        """σ_b² per block ``(n_blocks,)`` (Matérn blocks clamped at exp(−6.9))."""
        lv = self.log_variance
        is_m = torch.tensor([k == "matern" for k in self.kinds], device=lv.device)
        lv = torch.where(is_m, lv.clamp(min=MIN_LOG_VAR_MATERN), lv)
        return lv.exp()

    def lengthscales(self) -> torch.Tensor:
        return self.log_lengthscale.exp()

    def set_variances(self, var: torch.Tensor | float) -> None:
        """Set σ_b² (scalar or per block); must be positive and finite."""
        var = torch.as_tensor(var, dtype=self.log_variance.dtype, device=self.log_variance.device)
        if not torch.all(torch.isfinite(var) & (var > 0)):
            raise ValueError(f"prior variances must be positive and finite, got {var}")
        with torch.no_grad():
            self.log_variance.copy_(var.log().expand_as(self.log_variance))

    def set_scale(self, scale: torch.Tensor | None) -> None:
        """Install a g-prior scaling s ``(d,)`` (θ = S w), or remove it with ``None``."""
        if scale is not None:
            if scale.shape != (self.selection.d,):
                raise ValueError(
                    f"g-prior scale: expected shape ({self.selection.d},), got {tuple(scale.shape)}"
                )
            if not torch.all(torch.isfinite(scale) & (scale > 0)):
                raise ValueError("g-prior scale must be positive and finite")
            scale = scale.detach().to(self.log_variance.device)
        self.scale = scale

    def _coord_var(self, dtype: torch.dtype) -> torch.Tensor:
        return self.variances().to(dtype)[self.selection.block_index.to(self.log_variance.device)]

    def _filter_chol(self, b: int, kernel: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        corr = matern_correlation(kernel, self.lengthscales()[b].to(dtype))
        cov = self.variances()[b].to(dtype) * corr + MATERN_JITTER * torch.eye(
            corr.shape[0], dtype=dtype, device=corr.device
        )
        return torch.linalg.cholesky(cov)

    # ---- products with Σ_w (before g-prior scaling) ----------------------------------
    def _product(self, v: torch.Tensor, diag_fn, filt_fn) -> torch.Tensor:
        if v.shape[-1] != self.selection.d:
            raise ValueError(
                f"prior product: expected last dim {self.selection.d}, got {tuple(v.shape)}"
            )
        var = self._coord_var(v.dtype)
        # the diagonal rule everywhere, then the Matérn filter slices overwritten: one output
        # buffer plus one slice at a time (K × d buffers dominate memory for large nets)
        out = diag_fn(v, var)
        if not self._filters:
            return out
        if out.requires_grad or v.requires_grad:  # keep autograd free of in-place writes
            out = torch.where(self.diag_mask, out, out.new_zeros(()))
            pieces = []
            for off, numel, nf, kernel, b in self._filters:
                L = self._filter_chol(b, kernel, v.dtype)
                x = v[..., off : off + numel].reshape(*v.shape[:-1], nf, L.shape[0])
                pieces.append((off, numel, filt_fn(x, L).reshape(*v.shape[:-1], numel)))
            out = out.clone()
            for off, numel, piece in pieces:
                out[..., off : off + numel] = piece
            return out
        for off, numel, nf, kernel, b in self._filters:
            L = self._filter_chol(b, kernel, v.dtype)
            x = v[..., off : off + numel].reshape(*v.shape[:-1], nf, L.shape[0])
            out[..., off : off + numel] = filt_fn(x, L).reshape(*v.shape[:-1], numel)
        return out

    def _w_cov(self, v):
        return self._product(v, lambda x, var: x * var, lambda x, L: (x @ L) @ L.mT)

    def _w_sqrt(self, v):  # L v (filters stored as rows: x Lᵀ)
        return self._product(v, lambda x, var: x * var.sqrt(), lambda x, L: x @ L.mT)

    def _w_sqrt_t(self, v):  # Lᵀ v
        return self._product(v, lambda x, var: x * var.sqrt(), lambda x, L: x @ L)

    def _w_prec(self, v):
        return self._product(
            v, lambda x, var: x / var, lambda x, L: torch.cholesky_solve(x.mT, L).mT
        )

    def _w_sqrt_inv(self, v):  # L⁻¹ v
        return self._product(
            v,
            lambda x, var: x / var.sqrt(),
            lambda x, L: torch.linalg.solve_triangular(L, x.mT, upper=False).mT,
        )

    def _s(self, v: torch.Tensor) -> torch.Tensor | None:
        return None if self.scale is None else self.scale.to(v.dtype)

    # ---- public products with Σ_θ = S Σ_w S ------------------------------------------
    def cov_mv(self, v: torch.Tensor) -> torch.Tensor:
        """Σ v for ``v`` ``(..., d)``."""
        s = self._s(v)
        return self._w_cov(v) if s is None else s * self._w_cov(s * v)

    def sqrt_mv(self, v: torch.Tensor) -> torch.Tensor:
        """L v with Σ = L Lᵀ (so L ξ ~ N(0, Σ) for ξ ~ N(0, I))."""
        s = self._s(v)
        return self._w_sqrt(v) if s is None else s * self._w_sqrt(v)

    def sqrt_t_mv(self, v: torch.Tensor) -> torch.Tensor:
        """Lᵀ v."""
        s = self._s(v)
        return self._w_sqrt_t(v) if s is None else self._w_sqrt_t(s * v)

    def prec_mv(self, v: torch.Tensor) -> torch.Tensor:
        """Σ⁻¹ v."""
        s = self._s(v)
        return self._w_prec(v) if s is None else self._w_prec(v / s) / s

    def sqrt_inv_mv(self, v: torch.Tensor) -> torch.Tensor:
        """L⁻¹ v."""
        s = self._s(v)
        return self._w_sqrt_inv(v) if s is None else self._w_sqrt_inv(v / s)

    def logdet(self) -> torch.Tensor:
        """log|Σ_θ| (differentiable in the hyperparameters)."""
        dtype = self.log_variance.dtype
        var = self._coord_var(dtype)
        total = var.log()[self.diag_mask].sum()
        for _off, _numel, nf, kernel, b in self._filters:
            L = self._filter_chol(b, kernel, dtype)
            total = total + nf * 2 * L.diagonal().log().sum()
        if self.scale is not None:
            total = total + 2 * self.scale.to(dtype).log().sum()
        return total

    def sample(self, n: int, generator: torch.Generator | None = None, dtype=None) -> torch.Tensor:
        """``n`` prior draws ``(n, d)``."""
        dtype = dtype or self.log_variance.dtype
        xi = torch.randn(
            n, self.selection.d, generator=generator, dtype=dtype, device=self.log_variance.device
        )
        return self.sqrt_mv(xi)

    def block_quadratic(self, v: torch.Tensor) -> torch.Tensor:
        """Per-block v_bᵀ Σ_b⁻¹ v_b, shape ``(..., n_blocks)``."""
        return self.selection.block_sum(v * self.prec_mv(v))

    def second_moments(self, v: torch.Tensor) -> dict:
        """Sufficient statistics of v ``(K, d)`` for :meth:`quadratic_from_moments` (no
        gradient): per block mean_k Σ_{i diagonal} w_i², and per Matérn filter stack the tap
        matrix mean_k Σ_f w_f w_fᵀ ``(T, T)``, with w = v / s under a g-prior. A few numbers
        per block instead of K × d: the lengthscale M-step then costs nothing in memory."""
        with torch.no_grad():
            w = v if self.scale is None else v / self.scale.to(v.dtype)
            dt = self.log_variance.dtype
            sq = torch.where(self.diag_mask, w.square(), w.new_zeros(()))
            diag = self.selection.block_sum(sq).mean(0).to(dt)
            filt = []
            for off, numel, nf, _kernel, _b in self._filters:
                x = w[:, off : off + numel].reshape(w.shape[0] * nf, -1).to(dt)
                filt.append(x.T @ x / w.shape[0])
        return {"diag": diag, "filters": filt}

    def quadratic_from_moments(self, m: dict) -> torch.Tensor:
        """Per-block mean_k v_k,bᵀ Σ_b⁻¹ v_k,b ``(n_blocks,)`` from :meth:`second_moments`
        (differentiable in the hyperparameters): Σ diag w²/σ_b² + Σ_filters tr(Σ_b⁻¹ S)."""
        dt = self.log_variance.dtype
        q = m["diag"] / self.variances().to(dt)
        parts = [q]
        for (_off, _numel, _nf, kernel, b), S in zip(self._filters, m["filters"]):
            L = self._filter_chol(b, kernel, dt)
            tr = torch.cholesky_solve(S, L).diagonal().sum()
            one = torch.tensor([b], device=q.device)
            parts.append(torch.zeros_like(q).index_put((one,), tr.reshape(1)))
        return torch.stack(parts).sum(0)

    def dense_cov(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Dense Σ ``(d, d)``: small references only."""
        eye = torch.eye(self.selection.d, dtype=dtype, device=self.log_variance.device)
        return self.cov_mv(eye)

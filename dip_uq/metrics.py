"""Image quality and uncertainty-calibration metrics, shared by the CT pipeline and the
general regression/classification front door (the CT predictive's full evaluation, with the
truncated-SVD references, is :mod:`dip_uq.uq.evaluation`).

All functions take torch tensors (NumPy arrays are converted) and return Python floats or
small tensors. Images may be 2D ``(H, W)`` or 3D ``(D, H, W)``; leading dims are flattened
where the metric is voxelwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "psnr",
    "ssim",
    "gaussian_nll",
    "exact_test_log_likelihood",
    "patch_log_likelihood",
    "coverage",
    "calibration_curve",
    "zscore_stats",
    "std_error_correlation",
    "sparsification_curves",
    "ause",
    "rmse",
    "classification_nll",
    "accuracy",
    "expected_calibration_error",
    "brier_score",
]

_LOG_2PI = math.log(2 * math.pi)


def _t(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x)


def _same_shape(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")


# ----------------------------------------------------------------------------- images
def psnr(x, ref, *, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio ``10 log10(R^2 / mean((x - ref)^2))`` in dB, with ``R`` the
    data range of the reference (``max - min``) unless given."""
    x, ref = _t(x).double(), _t(ref).double()
    _same_shape(x, ref, "psnr")
    r = float(ref.max() - ref.min()) if data_range is None else float(data_range)
    mse = float(((x - ref) ** 2).mean())
    if mse == 0:
        return math.inf
    return 10 * math.log10(r * r / mse)


def _gauss_window(size: int, sigma: float, dtype: torch.dtype) -> torch.Tensor:
    g = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(g**2) / (2 * sigma**2))
    return g / g.sum()


def _blur(img: torch.Tensor, win: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' Gaussian filter of a (1, 1, *spatial) tensor along every axis."""
    nd = img.ndim - 2
    conv = F.conv2d if nd == 2 else F.conv3d
    for axis in range(nd):
        shape = [1, 1] + [1] * nd
        shape[2 + axis] = win.numel()
        img = conv(img, win.reshape(shape))
    return img


def ssim(
    x, ref, *, data_range: float | None = None, win_size: int = 11, sigma: float = 1.5
) -> float:
    """Structural similarity (Wang et al. 2004) with a Gaussian window, 2D or 3D, mean over
    valid window positions. ``data_range`` defaults to the reference's ``max - min``."""
    x, ref = _t(x).double(), _t(ref).double()
    _same_shape(x, ref, "ssim")
    if x.ndim not in (2, 3):
        raise ValueError(f"ssim expects a 2D or 3D image, got shape {tuple(x.shape)}")
    win_size = min(win_size, *x.shape)
    if win_size % 2 == 0:
        win_size -= 1
    r = float(ref.max() - ref.min()) if data_range is None else float(data_range)
    c1, c2 = (0.01 * r) ** 2, (0.03 * r) ** 2
    w = _gauss_window(win_size, sigma, torch.float64)
    a, b = x[None, None], ref[None, None]
    mu_a, mu_b = _blur(a, w), _blur(b, w)
    saa = _blur(a * a, w) - mu_a**2
    sbb = _blur(b * b, w) - mu_b**2
    sab = _blur(a * b, w) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * sab + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2)
    return float((num / den).mean())


# ----------------------------------------------------------------------------- Gaussian scores
def gaussian_nll(y, mean, var) -> float:
    """Mean negative log density of independent Gaussians ``N(y; mean, var)`` (nats/entry)."""
    y, mean, var = _t(y).double(), _t(mean).double(), _t(var).double()
    var = var.expand_as(y) if var.numel() == 1 else var
    _same_shape(y, mean, "gaussian_nll")
    if (var <= 0).any():
        raise ValueError("gaussian_nll: variances must be positive")
    return float(0.5 * (_LOG_2PI + var.log() + (y - mean) ** 2 / var).mean())


def exact_test_log_likelihood(x_true, mean, cov, *, delta: float = 0.0) -> float:
    """``log N(x_true; mean, cov + delta I) / d`` with a dense ``(d, d)`` covariance (float64,
    Cholesky). ``delta`` is the backprojected-noise correction of the linearised-DIP papers."""
    x, m = _t(x_true).double().reshape(-1), _t(mean).double().reshape(-1)
    cov = _t(cov).double()
    d = x.numel()
    if cov.shape != (d, d):
        raise ValueError(f"covariance must be ({d}, {d}) for {d} voxels, got {tuple(cov.shape)}")
    c = cov + delta * torch.eye(d, dtype=torch.float64)
    dist = torch.distributions.MultivariateNormal(m, covariance_matrix=c)
    return float(dist.log_prob(x)) / d


def patch_log_likelihood(
    x_true,
    mean,
    samples,
    *,
    patch_size: int,
    shrinkage: float = 0.0,
    delta: float = 0.0,
    ndim: int | None = None,
) -> float:
    """Patchwise Gaussian test log-likelihood per voxel.

    The image is split into non-overlapping ``p^d`` patches (remainder cropped). In each patch
    the predictive is ``N(mean, S + delta I)``, ``S`` the covariance of the zero-mean
    ``samples`` (``(K, *shape)``: deviations from the mean, e.g. ``J z_k``) with off-diagonal
    entries multiplied by ``1 - shrinkage``. Returns the summed log density divided by the
    number of scored voxels. Use the same samples, patches and shrinkage for every method
    you compare.
    """
    x, m, s = _t(x_true).double(), _t(mean).double(), _t(samples).double()
    _same_shape(x, m, "patch_log_likelihood")
    if s.shape[1:] != x.shape:
        raise ValueError(f"samples must be (K, {tuple(x.shape)}), got {tuple(s.shape)}")
    nd = ndim or x.ndim
    if nd not in (2, 3) or x.ndim != nd:
        raise ValueError(f"expected a 2D or 3D image, got shape {tuple(x.shape)}")
    p = int(patch_size)
    if p < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    crop = tuple(slice(0, (n // p) * p) for n in x.shape)
    if any(c.stop == 0 for c in crop):
        raise ValueError(f"patch_size {p} exceeds the image shape {tuple(x.shape)}")
    err = (x - m)[crop]
    s = s[(slice(None), *crop)]

    def split(t: torch.Tensor) -> torch.Tensor:  # (..., *spatial) -> (..., n_patches, p^d)
        lead = t.shape[: t.ndim - nd]
        spatial = t.shape[t.ndim - nd :]
        shape = list(lead)
        for n in spatial:
            shape += [n // p, p]
        t = t.reshape(shape)
        k = len(lead)
        blocks = [k + 2 * i for i in range(nd)]
        inner = [k + 2 * i + 1 for i in range(nd)]
        t = t.permute(*range(k), *blocks, *inner)
        return t.reshape(*lead, -1, p**nd)

    e = split(err)  # (P, q)
    z = split(s)  # (K, P, q)
    k = z.shape[0]
    cov = torch.einsum("kpi,kpj->pij", z, z) / k
    q = cov.shape[-1]
    eye = torch.eye(q, dtype=torch.float64)
    cov = cov * (eye + (1 - shrinkage) * (1 - eye)) + delta * eye
    cov = cov + 1e-10 * cov.diagonal(dim1=-2, dim2=-1).mean() * eye  # rank <= K guard
    dist = torch.distributions.MultivariateNormal(torch.zeros_like(e), covariance_matrix=cov)
    return float(dist.log_prob(e).sum()) / e.numel()


# ----------------------------------------------------------------------------- calibration
def _std_normal_quantile(p: torch.Tensor) -> torch.Tensor:
    return math.sqrt(2) * torch.special.erfinv(2 * p - 1)


def coverage(
    x_true, mean, std, *, levels: Sequence[float] = (0.5, 0.9, 0.95)
) -> dict[float, float]:
    """Fraction of voxels inside the central ``level`` interval ``mean +- z std``."""
    x, m, s = _t(x_true).double(), _t(mean).double(), _t(std).double()
    _same_shape(x, m, "coverage")
    z = ((x - m).abs() / s.clamp_min(1e-300)).reshape(-1)
    out = {}
    for lev in levels:
        q = float(_std_normal_quantile(torch.tensor(0.5 + lev / 2, dtype=torch.float64)))
        out[float(lev)] = float((z <= q).double().mean())
    return out


def calibration_curve(
    x_true, mean, std, *, n_levels: int = 19
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected vs observed coverage of central Gaussian intervals at ``n_levels`` levels in
    (0, 1). A calibrated predictive lies on the diagonal."""
    levels = torch.linspace(0, 1, n_levels + 2, dtype=torch.float64)[1:-1]
    cov = coverage(x_true, mean, std, levels=levels.tolist())
    return levels, torch.tensor([cov[float(v)] for v in levels.tolist()], dtype=torch.float64)


def zscore_stats(x_true, mean, std) -> dict[str, float]:
    """Mean and standard deviation of ``(x - mean) / std`` (ideal: 0 and 1)."""
    z = (_t(x_true).double() - _t(mean).double()) / _t(std).double()
    return {"mean": float(z.mean()), "std": float(z.std())}


def std_error_correlation(x_true, mean, std) -> float:
    """Pearson correlation between the predicted std and the absolute error."""
    e = (_t(x_true).double() - _t(mean).double()).abs().reshape(-1)
    s = _t(std).double().reshape(-1)
    e, s = e - e.mean(), s - s.mean()
    den = float(e.norm() * s.norm())
    return float((e * s).sum()) / den if den > 0 else 0.0


def sparsification_curves(error, std, *, n_steps: int = 20) -> tuple[torch.Tensor, ...]:
    """Sparsification curves: RMSE of the voxels left after removing the fraction ``f`` with
    the largest std (``by_std``) or the largest error (``oracle``). Returns
    ``(fractions, by_std, oracle)``."""
    e = _t(error).double().abs().reshape(-1)
    s = _t(std).double().reshape(-1)
    n = e.numel()
    by_std = e[torch.argsort(s, descending=True)] ** 2
    oracle = torch.sort(e, descending=True).values ** 2
    fr = torch.linspace(0, 1, n_steps + 1, dtype=torch.float64)[:-1]
    curves = []
    for order in (by_std, oracle):
        rest = torch.flip(torch.cumsum(torch.flip(order, [0]), 0), [0])  # suffix sums
        vals = []
        for f in fr.tolist():
            k = min(int(round(f * n)), n - 1)
            vals.append(math.sqrt(float(rest[k]) / (n - k)))
        curves.append(torch.tensor(vals, dtype=torch.float64))
    return fr, curves[0], curves[1]


def ause(error, std, *, n_steps: int = 20) -> float:
    """Area under the sparsification error (std curve minus oracle curve), normalised by the
    full-image RMSE; 0 means the std ranks voxels exactly like the error."""
    fr, by_std, oracle = sparsification_curves(error, std, n_steps=n_steps)
    diff = (by_std - oracle) / by_std[0].clamp_min(1e-300)
    return float(diff.mean())


# ----------------------------------------------------------------------------- regression / classification
def rmse(y, mean) -> float:
    y, m = _t(y).double(), _t(mean).double()
    _same_shape(y, m, "rmse")
    return float(((y - m) ** 2).mean().sqrt())


def _check_probs(probs: torch.Tensor, labels: torch.Tensor) -> None:
    if probs.ndim != 2:
        raise ValueError(f"probs must be (N, classes), got {tuple(probs.shape)}")
    if labels.shape != probs.shape[:1]:
        raise ValueError(f"labels must be ({probs.shape[0]},), got {tuple(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= probs.shape[1]):
        raise ValueError(f"labels out of range [0, {probs.shape[1]})")


def classification_nll(probs, labels) -> float:
    """Mean negative log predictive probability of the true class."""
    p, y = _t(probs).double(), _t(labels).long()
    _check_probs(p, y)
    return float(-p.gather(1, y[:, None]).clamp_min(1e-300).log().mean())


def accuracy(probs, labels) -> float:
    p, y = _t(probs), _t(labels).long()
    _check_probs(p, y)
    return float((p.argmax(1) == y).double().mean())


def brier_score(probs, labels) -> float:
    """Mean over points of ``sum_c (p_c - 1[y = c])^2``."""
    p, y = _t(probs).double(), _t(labels).long()
    _check_probs(p, y)
    onehot = F.one_hot(y, p.shape[1]).double()
    return float(((p - onehot) ** 2).sum(1).mean())


def expected_calibration_error(probs, labels, *, n_bins: int = 15, adaptive: bool = False) -> float:
    """ECE: ``sum_b |B_b|/N |acc(B_b) - conf(B_b)|`` over confidence bins; equal-width bins, or
    equal-mass bins when ``adaptive``."""
    p, y = _t(probs).double(), _t(labels).long()
    _check_probs(p, y)
    conf, pred = p.max(1)
    correct = (pred == y).double()
    n = conf.numel()
    if adaptive:
        order = torch.argsort(conf)
        bins = torch.tensor_split(order, n_bins)
    else:
        edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
        idx = torch.bucketize(conf, edges[1:-1], right=True)
        bins = [torch.nonzero(idx == b).flatten() for b in range(n_bins)]
    total = 0.0
    for b in bins:
        if b.numel():
            total += b.numel() / n * abs(float(correct[b].mean() - conf[b].mean()))
    return total

"""``dip-uq demo``: a sparse-view fan-beam scan of a real CT slice, FBP vs deep image prior,
then the calibrated uncertainty map, checked against the ground truth.

The slice is pydicom's ``CT_small.dcm`` (128 x 128, 0.66 mm pixels; see
:func:`dip_uq.io.datasets.samples.sample_slice`), area-averaged to 64 x 64, in
``mu / (2 mu_water)`` units (air 0, water 0.5, dense bone about 1). A fan-beam scan with
``n_angles`` views over a full orbit is simulated with the torch projector (unit voxels),
white Gaussian noise of relative level ``noise`` is added (std = noise * mean|A x|), and the
scan goes through the **default call** ``reconstruct_with_uncertainty(y, A)``: 10 % of the
views held out, the DIP fitted (and stopped) on the others, the linearised posterior with
EM, the image-space noise term, and the variance scale fitted on the held-out views. It writes
``demo.png`` (truth, FBP, DIP, std), ``uncertainty.png`` (reconstruction, std, |error|,
calibration curve), ``metrics.json`` (the held-out views' scores and, against the truth,
coverage, z-scores, log-likelihoods), the maps (``.npz``/``.tif``) and ``demo.json``
(including the DIP's time and the uncertainty stage's). Measured figures:
``benchmarks/README.md``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["load_ct_slice", "run_demo"]


def load_ct_slice(*, size: int | None = None) -> torch.Tensor:
    """pydicom's real CT slice as a ``(H, W)`` float32 attenuation image in ``[0, ~1]``
    (``mu / (2 mu_water)``); ``size`` resamples it (area average) to ``size x size``."""
    from .io.datasets.samples import sample_slice

    return sample_slice("ct_small", size=size)


def run_demo(
    out_dir: str | os.PathLike,
    *,
    quick: bool = False,
    n_angles: int = 60,
    noise: float = 0.02,
    iterations: int | None = None,
    seed: int = 0,
    progress: bool = True,
    threads: int | None = None,
    uncertainty: bool = True,
) -> dict[str, Any]:
    """Simulate, reconstruct and write the demo's files to ``out_dir``.

    ``uncertainty=True`` (the default): the 64^2 slice through the default
    :func:`~dip_uq.reconstruct_with_uncertainty` (``iterations`` caps the DIP's budget).
    ``uncertainty=False``: FBP vs a plain DIP on the 128^2 slice (``iterations``, default
    1000). ``quick=True`` is a smoke test: 32^2, short DIP, one EM cycle, few samples.
    ``threads``: torch CPU threads during the run (restored after; ``None`` keeps torch's).

    Returns ``{"psnr_fbp", "psnr_dip", "ssim_fbp", "ssim_dip", "seconds", "ground_truth",
    "fbp", "operator", "y", "noise_std", "figure", ...}``; with ``uncertainty`` also ``"uq"``
    (the :class:`~dip_uq.UQResult`), ``"uq_metrics"``, ``"dip_seconds"``,
    ``"uq_stage_seconds"``, ``"uq_over_dip"``, the learned and true noise variance.
    """
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        return _run(out_dir, quick, n_angles, noise, iterations, seed, progress, uncertainty)
    finally:
        torch.set_num_threads(saved_threads)


def _run(out_dir, quick, n_angles, noise, iterations, seed, progress, uncertainty) -> dict:
    from operators import FanBeam2D, RayTransform, VolumeGeometry
    from operators.analytic import fbp
    from operators.noise import add_gaussian_noise

    from .io.atomic import atomic_write_text
    from .metrics import psnr, ssim

    t0 = time.perf_counter()
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    size = 32 if quick else (64 if uncertainty else 128)
    x = load_ct_slice(size=size)
    volume = VolumeGeometry(shape=x.shape)
    op = RayTransform(volume, FanBeam2D.default(volume, n_angles=n_angles))
    g = torch.Generator().manual_seed(seed)
    y, std = add_gaussian_noise(op(x), rel=noise, generator=g)
    x_fbp = fbp(y, op)
    results: dict[str, Any] = {"image_shape": list(x.shape), "n_angles": n_angles}
    results.update(noise_rel=noise, noise_std=std, psnr_fbp=psnr(x_fbp, x), ssim_fbp=ssim(x_fbp, x))
    if uncertainty:
        image, uq = _uncertainty(out, op, y, x, quick, iterations, g, progress, results)
    else:
        from .dip.trainer import fit_dip

        its = iterations if iterations is not None else (150 if quick else 1000)
        t_dip = time.perf_counter()
        res = fit_dip(
            y, op, tv_weight=3e-4, iterations=its, lr=1e-3, generator=g, progress=progress
        )
        results.update(dip_seconds=time.perf_counter() - t_dip, iterations=its)
        image, uq = res.image, None
    results.update(psnr_dip=psnr(image, x), ssim_dip=ssim(image, x))
    results["seconds"] = time.perf_counter() - t0
    atomic_write_text(json.dumps(results, indent=2, default=str), out / "demo.json")
    results["figure"] = _figure(out / "demo.png", x, x_fbp, image, uq, results)
    if uq is not None:
        results["uq"] = uq
    results.update(ground_truth=x, fbp=x_fbp, operator=op, y=y)
    return results


def _uncertainty(out: Path, op, y, x, quick: bool, iterations, g, progress: bool, results: dict):
    """The default call on the demo's scan; writes the maps, panel and metrics.json and adds
    the figures of interest to ``results``."""
    from .uq.pipeline import reconstruct_with_uncertainty

    over: dict[str, Any] = {}
    if quick:  # a smoke test of the same code path
        over = dict(em_cycles=1, em_samples=4, n_samples=4, noise_probes=4)
        over["dip"] = {"iterations": iterations or 60}
    elif iterations is not None:
        over["dip"] = {"iterations": int(iterations)}
    t0 = time.perf_counter()
    uq = reconstruct_with_uncertainty(y, op, generator=g, progress=progress, **over)
    total = time.perf_counter() - t0
    written = uq.write_outputs(
        out, ground_truth=x, spacing=0.66, title="linearised DIP: std map and calibration"
    )
    m = written["metrics"]
    dip_s = uq.diagnostics["timings"]["dip"]
    std2, sigma2 = float(results["noise_std"]) ** 2, uq.noise_var
    results.update(
        dip_seconds=dip_s,
        uq_stage_seconds=total - dip_s,
        uq_over_dip=(total - dip_s) / dip_s,
        uq_seconds=uq.diagnostics["timings"],
        iterations=uq.diagnostics["dip"].get("iterations"),
        best_iteration=uq.diagnostics["dip"].get("best_iteration"),
        heldout_views=uq.diagnostics["heldout_views"],
        noise_var_true=std2,
        noise_var_learned=sigma2,
        noise_var_rel_error=sigma2 / std2 - 1,
        dip_misfit_over_noise_var=uq.diagnostics["misfit_over_noise_var"],
        variance_scales=uq.variance_scales,
        uq_converged=uq.converged,
        uq_warnings=uq.warnings,
        uq_metrics={
            k: m[k]
            for k in (
                "coverage",
                "zscore",
                "test_log_likelihood",
                "constant_std_log_likelihood",
                "std_error_correlation",
                "ause",
                "heldout",
                "uncalibrated",
            )
        },
    )
    return uq.mean, uq


def _figure(path: Path, x, x_fbp, image, uq, r: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from .plotting import save_figure_atomic

    fig, ax = plt.subplots(1, 4, figsize=(15, 3.8))
    lim = dict(vmin=0.0, vmax=float(x.max()), cmap="gray", origin="lower")
    ax[0].imshow(x.numpy(), **lim)
    ax[0].set_title("CT slice (ground truth)")
    ax[1].imshow(x_fbp.numpy(), **lim)
    ax[1].set_title(f"FBP, {r['n_angles']} views: {r['psnr_fbp']:.2f} dB")
    ax[2].imshow(image.detach().cpu().numpy(), **lim)
    ax[2].set_title(f"DIP + TV: {r['psnr_dip']:.2f} dB")
    if uq is not None:
        h = ax[3].imshow(uq.std.detach().cpu().numpy(), cmap="magma", origin="lower")
        cov = r["uq_metrics"]["coverage"]["0.9"]
        ax[3].set_title(f"std (90 % intervals cover {cov:.2f})")
        fig.colorbar(h, ax=ax[3], fraction=0.046)
    else:
        ax[3].imshow(np.abs(image.detach().cpu().numpy() - x.numpy()), cmap="magma", origin="lower")
        ax[3].set_title("|error|")
    for a in ax:
        a.axis("off")
    fig.tight_layout()
    try:
        return save_figure_atomic(fig, path, dpi=100)
    finally:
        plt.close(fig)

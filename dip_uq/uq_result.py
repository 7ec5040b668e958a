"""``UQResult``: a reconstruction with its voxelwise uncertainty, saved and loaded atomically.

Arrays live in ``result.npz`` (``mean``, ``std``, optional ``samples`` and ``covariance``),
everything else in ``result.json``. Image order is the volume's: ``(H, W)`` or ``(D, H, W)``.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["UQResult"]

_ARRAYS = ("mean", "std", "samples", "covariance")


@dataclass
class UQResult:
    """What :func:`dip_uq.reconstruct_with_uncertainty` returns.

    Attributes:
        mean: the reconstruction x* = f(z₀; θ*), the predictive mean, volume shape.
        std: voxelwise posterior std of the linearised model, sqrt(mean_k (J z_k)²).
        noise_var: learned observation-noise variance σ_y² (sinogram units²).
        prior_variance: σ_b² per prior block ``{block: value}``.
        lengthscale: ℓ_b per Matérn block ``{block: value}``.
        trajectories: per-cycle hyperparameter traces (``noise_var``, ``prior_variance``,
            ``gamma``, solver residuals) or the optimiser trace for ``mll``/``tv-map``.
        diagnostics: solver diagnostics of the sample stage (iterations, residuals,
            converged flags), timings and settings.
        samples: optional zero-mean functional samples J z_k ``(K, *volume)``.
        covariance: optional dense posterior covariance of the image ``(n_vox, n_vox)``
            (small problems with ``exact_covariance=True``).
        laplace: the fitted :class:`~dip_uq.laplace.LinearisedLaplace` (not saved).
    """

    mean: torch.Tensor
    std: torch.Tensor
    noise_var: float
    prior_variance: dict[str, float] = field(default_factory=dict)
    lengthscale: dict[str, float] = field(default_factory=dict)
    trajectories: dict[str, Any] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    samples: torch.Tensor | None = None
    covariance: torch.Tensor | None = None
    laplace: Any = field(default=None, repr=False, compare=False)

    @property
    def variance(self) -> torch.Tensor:
        return self.std**2

    @property
    def warnings(self) -> list[str]:
        """Non-convergence warnings the pipeline recorded (empty when every solve converged)."""
        return list(self.diagnostics.get("warnings", []))

    @property
    def converged(self) -> bool:
        """True when no solver or EM non-convergence was recorded."""
        return not self.warnings

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``result.npz`` and ``result.json`` into ``directory`` (atomically)."""
        from .dip.checkpoint import atomic_write_bytes, atomic_write_text

        d = Path(directory).expanduser()
        d.mkdir(parents=True, exist_ok=True)
        arrays = {
            k: getattr(self, k).detach().cpu().numpy()
            for k in _ARRAYS
            if getattr(self, k) is not None
        }
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(buf.getvalue(), d / "result.npz")
        meta = {
            "noise_var": float(self.noise_var),
            "prior_variance": self.prior_variance,
            "lengthscale": self.lengthscale,
            "trajectories": _jsonable(self.trajectories),
            "diagnostics": _jsonable(self.diagnostics),
        }
        atomic_write_text(json.dumps(meta, indent=2), d / "result.json")
        return d

    def write_outputs(
        self,
        directory: str | os.PathLike,
        *,
        ground_truth: Any = None,
        spacing: Any = None,
        delta: float = 0.0,
        title: str | None = None,
    ) -> dict[str, Any]:
        """User-facing files in ``directory``: ``reconstruction.{npz,tif}``,
        ``std.{npz,tif}`` (plus ``.nii.gz`` in 3D when nibabel is installed), the saved result
        (``result/``), a PNG panel ``uncertainty.png`` (reconstruction, std; |error| and a
        calibration curve with a ground truth; central slices in 3D) and ``metrics.json``
        (with a ground truth, :func:`dip_uq.metrics.evaluate_uq` with ``delta``). All atomic.
        Returns ``{"files": [...], "metrics": dict | None}``."""
        from .dip.checkpoint import atomic_write_text
        from .io import write_volume
        from .plotting import save_panel

        d = Path(directory).expanduser()
        d.mkdir(parents=True, exist_ok=True)
        mean = self.mean.detach().cpu().numpy()
        std = self.std.detach().cpu().numpy()
        files = []
        for name, arr in (("reconstruction", mean), ("std", std)):
            files.append(write_volume(d / f"{name}.npz", arr, spacing=spacing))
            files.append(write_volume(d / f"{name}.tif", arr, spacing=spacing))
            if arr.ndim == 3:
                try:
                    import nibabel  # noqa: F401

                    files.append(write_volume(d / f"{name}.nii.gz", arr, spacing=spacing))
                except ImportError:
                    pass
        files.append(self.save(d / "result"))
        images = {"reconstruction": mean, "std": std}
        metrics, calib = None, None
        if ground_truth is not None:
            from .metrics import evaluate_uq

            gt = torch.as_tensor(ground_truth).detach().cpu()
            metrics = evaluate_uq(self, gt, delta=delta)
            # the metrics of an unconverged map must say so
            metrics.update(converged=self.converged, warnings=self.warnings)
            images["|error|"] = np.abs(gt.numpy() - mean)
            calib = (metrics["calibration"]["expected"], metrics["calibration"]["observed"])
            files.append(
                atomic_write_text(json.dumps(_jsonable(metrics), indent=2), d / "metrics.json")
            )
        files.append(save_panel(d / "uncertainty.png", images, calibration=calib, title=title))
        return {"files": files, "metrics": metrics}

    @classmethod
    def load(cls, directory: str | os.PathLike) -> UQResult:
        """Read a result written by :meth:`save`."""
        d = Path(directory).expanduser()
        for name in ("result.npz", "result.json"):
            if not (d / name).is_file():
                raise FileNotFoundError(f"{d / name}: missing (not a saved UQResult directory)")
        with np.load(d / "result.npz") as data:
            arrays = {k: torch.from_numpy(data[k].copy()) for k in data.files}
        meta = json.loads((d / "result.json").read_text())
        return cls(
            mean=arrays["mean"],
            std=arrays["std"],
            noise_var=float(meta["noise_var"]),
            prior_variance=meta.get("prior_variance", {}),
            lengthscale=meta.get("lengthscale", {}),
            trajectories=meta.get("trajectories", {}),
            diagnostics=meta.get("diagnostics", {}),
            samples=arrays.get("samples"),
            covariance=arrays.get("covariance"),
        )


def _jsonable(obj: Any) -> Any:
    """Tensors and numpy values to lists/floats, recursively."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return str(obj)
    return obj

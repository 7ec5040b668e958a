"""``UQResult``: a reconstruction with its voxelwise uncertainty, saved and loaded atomically.

Arrays live in ``result.npz`` (``mean``, ``std``, the unscaled component variances
``variance_<name>``, optional ``samples`` and ``covariance``), everything else in
``result.json``. Image order is the volume's: ``(H, W)`` or ``(D, H, W)``.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import require_finite

__all__ = ["UQResult"]

_ARRAYS = ("mean", "std", "samples", "covariance")


@dataclass
class UQResult:
    """What :func:`dip_uq.reconstruct_with_uncertainty` returns.

    Attributes:
        mean: the reconstruction x* = f(z₀; θ*), the predictive mean, volume shape.
        std: voxelwise std of the predictive, sqrt(Σ_c s_c v_c) over its components
            (``docs/methods.md`` §6): ``"weights"``, the linearised weight posterior
            mean_k (J z_k)², and ``"noise"``, the image-space noise term δ; s_c are the
            ``variance_scales`` fitted on held-out views (1 without them).
        components: the unscaled component variances ``{name: (*volume)}``.
        variance_scales: s_c per component.
        calibration: the held-out-view record (:class:`~dip_uq.uq.calibration.HeldOutCalibration`
            as a dict: scales, measurement-space coverage / log-likelihood / PIT histogram of
            the raw and calibrated predictive, predicted image coverage), or ``None``.
        heldout: what the calibration was computed from, flat over the held-out measurements:
            ``residual`` y_h − A_h x*, ``view_of`` (position of each one's view), and
            ``variance_<name>`` per component; :meth:`recalibrate` refits from it.
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
    components: dict[str, torch.Tensor] = field(default_factory=dict)
    variance_scales: dict[str, float] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    heldout: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        shape = tuple(self.mean.shape)
        for name, arr in (
            ("std", self.std),
            *((f"component {k}", v) for k, v in self.components.items()),
        ):
            if tuple(arr.shape) != shape:
                raise ValueError(f"UQResult: {name} has shape {tuple(arr.shape)}, the mean {shape}")
        unknown = set(self.variance_scales) - set(self.components)
        if unknown and self.components:
            raise ValueError(f"UQResult: scales for unknown components {sorted(unknown)}")

    @property
    def variance(self) -> torch.Tensor:
        return self.std**2

    def component_std(self, name: str, *, scaled: bool = True) -> torch.Tensor:
        """The std of one component, sqrt(s_c v_c) (``scaled=False``: sqrt(v_c))."""
        if name not in self.components:
            raise KeyError(f"no component {name!r}; this result has {sorted(self.components)}")
        s = self.variance_scales.get(name, 1.0) if scaled else 1.0
        return (s * self.components[name]).sqrt()

    def recalibrate(self, mode: str) -> UQResult:
        """The same result with its variance scales refitted on the held-out views under
        another calibration ``mode`` (``"weights"``, ``"per-component"``, ``"scalar"``,
        ``"none"``; ``docs/methods.md`` §6.3). Needs a result computed with held-out views."""
        from .calibration import calibrate_on_heldout

        if not self.heldout:
            raise ValueError(
                "recalibrate needs the held-out views' record (a result computed with holdout > 0)"
            )
        h = self.heldout
        comps = {c: h[f"variance_{c}"] for c in self.components}
        cal = calibrate_on_heldout(
            h["residual"],
            comps,
            self.components,
            float(self.noise_var),
            h["view_of"],
            (self.calibration or {}).get("views", []),
            mode=mode,
        )
        total = sum(cal.scales[c] * v for c, v in self.components.items())
        return replace(
            self,
            std=total.sqrt().to(self.std.dtype),
            variance_scales=dict(cal.scales),
            calibration=cal.to_dict(),
        )

    @property
    def std_weights(self) -> torch.Tensor | None:
        """The linearised weight posterior's part of ``std`` (scaled)."""
        return self.component_std("weights") if "weights" in self.components else None

    @property
    def std_noise(self) -> torch.Tensor | None:
        """The image-space noise term's part of ``std`` (scaled)."""
        return self.component_std("noise") if "noise" in self.components else None

    @property
    def uncalibrated_std(self) -> torch.Tensor:
        """sqrt(Σ_c v_c): the predictive before the held-out scales (``std`` without
        components)."""
        if not self.components:
            return self.std
        return sum(self.components.values()).sqrt()

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
        from ..io.atomic import atomic_write_bytes, atomic_write_text

        d = Path(directory).expanduser()
        d.mkdir(parents=True, exist_ok=True)
        arrays = {
            k: getattr(self, k).detach().cpu().numpy()
            for k in _ARRAYS
            if getattr(self, k) is not None
        }
        for name, v in self.components.items():
            arrays[f"variance_{name}"] = v.detach().cpu().numpy()
        for name, v in self.heldout.items():
            arrays[f"heldout_{name}"] = v.detach().cpu().numpy()
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(buf.getvalue(), d / "result.npz")
        meta = {
            "noise_var": float(self.noise_var),
            "prior_variance": self.prior_variance,
            "lengthscale": self.lengthscale,
            "trajectories": _jsonable(self.trajectories),
            "diagnostics": _jsonable(self.diagnostics),
            "variance_scales": dict(self.variance_scales),
            "calibration": _jsonable(self.calibration),
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
        calibration curve with a ground truth; central slices in 3D), ``std_<component>``
        maps (each component's part of ``std``, for components in the total) and
        ``metrics.json``: always :meth:`summary` (components, scales, the held-out
        views' scores, the DIP's misfit), and with a ground truth also
        :func:`dip_uq.uq.evaluation.evaluate_uq` (with ``delta``) of the predictive, of the
        uncalibrated predictive (``"uncalibrated"``) and of each component alone. All atomic.
        Returns ``{"files": [...], "metrics": dict}``."""
        from ..io.arrays import write_volume
        from ..io.atomic import atomic_write_text
        from ..plotting import save_panel

        gt = None if ground_truth is None else _checked_truth(ground_truth, self.mean.shape)
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
        for name in self.components:  # each component's part of std, beside the total
            if self.variance_scales.get(name, 1.0) == 0:
                continue  # not in the total (its raw map stays in result/result.npz)
            arr = self.component_std(name).detach().cpu().numpy()
            files.append(write_volume(d / f"std_{name}.npz", arr, spacing=spacing))
            files.append(write_volume(d / f"std_{name}.tif", arr, spacing=spacing))
        files.append(self.save(d / "result"))
        images = {"reconstruction": mean, "std": std}
        calib = None
        metrics = self.summary()
        if gt is not None:
            from .evaluation import evaluate_uq

            metrics.update(evaluate_uq(self, gt, delta=delta))
            if self.components:  # the same truth against the raw predictive and each part
                raw = UQResult(self.mean, self.uncalibrated_std, self.noise_var)
                metrics["uncalibrated"] = _core_scores(evaluate_uq(raw, gt, patch_sizes=()))
                metrics["components_alone"] = {
                    c: _core_scores(
                        evaluate_uq(
                            UQResult(self.mean, self.component_std(c), self.noise_var),
                            gt,
                            patch_sizes=(),
                        )
                    )
                    for c in self.components
                }
            images["|error|"] = np.abs(gt.numpy() - mean)
            calib = (metrics["calibration"]["expected"], metrics["calibration"]["observed"])
        files.append(
            atomic_write_text(json.dumps(_jsonable(metrics), indent=2), d / "metrics.json")
        )
        files.append(save_panel(d / "uncertainty.png", images, calibration=calib, title=title))
        return {"files": files, "metrics": metrics}

    def summary(self) -> dict[str, Any]:
        """What the run says about itself, no ground truth needed: the predictive's
        components (mean std of each, scaled), their scales, the held-out views' scores
        (``"heldout"``), the DIP's data misfit against the learned σ², convergence."""
        dip = self.diagnostics.get("dip", {}) if isinstance(self.diagnostics, dict) else {}
        out: dict[str, Any] = {
            "predictive": {
                "components": sorted(self.components),
                "variance_scales": dict(self.variance_scales),
                "rms_std": float(self.std.double().pow(2).mean().sqrt()),
                "rms_std_components": {
                    c: float(self.component_std(c).double().pow(2).mean().sqrt())
                    for c in self.components
                },
            },
            "heldout": self.calibration,
            "noise_var": float(self.noise_var),
            "converged": self.converged,
            "warnings": self.warnings,
        }
        misfit = dip.get("data_misfit")
        if misfit is not None:
            out["dip"] = {
                "data_misfit": misfit,
                "misfit_over_noise_var": float(misfit) / float(self.noise_var),
                "heldout_misfit": dip.get("heldout_misfit"),
            }
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike) -> UQResult:
        """Read a result written by :meth:`save`. A missing file raises ``FileNotFoundError``;
        a damaged or inconsistent one :class:`~dip_uq.errors.DataFormatError` naming the file
        and the problem."""
        from ..errors import DataFormatError

        d = Path(directory).expanduser()
        for name in ("result.npz", "result.json"):
            if not (d / name).is_file():
                raise FileNotFoundError(f"{d / name}: missing (not a saved UQResult directory)")
        arrays = _read_npz(d / "result.npz")
        meta = _read_json(d / "result.json")
        missing = [k for k in ("mean", "std") if k not in arrays]
        if missing:
            raise DataFormatError(
                f"{d / 'result.npz'}: no {' and no '.join(map(repr, missing))} array (it holds "
                f"{sorted(arrays)}): not a saved UQResult, or damaged"
            )
        components = {
            k[len("variance_") :]: v for k, v in arrays.items() if k.startswith("variance_")
        }
        heldout = {k[len("heldout_") :]: v for k, v in arrays.items() if k.startswith("heldout_")}
        try:
            return cls(
                mean=arrays["mean"],
                std=arrays["std"],
                components=components,
                variance_scales={k: float(v) for k, v in meta.get("variance_scales", {}).items()},
                calibration=meta.get("calibration"),
                heldout=heldout,
                noise_var=float(meta["noise_var"]),
                prior_variance=meta.get("prior_variance", {}),
                lengthscale=meta.get("lengthscale", {}),
                trajectories=meta.get("trajectories", {}),
                diagnostics=meta.get("diagnostics", {}),
                samples=arrays.get("samples"),
                covariance=arrays.get("covariance"),
            )
        except KeyError as err:
            raise DataFormatError(f"{d / 'result.json'}: no {err} entry") from err
        except (TypeError, ValueError, AttributeError) as err:
            raise DataFormatError(f"{d}: not a consistent saved UQResult: {err}") from err


def _read_npz(path: Path) -> dict[str, torch.Tensor]:
    from ..errors import DataFormatError

    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: torch.from_numpy(data[k].copy()) for k in data.files}
    except Exception as err:  # numpy and zipfile raise many types for damaged archives
        raise DataFormatError(
            f"{path}: cannot read the arrays (truncated or corrupt?): {type(err).__name__}: {err}"
        ) from err


def _read_json(path: Path) -> dict:
    from ..errors import DataFormatError

    try:
        meta = json.loads(path.read_text())
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise DataFormatError(f"{path}: not valid JSON (truncated?): {err}") from err
    if not isinstance(meta, dict):
        raise DataFormatError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def _checked_truth(ground_truth: Any, shape: torch.Size) -> torch.Tensor:
    """The ground truth of :meth:`UQResult.write_outputs`, checked before anything is written."""
    gt = torch.as_tensor(ground_truth).detach().cpu()
    if tuple(gt.shape) != tuple(shape):
        raise ValueError(
            f"write_outputs: ground truth shape {tuple(gt.shape)} does not match the "
            f"reconstruction {tuple(shape)}"
        )
    require_finite(gt, "write_outputs: the ground truth")
    return gt


def _core_scores(m: dict) -> dict:
    return {k: m[k] for k in ("coverage", "zscore", "test_log_likelihood", "std_error_correlation")}


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

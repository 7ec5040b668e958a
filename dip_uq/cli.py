"""The ``dip-uq`` command.

Subcommands (argparse subparsers; each registers itself with ``_add_<name>``):

* ``dip-uq reconstruct SINOGRAM --geometry GEOM --out DIR``: DIP + TV reconstruction of a
  measured sinogram (``.npy``/``.npz``/``.tif``/``.h5``; order ``(angles, det)`` in 2D,
  ``(det_rows, angles, det_cols)`` in 3D) described by a JSON/TOML geometry file
  (``docs/geometry_file.md``). Writes ``reconstruction.npy``, ``reconstruction.tif``,
  ``reconstruction.nii.gz`` (3D, when nibabel is installed), ``preview.png`` and
  ``reconstruction.json`` (settings and loss summary).
* ``dip-uq uncertainty SINOGRAM --geometry GEOM --out DIR``: the same inputs as
  ``reconstruct`` plus prior/hyperparameter/solver/sample options; runs
  ``dip_uq.reconstruct_with_uncertainty`` and writes ``reconstruction.*``, ``std.*``,
  ``result/``, ``uncertainty.png`` and (with ``--ground-truth``) ``metrics.json``.
  Stages are checkpointed in ``OUT/checkpoints``; ``--resume`` continues an interrupted run.
* ``dip-uq demo --out DIR``: the real-CT-slice demo (``dip_uq.demo.run_demo``).

Errors in the input (files, shapes, NaNs, settings) print one line naming the problem and
exit with status 2; nothing half-written is left behind (all writers are atomic).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "build_parser"]


class CLIError(Exception):
    """A user-facing problem: printed as ``dip-uq: error: ...``, exit status 2."""


TV_HELP = (
    "TV weight gamma (1e-4, the methods' value at 28x28; TV sums over voxels, so for a volume "
    "scale it by about 784/n_voxels, e.g. 1e-6 at 32^3-64^3: docs/dip.md)"
)


def _add_reconstruct(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reconstruct",
        help="DIP reconstruction of a sinogram file",
        description="Deep-image-prior + TV reconstruction of a measured sinogram.",
    )
    p.add_argument("sinogram", type=Path, help=".npy, .npz, .tif/.tiff or .h5/.hdf5 file")
    p.add_argument("--geometry", "-g", type=Path, required=True, help="JSON/TOML geometry file")
    p.add_argument("--out", "-o", type=Path, required=True, help="output directory")
    p.add_argument("--key", help="array name inside .npz / dataset path inside HDF5")
    p.add_argument("--iterations", type=int, default=2000, help="iteration budget (2000)")
    p.add_argument("--tv-weight", type=float, default=1e-4, help=TV_HELP)
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (1e-4)")
    p.add_argument(
        "--net", default="small", help="U-Net preset (small, large) or a pretrained .pt file"
    )
    p.add_argument(
        "--linear-output",
        action="store_true",
        help="the preset without its output sigmoid (docs/dip.md: the sigmoid, trained with "
        "the saturation barrier, is the default)",
    )
    p.add_argument("--init", default="fbp", choices=("fbp", "backprojection", "noise"))
    p.add_argument(
        "--edip-iterations",
        type=int,
        default=0,
        help="first pretrain the net on simulated ellipses with this operator for this many "
        "steps (EDIP; saved to OUT/edip.pt and reusable with --net OUT/edip.pt); 0 = off",
    )
    p.add_argument("--edip-images", type=int, default=64, help="simulated EDIP images (64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_cmd_reconstruct)


def _add_uncertainty(sub: argparse._SubParsersAction) -> None:
    from .uq.calibration import CALIBRATION_MODES
    from .uq.config import HYPER_MODES, PRIORS, SOLVERS, UQConfig

    d = UQConfig()  # the one table of defaults (shown in the help, applied by the API)
    p = sub.add_parser(
        "uncertainty",
        help="DIP reconstruction with a calibrated voxelwise uncertainty (std) map",
        description="Linearised deep image prior: held-out views, DIP fit, linearisation, "
        "hyperparameters, posterior samples, noise term, std map calibrated on the held-out "
        "views. Options left out take the API's defaults (dip_uq.uq.config.UQConfig).",
    )
    p.add_argument("sinogram", type=Path, help=".npy, .npz, .tif/.tiff or .h5/.hdf5 file")
    p.add_argument("--geometry", "-g", type=Path, required=True, help="JSON/TOML geometry file")
    p.add_argument("--out", "-o", type=Path, required=True, help="output directory")
    p.add_argument("--key", help="array name inside .npz / dataset path inside HDF5")
    p.add_argument("--iterations", type=int, help=f"DIP iteration budget ({d.dip.iterations})")
    p.add_argument(
        "--tv-weight", type=float, help="TV weight gamma (1e-4 * 784 / n_voxels by default)"
    )
    p.add_argument("--lr", type=float, help=f"DIP Adam learning rate ({d.dip.lr:g})")
    p.add_argument(
        "--net",
        help="U-Net preset (small, large) or a .pt file (default: 3 scales x 16 channels, "
        "linear output)",
    )
    p.add_argument(
        "--linear-output", action="store_true", help="with --net PRESET: drop its sigmoid"
    )
    p.add_argument("--init", choices=("fbp", "backprojection", "noise"), help="DIP input (fbp)")
    p.add_argument(
        "--holdout",
        type=float,
        help=f"fraction of the views held out for calibration and DIP stopping ({d.holdout}; "
        "0: none, the std map is then not calibrated against measurements)",
    )
    p.add_argument(
        "--holdout-seed", type=int, help=f"seed of the held-out views ({d.holdout_seed})"
    )
    p.add_argument(
        "--calibration",
        choices=CALIBRATION_MODES,
        help=f"which variance scales the held-out views fit ({d.calibration}; docs/methods.md §6.3)",
    )
    p.add_argument("--noise-probes", type=int, help=f"noise-term probes ({d.noise_probes})")
    p.add_argument("--prior", choices=PRIORS, help=f"prior ({d.prior})")
    p.add_argument("--hyper", choices=HYPER_MODES, help=f"hyperparameters ({d.hyper})")
    p.add_argument("--solver", choices=SOLVERS, help=f"posterior sampler ({d.solver})")
    p.add_argument("--n-samples", type=int, help=f"posterior samples ({d.n_samples})")
    p.add_argument("--em-cycles", type=int, help=f"EM cycles ({d.em_cycles})")
    p.add_argument("--em-samples", type=int, help=f"EM samples per cycle ({d.em_samples})")
    tying = p.add_mutually_exclusive_group()
    tying.add_argument(
        "--per-block",
        dest="tied",
        action="store_false",
        default=None,
        help="one prior variance per U-Net block (default for --hyper em)",
    )
    tying.add_argument(
        "--tied",
        dest="tied",
        action="store_true",
        default=None,
        help="one prior variance shared by all blocks (default for --hyper mll)",
    )
    p.add_argument(
        "--precision",
        choices=("float32", "float64"),
        help=f"dtype of the linearised stage ({d.dtype}: CT kernels GΣGᵀ are too badly "
        "conditioned for float32 CG; the DIP fit stays float32)",
    )
    p.add_argument("--ground-truth", type=Path, help="optional image file: adds metrics.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=_cmd_uncertainty)


#: command-line options of ``uncertainty`` that are UQConfig fields (same name)
_UQ_OPTIONS = (
    "holdout", "holdout_seed", "calibration", "noise_probes", "prior", "hyper", "solver",
    "n_samples", "em_cycles", "em_samples", "tied",
)  # fmt: skip


#: UQConfig names as the command line spells them, for error messages
_FLAGS = {
    "dip.iterations": "--iterations",
    "dip.lr": "--lr",
    "dip.tv_weight": "--tv-weight",
    **{name: "--" + name.replace("_", "-") for name in _UQ_OPTIONS},
}


def _option_message(msg: str) -> str:
    """A configuration error in command-line words (``n_samples`` -> ``--n-samples``)."""
    import re

    names = sorted(_FLAGS, key=len, reverse=True)
    return re.sub(r"(?<![\w.-])(" + "|".join(map(re.escape, names)) + r")\b",
                  lambda m: _FLAGS[m.group(1)], msg)  # fmt: skip


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="sparse-view real CT slice: FBP vs DIP, then the uncertainty map",
        description="Simulate a sparse-view fan-beam scan of pydicom's CT slice, reconstruct "
        "it with FBP and DIP, print both PSNRs and write a figure.",
    )
    p.add_argument("--out", "-o", type=Path, default=Path("runs/demo"))
    p.add_argument("--quick", action="store_true", help="32^2, short runs (smoke test)")
    p.add_argument("--iterations", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--no-uncertainty", action="store_true", help="FBP vs DIP only (128^2, small U-Net)"
    )
    p.set_defaults(func=_cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dip-uq",
        description="CT reconstruction with the deep image prior and a calibrated voxelwise "
        "uncertainty map.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_reconstruct(sub)
    _add_uncertainty(sub)
    _add_demo(sub)
    return parser


# ------------------------------------------------------------------------------ commands
def _net_choice(args: argparse.Namespace, *, ndim: int):
    """``--net`` (preset name or .pt file) and ``--linear-output`` as a ``fit_dip`` net."""
    from .dip import PRESETS, preset_config

    net = args.net
    if net.endswith(".pt"):
        net = Path(net)
        if not net.is_file():
            raise CLIError(f"{net}: pretrained network file not found")
        if args.linear_output:
            raise CLIError("--linear-output changes a preset; a pretrained .pt net keeps its own")
        return net
    if net not in PRESETS:
        raise CLIError(f"--net {net!r}: choose a preset {PRESETS} or a .pt file")
    return preset_config(net, ndim=ndim, use_sigmoid=False) if args.linear_output else net


def _read_sinogram(path: Path, key: str | None):
    """Read the sinogram with ``dip_uq.io.read_array`` (errors name the file)."""
    import numpy as np

    from .io.arrays import read_array

    if not path.exists():
        raise CLIError(f"{path}: sinogram file not found")
    arr = read_array(path, key=key)
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise CLIError(f"{path}: sinogram must be real numbers, got dtype {arr.dtype}")
    return arr


def _read_ground_truth(path: Path, shape: tuple[int, ...]):
    """The ``--ground-truth`` image: real, finite, of the volume's shape."""
    import numpy as np

    from .io.arrays import read_array

    if not path.exists():
        raise CLIError(f"{path}: ground-truth file not found")
    gt = read_array(path)
    if not np.issubdtype(gt.dtype, np.number) or np.iscomplexobj(gt):
        raise CLIError(f"{path}: ground truth must be real numbers, got dtype {gt.dtype}")
    gt = np.asarray(gt, dtype=np.float64)
    if tuple(gt.shape) != tuple(shape):
        raise CLIError(
            f"{path}: ground truth shape {tuple(gt.shape)} does not match the volume {tuple(shape)}"
        )
    bad = int((~np.isfinite(gt)).sum())
    if bad:
        raise CLIError(f"{path}: ground truth contains {bad} NaN or infinite values (of {gt.size})")
    return gt


def _check_out(out: Path) -> Path:
    """``--out`` as a directory files can be written in, checked before any work."""
    from .io.atomic import writable_directory

    try:
        return writable_directory(out)
    except OSError as err:
        raise CLIError(f"--out {err}") from err


def _check_reconstruct_options(args: argparse.Namespace) -> None:
    """``reconstruct``'s numbers, before EDIP pretraining or the DIP starts."""
    import math

    checks = (
        ("--iterations", args.iterations, args.iterations >= 1),
        ("--lr", args.lr, math.isfinite(args.lr) and args.lr > 0),
        ("--tv-weight", args.tv_weight, math.isfinite(args.tv_weight) and args.tv_weight >= 0),
        ("--checkpoint-every", args.checkpoint_every, args.checkpoint_every >= 1),
        ("--edip-iterations", args.edip_iterations, args.edip_iterations >= 0),
        ("--edip-images", args.edip_images, args.edip_images >= 1),
    )
    for flag, value, ok in checks:
        if not ok:
            allowed = {
                "--tv-weight": "a finite number >= 0",
                "--lr": "a positive finite number",
                "--edip-iterations": "an integer >= 0",
            }.get(flag, "a positive integer")
            raise CLIError(f"{flag} must be {allowed}, got {value}")


def _read_problem(args: argparse.Namespace):
    """Geometry file and sinogram of a CLI call, checked against each other."""
    from .io.geometry_file import read_geometry_file

    volume, geometry = read_geometry_file(args.geometry)
    sino = _read_sinogram(args.sinogram, args.key)
    if tuple(sino.shape) != tuple(geometry.shape):
        order = "(angles, det)" if geometry.ndim == 2 else "(det_rows, angles, det_cols)"
        raise CLIError(
            f"{args.sinogram}: sinogram shape {tuple(sino.shape)} does not match the geometry "
            f"in {args.geometry}: expected {tuple(geometry.shape)} {order}"
        )
    return volume, geometry, sino


def _cmd_reconstruct(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from operators import RayTransform

    from .dip.trainer import fit_dip
    from .io.arrays import write_volume

    volume, geometry, sino = _read_problem(args)
    _check_reconstruct_options(args)
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        raise CLIError(f"--device {args.device!r} is not a torch device: {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {args.device}: CUDA is not available in this torch build/machine")
    net = _net_choice(args, ndim=len(volume.shape))
    if args.edip_iterations > 0 and isinstance(net, Path):
        raise CLIError("use either --net FILE.pt (already pretrained) or --edip-iterations")
    out = _check_out(args.out)
    y = torch.as_tensor(np.ascontiguousarray(sino), dtype=torch.float32, device=device)
    op = RayTransform(volume, geometry)
    if args.edip_iterations > 0:
        from .dip.pretrain import pretrain_edip
        from .dip.trainer import initial_input

        # phantoms span [0, s] with s the 99th percentile of the analytic reconstruction
        z0 = initial_input(y, op, "fbp")
        value_scale = float(torch.quantile(z0.flatten().float().cpu(), 0.99))
        pre = pretrain_edip(
            op,
            net=net,
            n_images=args.edip_images,
            iterations=args.edip_iterations,
            lr=args.lr,
            value_scale=max(value_scale, 1e-6),
            generator=torch.Generator().manual_seed(args.seed),
            save_path=out / "edip.pt",
            progress=not args.no_progress,
        )
        net = pre.net.to(device)
        print(f"EDIP pretraining done: wrote {out / 'edip.pt'}")
    res = fit_dip(
        y,
        op,
        net=net,
        tv_weight=args.tv_weight,
        iterations=args.iterations,
        lr=args.lr,
        init=args.init,
        generator=torch.Generator(device="cpu").manual_seed(args.seed),
        checkpoint_dir=out / "checkpoints",
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        progress=not args.no_progress,
    )
    image = res.image.detach().cpu().numpy()
    spacing = tuple(volume.voxel_size)
    written = [
        write_volume(out / "reconstruction.npy", image),
        write_volume(out / "reconstruction.tif", image, spacing=spacing),
    ]
    if image.ndim == 3:
        try:
            import nibabel  # noqa: F401

            written.append(write_volume(out / "reconstruction.nii.gz", image, spacing=spacing))
        except ImportError:
            print("nibabel not installed: skipping NIfTI output", file=sys.stderr)
    from .plotting import save_panel

    written.append(save_panel(out / "preview.png", {"DIP reconstruction": image}))
    from .io.atomic import atomic_write_text

    summary = {
        "sinogram": str(args.sinogram),
        "geometry": str(args.geometry),
        "iterations": args.iterations,
        "iterations_run": res.iterations_run,
        "tv_weight": args.tv_weight,
        "lr": args.lr,
        "net": str(args.net),
        "linear_output": bool(args.linear_output),
        "init": args.init,
        "seed": args.seed,
        "best_iteration": res.best_iteration,
        "best_loss": res.best_loss,
        "final_loss": float(res.loss_history[-1]),
    }
    written.append(atomic_write_text(json.dumps(summary, indent=2), out / "reconstruction.json"))
    print(f"best loss {res.best_loss:.6g} at iteration {res.best_iteration}")
    for w in written:
        print(f"wrote {w}")
    return 0


def _cmd_uncertainty(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from operators import RayTransform

    from .uq.config import UQConfig
    from .uq.pipeline import reconstruct_with_uncertainty

    volume, geometry, sino = _read_problem(args)
    overrides = {k: getattr(args, k) for k in _UQ_OPTIONS if getattr(args, k) is not None}
    if args.precision is not None:
        overrides["dtype"] = args.precision
    dip: dict = {k: getattr(args, k) for k in ("tv_weight", "iterations", "lr", "init")}
    dip = {k: v for k, v in dip.items() if v is not None}
    if args.net is not None:
        dip["net"] = _net_choice(args, ndim=len(volume.shape))
    elif args.linear_output:
        raise CLIError("--linear-output changes a preset: give --net small or --net large")
    try:  # every option checked before the data are touched
        cfg = UQConfig().replace(**overrides, dip=dip)
    except (ValueError, TypeError) as err:
        raise CLIError(_option_message(str(err))) from err
    gt = None
    if args.ground_truth is not None:
        gt = _read_ground_truth(args.ground_truth, volume.shape)
    out = _check_out(args.out)
    y = torch.as_tensor(np.ascontiguousarray(sino), dtype=torch.float32)
    op = RayTransform(volume, geometry)
    res = reconstruct_with_uncertainty(
        y,
        op,
        cfg,
        checkpoint_dir=out / "checkpoints",
        resume=args.resume,
        generator=torch.Generator().manual_seed(args.seed),
        progress=not args.no_progress,
    )
    written = res.write_outputs(out, ground_truth=gt, spacing=tuple(volume.voxel_size))
    m = written["metrics"]
    print(
        f"learned noise variance {res.noise_var:.4g}; DIP misfit / noise variance "
        f"{res.diagnostics['misfit_over_noise_var']:.2f}; median std {float(res.std.median()):.4g}"
    )
    h = m["heldout"]
    if h is not None:
        print(
            f"held-out views {h['views']} ({h['n_measurements']} measurements): variance scales "
            f"{ {k: round(v, 4) for k, v in h['scales'].items()} }; 90% coverage "
            f"{h['raw']['coverage']['0.9']:.3f} raw, {h['calibrated']['coverage']['0.9']:.3f} "
            f"calibrated (cross-fitted); predicted image coverage "
            f"{h['predicted_image_coverage']['calibrated']['0.9']:.3f}"
        )
    for w in res.diagnostics["warnings"]:
        print(f"WARNING: {w}")
    for a in res.diagnostics["advisories"]:
        print(f"note: {a}")
    if gt is not None:
        print(
            f"against the ground truth: PSNR {m['psnr']:.2f} dB, 90% coverage "
            f"{m['coverage']['0.9']:.3f}, z-score std {m['zscore']['std']:.2f}, test "
            f"log-likelihood {m['test_log_likelihood']:.3f}"
        )
    for w in written["files"]:
        print(f"wrote {w}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    _check_out(args.out)
    r = run_demo(
        args.out,
        quick=args.quick,
        iterations=args.iterations,
        seed=args.seed,
        progress=not args.no_progress,
        uncertainty=not args.no_uncertainty,
    )
    print(
        f"{r['image_shape'][0]}x{r['image_shape'][1]} CT slice, {r['n_angles']} fan-beam views, "
        f"{100 * r['noise_rel']:g}% noise"
    )
    print(f"PSNR FBP: {r['psnr_fbp']:.2f} dB   SSIM {r['ssim_fbp']:.3f}")
    print(f"PSNR DIP: {r['psnr_dip']:.2f} dB   SSIM {r['ssim_dip']:.3f}")
    if "uq_metrics" in r:
        m = r["uq_metrics"]
        h = m["heldout"]
        print(
            f"linearised DIP: noise variance {r['noise_var_learned']:.4g} "
            f"(true {r['noise_var_true']:.4g}, {100 * r['noise_var_rel_error']:+.0f}%), "
            f"DIP misfit / noise variance {r['dip_misfit_over_noise_var']:.2f}"
        )
        if h is not None:
            print(
                f"held-out views {h['views']}: variance scales {h['scales']}; 90% coverage of "
                f"held-out measurements {h['raw']['coverage']['0.9']:.3f} raw, "
                f"{h['calibrated']['coverage']['0.9']:.3f} calibrated; predicted image "
                f"coverage {h['predicted_image_coverage']['calibrated']['0.9']:.3f}"
            )
        print(
            f"against the truth: 50/90% coverage {m['coverage']['0.5']:.3f}/"
            f"{m['coverage']['0.9']:.3f}, z-score std {m['zscore']['std']:.2f}, test "
            f"log-likelihood {m['test_log_likelihood']:.3f} (one oracle std: "
            f"{m['constant_std_log_likelihood']:.3f}), corr(std, |error|) "
            f"{m['std_error_correlation']:.2f}"
        )
        print(
            f"time: DIP {r['dip_seconds']:.0f} s, uncertainty stage {r['uq_stage_seconds']:.0f} s "
            f"({r['uq_over_dip']:.2f}x the DIP)"
        )
        if not r["uq_converged"]:
            print("WARNING: " + "\nWARNING: ".join(r["uq_warnings"]))
        print(f"uncertainty panel: {Path(args.out) / 'uncertainty.png'}")
    print(f"figure: {r['figure']}  ({r['seconds']:.0f} s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dip-uq``; returns the exit status (0 ok, 2 bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from .errors import CheckpointError, DataFormatError, GeometryFileError

    try:
        return int(args.func(args) or 0)
    except (
        CLIError,
        GeometryFileError,
        DataFormatError,
        CheckpointError,
        FileNotFoundError,
        KeyError,
        ValueError,
        FloatingPointError,
        NotImplementedError,
    ) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"dip-uq: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

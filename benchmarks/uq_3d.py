"""3D cone beam: DIP vs uncertainty-stage wall time and peak memory (issue 5).

A ``--size``³ modified Shepp-Logan phantom (default 64³), circular cone beam with
``ConeBeam3D.default`` (full orbit, source at 4× and detector at 2× the field-of-view
radius, detector covering the magnified volume), ``--views`` projections, Gaussian noise of
std ``--noise`` · mean|Ax| (methods §9.3), the torch projector. Stages, each in its own
subprocess so that its peak resident memory (VmHWM) is its own:

1. ``dip``: :func:`fit_dip` with a 3D U-Net (``--channels`` per scale, skips [0, 4, 4],
   sigmoid), ``--dip-iterations`` Adam steps at ``--lr``, TV weight ``--tv``; FDK input.
2. ``uq``: :func:`reconstruct_with_uncertainty` on that network (``hyper="em"``, tied prior
   variance, ``--solver``), ``--em-cycles`` EM cycles of ``--em-samples`` samples, then
   ``--samples`` posterior samples for the std map. Its own timings split the stage into EM
   (every cycle's θ_lin solve and sample solves and the M-step) and the std-map samples; one
   further cold θ_lin solve at the final hyperparameters is timed on its own (the cost of
   E-step (a) in a cycle, for the breakdown; not part of the UQ total).

Reports DIP and UQ wall time and CPU time (user + system of the stage's process: on a shared
machine the CPU ratio is the robust one), their ratios (target: UQ ≤ 2× the DIP fit it
explains), peak memory per stage, PSNR of the DIP, and the coverage / z-scores of the std map against the
phantom (no backprojected-noise δ: its dense SVD is out of reach in 3D). Writes
``OUT/results.json`` and ``OUT/table.md`` (atomically). Load average is recorded around
each stage: on a shared machine absolute times are inflated, the ratio less so.

    .venv/bin/python benchmarks/uq_3d.py                               # 64³, defaults below
    .venv/bin/python benchmarks/uq_3d.py --size 16 --dip-iterations 20 --out /tmp/uq3d  # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dip_uq import reconstruct_with_uncertainty  # noqa: E402
from dip_uq.dip import UNet, UNetConfig, fit_dip  # noqa: E402
from dip_uq.metrics import coverage, psnr, std_error_correlation, zscore_stats  # noqa: E402
from operators import ConeBeam3D, RayTransform, VolumeGeometry  # noqa: E402
from operators.noise import add_gaussian_noise  # noqa: E402
from operators.phantoms import shepp_logan_3d  # noqa: E402


def problem(args) -> tuple:
    """(operator, phantom, noisy sinogram, noise std); deterministic under ``args.seed``."""
    n = args.size
    vol = VolumeGeometry(shape=(n, n, n))
    op = RayTransform(vol, ConeBeam3D.default(vol, n_angles=args.views), backend="torch")
    x = shepp_logan_3d((n, n, n))
    g = torch.Generator().manual_seed(args.seed)
    y, std = add_gaussian_noise(op(x), rel=args.noise, generator=g)
    return op, x, y, std


def unet_config(args) -> UNetConfig:
    c = args.channels
    return UNetConfig(ndim=3, channels=(c, c, c), skip_channels=(0, 4, 4), use_sigmoid=True)


def _peak_mib() -> float:
    """This process's peak resident set (VmHWM) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _atomic_json(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def stage_dip(args) -> dict:
    op, x, y, std = problem(args)
    g = torch.Generator().manual_seed(args.seed + 1)
    net = UNet(unet_config(args), generator=g)
    t0, c0 = time.perf_counter(), time.process_time()
    res = fit_dip(
        y,
        op,
        net=net,
        tv_weight=args.tv,
        iterations=args.dip_iterations,
        lr=args.lr,
        generator=g,
        progress=False,
    )
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    ckpt = args.out / "dip.pt"
    tmp = ckpt.with_suffix(".pt.tmp")
    torch.save({"state": res.net.state_dict(), "input": res.input, "image": res.image}, tmp)
    os.replace(tmp, ckpt)
    d = sum(p.numel() for n_, p in res.net.named_parameters() if n_.endswith("weight"))
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,  # user + system of this process: robust to contention
        "iterations": res.iterations_run,
        "it_per_s": res.iterations_run / seconds,
        "best_iteration": res.best_iteration,
        "psnr": psnr(res.image.reshape(x.shape), x),
        "data_misfit": res.data_misfit,  # (1/d_y)‖A x* − y‖², against true_noise_var
        "conv_weights": d,
        "n_obs": int(y.numel()),
        "sinogram_shape": list(y.shape),
        "true_noise_var": std**2,
    }


def stage_uq(args) -> dict:
    op, x, y, std = problem(args)
    st = torch.load(args.out / "dip.pt", weights_only=True)
    net = UNet(unet_config(args))
    net.load_state_dict(st["state"])
    solver_opts = json.loads(args.solver_opts)
    t0, c0 = time.perf_counter(), time.process_time()
    res = reconstruct_with_uncertainty(
        y,
        op,
        dip=net.eval(),
        net_input=st["input"],
        solver=args.solver,
        hyper="em",
        tied=True,  # the figures in benchmarks/README.md were measured tied
        em_cycles=args.em_cycles,
        em_samples=args.em_samples,
        n_samples=args.samples,
        sample_batch=args.samples,
        solver_opts=solver_opts,
        dtype=torch.float64 if args.float64 else torch.float32,
        holdout=0,  # the figures here were measured on a DIP fitted to every view
        noise_term=False,
        generator=torch.Generator().manual_seed(args.seed + 2),
        progress=False,
    )
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    timings = dict(res.diagnostics["timings"])
    t1 = time.perf_counter()
    mode = res.laplace.linear_mode(args.solver, **solver_opts)
    theta_lin_s = time.perf_counter() - t1
    mean, sd = res.mean.double(), res.std.double()
    xt = x.double()
    return {
        "seconds": total,
        "cpu_seconds": cpu,
        "timings": timings,
        "theta_lin_cold_s": theta_lin_s,
        "theta_lin_residual": mode.residual,
        "theta_lin_converged": bool(mode.converged),
        "noise_var": res.noise_var,
        "true_noise_var": std**2,
        "noise_var_trajectory": res.trajectories.get("noise_var"),
        "em_converged": res.trajectories.get("converged"),
        "sample_batches": res.diagnostics["sample_batches"],
        "psnr": psnr(mean, xt),
        "coverage": {str(k): v for k, v in coverage(xt, mean, sd).items()},
        "zscore": zscore_stats(xt, mean, sd.clamp_min(1e-12)),
        "std_error_correlation": std_error_correlation(xt, mean, sd),
        "mean_std": float(sd.mean()),
        "rmse": float((mean - xt).pow(2).mean().sqrt()),
    }


def child(args) -> int:
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    out = stage_dip(args) if args.stage == "dip" else stage_uq(args)
    out["peak_mib"] = _peak_mib()
    out["loadavg_start"], out["loadavg_end"] = load0, os.getloadavg()
    _atomic_json(out, args.out / f"{args.stage}.json")
    return 0


def table(r: dict) -> str:
    dip, uq = r["dip"], r["uq"]
    t = uq["timings"]
    lines = [
        "| stage | wall s | × DIP | CPU s | × DIP (CPU) | peak MiB | load avg (1 min) start → end |",
        "|---|---|---|---|---|---|---|",
        f"| DIP ({dip['iterations']} it, {dip['it_per_s']:.2f} it/s) | {dip['seconds']:.0f} | 1 | "
        f"{dip['cpu_seconds']:.0f} | 1 | {dip['peak_mib']:.0f} | "
        f"{dip['loadavg_start'][0]:.1f} → {dip['loadavg_end'][0]:.1f} |",
        f"| UQ total | {uq['seconds']:.0f} | {uq['seconds'] / dip['seconds']:.2f} | "
        f"{uq['cpu_seconds']:.0f} | {uq['cpu_seconds'] / dip['cpu_seconds']:.2f} | "
        f"{uq['peak_mib']:.0f} | {uq['loadavg_start'][0]:.1f} → {uq['loadavg_end'][0]:.1f} |",
        f"| · EM ({r['args']['em_cycles']} cycles × {r['args']['em_samples']} samples, "
        f"incl. θ_lin) | {t['hyperparameters']:.0f} | {t['hyperparameters'] / dip['seconds']:.2f}"
        " | | | | |",
        f"| · std-map samples ({r['args']['samples']}) | {t['samples']:.0f} | "
        f"{t['samples'] / dip['seconds']:.2f} | | | | |",
        f"| · (one cold θ_lin solve, outside the total) | {uq['theta_lin_cold_s']:.0f} | "
        f"{uq['theta_lin_cold_s'] / dip['seconds']:.2f} | | | | |",
        "",
        f"PSNR {dip['psnr']:.2f} dB; DIP data misfit "
        f"{dip.get('data_misfit', float('nan')) / dip['true_noise_var']:.2f}× the noise; σ² learned {uq['noise_var']:.4g} vs true "
        f"{uq['true_noise_var']:.4g}; 50/90/95 % coverage "
        + " / ".join(f"{100 * v:.1f} %" for v in uq["coverage"].values())
        + f"; z-score mean {uq['zscore']['mean']:.2f}, std {uq['zscore']['std']:.2f}; "
        f"corr(std, |error|) {uq['std_error_correlation']:.2f}; mean std {uq['mean_std']:.4f} "
        f"vs RMSE {uq['rmse']:.4f}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--views", type=int, default=60)
    p.add_argument("--noise", type=float, default=0.05)
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--dip-iterations", type=int, default=400)
    p.add_argument("--lr", type=float, default=3e-3)
    # TV is a sum over voxels, the data term a mean over measurements: 1e-4 (methods §5 at
    # 28²) over-smooths a 32³-64³ volume (the DIP stalls at 24-33× the noise); 1e-6 fits
    p.add_argument("--tv", type=float, default=1e-6)
    p.add_argument("--solver", default="cg", choices=("cg", "sgd", "sdd"))
    p.add_argument(
        "--solver-opts",
        default='{"iterations": 30, "tol": 0.01, "precond_rank": 0}',
        help="JSON dict passed to the solver",
    )
    p.add_argument(
        "--float64", action="store_true", help="linearised stage in float64 (CG on CT kernels)"
    )
    p.add_argument("--em-cycles", type=int, default=3)
    p.add_argument("--em-samples", type=int, default=4)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("runs/uq_3d"))
    p.add_argument("--stage", choices=("dip", "uq"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage:
        return child(args)
    argv = list(sys.argv[1:] if argv is None else argv)
    results = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    for stage in ("dip", "uq"):
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--stage", stage]
        rc = subprocess.run(cmd).returncode
        if rc != 0:
            raise SystemExit(f"stage {stage} failed with exit code {rc}")
        results[stage] = json.loads((args.out / f"{stage}.json").read_text())
        print(f"{stage}: {results[stage]['seconds']:.1f} s", flush=True)
    results["uq_over_dip"] = results["uq"]["seconds"] / results["dip"]["seconds"]
    _atomic_json(results, args.out / "results.json")
    md = table(results)
    tmp = args.out / "table.md.tmp"
    tmp.write_text(md)
    os.replace(tmp, args.out / "table.md")
    print(md)
    return 0 if math.isfinite(results["uq_over_dip"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())

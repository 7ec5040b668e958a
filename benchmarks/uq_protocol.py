"""The sparse-view uncertainty protocol of the linearised-DIP literature (methods §5-6).

28×28 images, parallel beam on [−14, 14]² with 41 bins (``kmnist_operator``), {5, 10, 20, 30}
angles, {5, 10} % noise (std = rel · mean|Ax|), DIP settings of methods §5 (γ, iterations per
setting; ``--iter-scale`` shrinks the budgets for CPU runs). Per image: one DIP fit, then
linearised DIP with EM, exact MLL and TV-MAP (the dense ones use exact covariances), and the baselines
DIP σ²=1, DIP with the learned σ² (both N(x*, δI)) and DIP-MCDO (its own dropout DIP fit).
Reports mean ± stderr over images of the exact and patch (p = 1, 2, 10) test
log-likelihoods, PSNR and 90 % coverage, and the DIP vs UQ wall-clock times. Writes
``OUT/results.json`` and ``OUT/table.md``.

Backprojected-noise correction δ = σ² Σ_{j≤k} s_j⁻² / n_vox (methods §6): the variance that
white sinogram noise leaves in the least-squares reconstruction on the top-k singular
directions of A, k chosen per image by the discrepancy principle at the true σ_y²
(:func:`dip_uq.uq.evaluation.discrepancy_rank`). The same k serves every method; σ² is the
method's own (learned for linearised DIP, 1 or learned for the σ² baselines, the true σ_y²
for DIP-MCDO, which has no noise model). Each image also records δ under the old
``rcond=1e-3`` rule, the DIP's squared error and each method's mean predictive variance.

    .venv/bin/python benchmarks/uq_protocol.py                        # generated images
    .venv/bin/python benchmarks/uq_protocol.py --images kmnist-test-imgs.npz --n-images 50
    .venv/bin/python benchmarks/uq_protocol.py --angles 20 --noise 0.05 --n-images 2 --iter-scale 0.05
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dip_uq import reconstruct_with_uncertainty  # noqa: E402
from dip_uq.dip import fit_dip  # noqa: E402
from dip_uq.io.datasets.kmnist import kmnist_operator, load_images  # noqa: E402
from dip_uq.uq.baselines import dip_mcdo, dip_noise_baseline  # noqa: E402
from dip_uq.uq.evaluation import (  # noqa: E402
    backprojected_noise_delta,
    discrepancy_rank,
    evaluate_uq,
)
from operators.noise import add_gaussian_noise  # noqa: E402
from operators.phantoms import random_ellipses  # noqa: E402

#: (γ, iterations) of methods §5 by (noise, angles)
DIP_SETTINGS = {
    (0.05, 5): (1e-5, 14000),
    (0.05, 10): (3e-5, 29000),
    (0.05, 20): (1e-4, 41000),
    (0.05, 30): (1e-4, 50000),
    (0.10, 5): (3e-5, 7400),
    (0.10, 10): (1e-4, 13000),
    (0.10, 20): (3e-4, 17000),
    (0.10, 30): (3e-4, 22000),
}
METHODS = (
    "lin-DIP EM",  # one tied prior variance (tied=True)
    "lin-DIP EM per-block",  # the methods' tied-then-per-block schedule (the pipeline default)
    "lin-DIP MLL",
    "lin-DIP TV-MAP",
    "DIP sigma2=1",
    "DIP learned sigma2",
    "DIP-MCDO",
)
#: optional methods (``--methods`` names them explicitly)
EXTRA_METHODS: tuple[str, ...] = ()


def test_images(n: int, seed: int = 0) -> torch.Tensor:
    """Generated 28×28 test images in [0, 1] (random ellipses), when no files are given."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([random_ellipses(28, n_ellipses=8, generator=g) for _ in range(n)])


def net_overrides(args) -> dict:
    """Changes to the ``small`` preset shared by the plain DIP and DIP-MCDO's dropout net."""
    out = {}
    if args.channels:
        out["channels"] = (args.channels,) * 3
    if args.output == "linear":
        out["use_sigmoid"] = False
    return out


def run_image(x, n_angles, noise, args, seed):
    op = kmnist_operator(n_angles)
    g = torch.Generator().manual_seed(seed)
    y, std = add_gaussian_noise(op(x), rel=noise, generator=g)
    gamma, its = DIP_SETTINGS[(noise, n_angles)]
    its = max(50, int(its * args.iter_scale))
    rank = discrepancy_rank(y, op, std**2)
    delta = backprojected_noise_delta(op, std**2, rank=rank)
    t0 = time.perf_counter()
    overrides = net_overrides(args)
    net = None
    if overrides:
        from dip_uq.dip import UNet

        net = UNet.from_preset("small", generator=g, **overrides)
    dip = fit_dip(
        y, op, net=net, tv_weight=gamma, iterations=its, lr=args.lr, generator=g, progress=False
    )
    t_dip = time.perf_counter() - t0
    out, times = {}, {"DIP": t_dip}
    learned = None
    common = dict(
        dip=dip, solver=args.solver, n_samples=args.n_samples, keep_samples=True, progress=False
    )
    variants = (
        ("lin-DIP EM", "em", {"tied": True}),
        ("lin-DIP MLL", "mll", {}),
        ("lin-DIP TV-MAP", "tv-map", {}),
        ("lin-DIP EM per-block", "em", {"tied": False}),
    )
    for name, hyper, extra in variants:
        if name not in args.methods:
            continue
        t0 = time.perf_counter()
        try:
            res = reconstruct_with_uncertainty(
                y,
                op,
                hyper=hyper,
                **extra,
                tv_weight=gamma,
                em_cycles=args.em_cycles,
                em_samples=args.em_samples,
                exact_covariance=True,
                generator=torch.Generator().manual_seed(seed),
                **common,
            )
            # a diverged σ² (EM's γ̂ at n_obs) can leave a non-positive-definite covariance
            scores = evaluate_uq(res, x, delta=delta * res.noise_var / std**2)
        except (FloatingPointError, torch.linalg.LinAlgError, ValueError) as err:  # reported
            print(f"{name}: {err}", flush=True)
            out[name + " failed"] = str(err)[:500]
            continue
        times[name] = time.perf_counter() - t0
        out[name] = scores
        out[name]["noise_var"] = res.noise_var
        out[name]["mean_var"] = float(res.std.double().pow(2).mean())
        out[name]["timings"] = res.diagnostics["timings"]
        if name == "lin-DIP EM":
            learned = res.noise_var
    out["true_noise_var"] = std**2
    out["delta"] = {
        "rank": rank,
        "n_obs": int(y.numel()),
        "true_sigma2": delta,
        "rcond_1e-3": backprojected_noise_delta(op, std**2, rcond=1e-3),
        "dip_mse": float((dip.image.reshape(x.shape).double() - x.double()).pow(2).mean()),
    }
    img = dip.image.reshape(x.shape)
    if "DIP sigma2=1" in args.methods:
        out["DIP sigma2=1"] = evaluate_uq(dip_noise_baseline(img, op, 1.0, rank=rank), x)
    if "DIP learned sigma2" in args.methods and learned is not None:
        out["DIP learned sigma2"] = evaluate_uq(dip_noise_baseline(img, op, learned, rank=rank), x)
    if "DIP-MCDO" in args.methods:
        t0 = time.perf_counter()
        mc = dip_mcdo(
            y,
            op,
            net_overrides=overrides or None,
            tv_weight=gamma,
            iterations=its,
            lr=args.lr,
            n_samples=args.n_samples,
            generator=torch.Generator().manual_seed(seed),
            progress=False,
        )
        times["DIP-MCDO"] = time.perf_counter() - t0
        out["DIP-MCDO"] = evaluate_uq(mc, x, delta=delta)
        out["DIP-MCDO"]["mean_var"] = float(mc.std.double().pow(2).mean())
    out["seconds"] = times
    return out


def summarise(rows: list[dict]) -> dict:
    def ms(vals):
        vals = [v for v in vals if v is not None and math.isfinite(v)]
        if not vals:
            return None
        se = statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else float("nan")
        return (statistics.fmean(vals), se)

    summary = {}
    for m in METHODS + EXTRA_METHODS:
        have = [r[m] for r in rows if m in r]
        if not have:
            continue
        summary[m] = {
            "test_ll": ms([h["test_log_likelihood"] for h in have]),
            **{
                f"patch_ll_{p}": ms([h["patch_log_likelihood"].get(p) for h in have])
                for p in ("1", "2", "10")
            },
            "psnr": ms([h["psnr"] for h in have]),
            "coverage_90": ms([h["coverage"]["0.9"] for h in have]),
            "mean_var": ms([h.get("mean_var") for h in have]),
            "noise_var": ms([h.get("noise_var") for h in have]),
        }
    summary["delta"] = {
        k: ms([r["delta"][k] for r in rows if "delta" in r])
        for k in ("rank", "true_sigma2", "rcond_1e-3", "dip_mse")
    }
    summary["true_noise_var"] = ms([r["true_noise_var"] for r in rows])
    summary["seconds"] = {
        k: ms([r["seconds"][k] for r in rows if k in r["seconds"]])
        for k in ("DIP", "lin-DIP EM", "lin-DIP MLL", "lin-DIP TV-MAP", "DIP-MCDO")
    }
    return summary


def table(results: dict) -> str:
    fmt = lambda v: "n/a" if v is None else f"{v[0]:.3f} ± {v[1]:.3f}"  # noqa: E731
    sci = lambda v: "n/a" if v is None else f"{v[0]:.3g} ± {v[1]:.2g}"  # noqa: E731
    lines = [
        "| setting | method | test LL (exact) | patch LL p=1 | p=2 | p=10 | PSNR | 90% coverage |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for setting, s in results.items():
        for m in METHODS + EXTRA_METHODS:
            if m not in s:
                continue
            r = s[m]
            lines.append(
                f"| {setting} | {m} | {fmt(r['test_ll'])} | {fmt(r['patch_ll_1'])} | "
                f"{fmt(r['patch_ll_2'])} | {fmt(r['patch_ll_10'])} | {fmt(r['psnr'])} | "
                f"{fmt(r['coverage_90'])} |"
            )
    lines += [
        "",
        "| setting | discrepancy rank k | δ (k, true σ²) | δ (rcond 1e-3) | DIP mse | "
        "mean var EM | mean var MCDO | true σ² | EM σ² |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for setting, s in results.items():
        d = s.get("delta", {})
        lines.append(
            f"| {setting} | {fmt(d.get('rank'))} | {sci(d.get('true_sigma2'))} | "
            f"{sci(d.get('rcond_1e-3'))} | {sci(d.get('dip_mse'))} | "
            f"{sci(s.get('lin-DIP EM', {}).get('mean_var'))} | "
            f"{sci(s.get('DIP-MCDO', {}).get('mean_var'))} | {sci(s.get('true_noise_var'))} | "
            f"{sci(s.get('lin-DIP EM', {}).get('noise_var'))} |"
        )
    lines += [
        "",
        "| setting | DIP s | lin-DIP EM s | lin-DIP MLL s | lin-DIP TV-MAP s | DIP-MCDO s |",
        "|---|---|---|---|---|---|",
    ]
    for setting, s in results.items():
        t = s["seconds"]
        lines.append(
            f"| {setting} | "
            + " | ".join(
                fmt(t.get(k))
                for k in ("DIP", "lin-DIP EM", "lin-DIP MLL", "lin-DIP TV-MAP", "DIP-MCDO")
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=Path, help="KMNIST file or a folder of 28x28 images")
    p.add_argument("--n-images", type=int, default=5)
    p.add_argument(
        "--only-images", type=int, nargs="+", help="run these image indices (of --n-images)"
    )
    p.add_argument("--angles", type=int, nargs="+", default=[5, 10, 20, 30])
    p.add_argument("--noise", type=float, nargs="+", default=[0.05, 0.10])
    p.add_argument("--iter-scale", type=float, default=1.0, help="scale the DIP budgets")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument(
        "--channels", type=int, default=0, help="U-Net channels (0: the small preset, 32)"
    )
    p.add_argument(
        "--output",
        choices=("sigmoid", "linear"),
        default="sigmoid",
        help="U-Net output of every DIP (plain and MCDO): 'sigmoid' is the small preset's "
        "(trained with fit_dip's saturation barrier); 'linear' has none",
    )
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--solver", default="cg", choices=("cg", "exact", "sgd", "sdd"))
    p.add_argument("--em-cycles", type=int, default=8)
    p.add_argument("--em-samples", type=int, default=16)
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("runs/uq_protocol"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.images is not None:
        xs = load_images(args.images, n=args.n_images)
        if tuple(xs.shape[1:]) != (28, 28):
            raise SystemExit(
                f"{args.images}: the protocol needs 28x28 images, got {tuple(xs.shape[1:])}"
            )
    else:
        xs = test_images(args.n_images)
    args.out.mkdir(parents=True, exist_ok=True)
    results, raw = {}, {}
    for noise in args.noise:
        for n_angles in args.angles:
            key = f"{n_angles} angles, {round(100 * noise)}% noise"
            rows = []
            for i, x in enumerate(xs):
                if args.only_images is not None and i not in args.only_images:
                    continue
                rows.append(run_image(x, n_angles, noise, args, seed=i))
                print(f"{key}: image {i + 1}/{len(xs)} done", flush=True)
                raw[key] = rows  # partial results survive an interrupted run
                (args.out / "partial.json").write_text(json.dumps(raw, indent=2, default=str))
            results[key] = summarise(rows)
    (args.out / "results.json").write_text(
        json.dumps({"args": vars(args), "summary": results, "raw": raw}, indent=2, default=str)
    )
    md = table(results)
    (args.out / "table.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

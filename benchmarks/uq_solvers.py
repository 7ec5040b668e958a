"""Issue 5, done-when 1 on the protocol problem: 28×28 image, 20 angles, 5 % noise.

Parallel beam on [−14, 14]² with 41 bins (``kmnist_operator(20)``), noise std = 5 % of
mean|A x|, the ``small`` U-Net (3 scales, 32 channels, skips [0, 4, 4], sigmoid; d = 76,608
conv weights) fitted by DIP + TV (γ = 1e-4). Methods §5 trains 41,000 Adam steps at lr 1e-4;
on two shared CPU cores we train ``--dip-iterations`` steps (default 4000) at lr 1e-3, and
cache the fit per image in ``--cache`` so the checks can be rerun.

Three checks per image:

(a) **solvers**: σ² fixed at the truth, one tied prior variance ``--prior-var``, Matérn prior.
    Median over pixels of |std_solver / std_exact − 1|, exact = sqrt diag of the dense
    J H⁻¹ Jᵀ, for ``cg`` and ``sgd`` (``--samples`` samples; the Monte-Carlo error alone is
    about 1/sqrt(2 K) per pixel, so K ≥ 256 is needed to resolve 10 %).
(b) **noise variance**: EM (cg samples, function-space γ), EM with exact γ (dense), the
    pipeline's exact MLL (L-BFGS on the dense evidence, with the Matérn lengthscales) and the
    engine's :func:`maximise_evidence` (prior variance + σ², lengthscales held) agree.
(c) the learned σ² against the true noise variance (``--images`` images: mean ± spread).

    .venv/bin/python benchmarks/uq_solvers.py --images 3 --out runs/uq_solvers.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dip_uq import reconstruct_with_uncertainty  # noqa: E402
from dip_uq.dip import DIPResult, UNet, fit_dip  # noqa: E402
from dip_uq.io.datasets.kmnist import kmnist_operator  # noqa: E402
from dip_uq.uq.linearised import exact_image_covariance, tied_evidence_maximiser  # noqa: E402
from operators.noise import add_gaussian_noise  # noqa: E402
from operators.phantoms import random_ellipses  # noqa: E402

#: sgd options: with the pipeline's automatic momentum (0.9957 here, from κ ≈ 2e5) 3000 steps
#: reproduce the exact samples of the same draws to 0.05 % (median over pixels)
SGD_OPTS = {"iterations": 3000, "tol": 1e-4}


def protocol_problem(seed: int, n_angles: int = 20, noise: float = 0.05):
    """x ``(28, 28)`` random ellipses, the protocol operator, y and the true noise std."""
    g = torch.Generator().manual_seed(seed)
    x = random_ellipses(28, n_ellipses=8, generator=g)
    op = kmnist_operator(n_angles)
    y, std = add_gaussian_noise(op(x), rel=noise, generator=g)
    return x, op, y, std, g


def cached_dip(
    seed: int, iterations: int, lr: float, cache: Path | None, tv_weight: float = 1e-4
) -> tuple[dict, DIPResult]:
    """The problem of image ``seed`` and its DIP fit (``small`` preset), cached on disk."""
    x, op, y, std, g = protocol_problem(seed)
    prob = {"x": x, "op": op, "y": y, "std": std}
    path = None if cache is None else cache / f"dip_{seed}_{iterations}_{lr:g}.pt"
    if path is not None and path.exists():
        st = torch.load(path, weights_only=False)
        net = UNet.from_preset("small")
        net.load_state_dict(st["net"])
        net.eval()
        with torch.no_grad():
            img = net(st["input"]).reshape(28, 28)
        dip = DIPResult(
            img, net, st["loss"], st["best"], float(st["loss"][st["best"]]), st["input"], iterations
        )
        prob["dip_seconds"] = st["seconds"]
        return prob, dip
    t0 = time.perf_counter()
    dip = fit_dip(
        y, op, tv_weight=tv_weight, iterations=iterations, lr=lr, generator=g, progress=False
    )
    prob["dip_seconds"] = time.perf_counter() - t0
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(
            {
                "net": dip.net.state_dict(),
                "input": dip.input,
                "loss": dip.loss_history,
                "best": dip.best_iteration,
                "seconds": prob["dip_seconds"],
            },
            tmp,
        )
        tmp.replace(path)
    return prob, dip


def std_errors(prob, dip, args) -> dict:
    """(a): median |std/std_exact − 1| of cg and sgd at fixed (true σ², tied prior variance)."""
    y, op = prob["y"], prob["op"]
    kw = dict(
        dip=dip,
        prior="matern",
        hyper="fixed",
        noise_var=prob["std"] ** 2,
        prior_variance=args.prior_var,
        progress=False,
    )
    t0 = time.perf_counter()
    base = reconstruct_with_uncertainty(y, op, solver="cg", n_samples=1, **kw)
    exact_std = exact_image_covariance(base.laplace).diagonal().sqrt().reshape(28, 28)
    out = {"exact_seconds": time.perf_counter() - t0}
    live = exact_std > 1e-6 * float(exact_std.max())
    out["live_pixels"] = int(live.sum())
    same = None
    if args.same_noise:  # exact samples from the same draws: isolates the solver's own error
        same = reconstruct_with_uncertainty(
            y,
            op,
            solver="exact",
            n_samples=args.samples,
            sample_batch=args.samples,
            generator=torch.Generator().manual_seed(1),
            **kw,
        ).std
    for solver in args.solvers:
        opts = dict(SGD_OPTS, iterations=args.sgd_iterations) if solver == "sgd" else {}
        t0 = time.perf_counter()
        res = reconstruct_with_uncertainty(
            y,
            op,
            solver=solver,
            n_samples=args.samples,
            sample_batch=args.samples,
            solver_opts=opts,
            generator=torch.Generator().manual_seed(1),
            **kw,
        )
        rel = (res.std[live].double() / exact_std[live] - 1).abs()
        b = res.diagnostics["sample_batches"]
        out[solver] = {
            "median_rel_std_error": float(rel.median()),
            "mean_ratio": float((res.std[live].double() / exact_std[live]).mean()),
            "median_rel_error_vs_same_noise_exact": None
            if same is None
            else float((res.std[live] / same[live] - 1).abs().median()),
            "sgd_momentum": res.diagnostics["sgd_momentum"],
            "seconds": time.perf_counter() - t0,
            "iterations": [x["iterations"] for x in b],
            "residual": [x["residual"] for x in b],
            "converged": [x["converged"] for x in b],
        }
        print(solver, out[solver], flush=True)
    return out


def noise_variances(prob, dip, args) -> dict:
    """(b), (c): σ² from EM (cg samples, function γ), EM (exact γ), the exact evidence
    maximiser and, with ``--mll``, the pipeline's MLL. Tied Normal prior, so that all of them
    maximise the same two-parameter evidence."""
    y, op = prob["y"], prob["op"]
    kw = dict(dip=dip, prior="normal", tied=True, n_samples=2, progress=False)
    out = {"true": prob["std"] ** 2}
    t0 = time.perf_counter()
    em = reconstruct_with_uncertainty(
        y,
        op,
        hyper="em",
        solver="cg",
        em_cycles=args.em_cycles,
        em_samples=args.em_samples,
        generator=torch.Generator().manual_seed(0),
        **kw,
    )
    out["em_cg"] = {
        "noise_var": em.noise_var,
        "prior_variance": em.prior_variance["inc"],
        "trajectory": em.trajectories["noise_var"],
        "gamma": [sum(g) for g in em.trajectories["gamma"]],
        "seconds": time.perf_counter() - t0,
    }
    print("em_cg", out["em_cg"], flush=True)
    t0 = time.perf_counter()
    v, nv, ev = tied_evidence_maximiser(em.laplace)
    out["exact_evidence"] = {
        "noise_var": nv,
        "prior_variance": v,
        "log_evidence": ev,
        "seconds": time.perf_counter() - t0,
    }
    print("exact_evidence", out["exact_evidence"], flush=True)
    if args.em_exact:
        t0 = time.perf_counter()
        emx = reconstruct_with_uncertainty(
            y, op, hyper="em", solver="exact", em_cycles=args.em_cycles, em_estimator="exact", **kw
        )
        out["em_exact"] = {
            "noise_var": emx.noise_var,
            "prior_variance": emx.prior_variance["inc"],
            "trajectory": emx.trajectories["noise_var"],
            "seconds": time.perf_counter() - t0,
        }
        print("em_exact", out["em_exact"], flush=True)
    if args.mll:
        t0 = time.perf_counter()
        mll = reconstruct_with_uncertainty(y, op, hyper="mll", solver="exact", **kw)
        out["mll"] = {
            "noise_var": mll.noise_var,
            "prior_variance": mll.prior_variance["inc"],
            "seconds": time.perf_counter() - t0,
        }
        print("mll", out["mll"], flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1, help="images (seeds 0..N-1) for (b), (c)")
    p.add_argument("--dip-iterations", type=int, default=4000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--prior-var", type=float, default=0.06)
    p.add_argument("--sgd-iterations", type=int, default=SGD_OPTS["iterations"])
    p.add_argument("--solvers", nargs="*", default=["cg", "sgd"])
    p.add_argument("--em-cycles", type=int, default=8)
    p.add_argument("--em-samples", type=int, default=64)
    p.add_argument("--skip-noise", action="store_true", help="only check (a)")
    p.add_argument("--em-exact", action="store_true", help="also EM with dense exact γ")
    p.add_argument(
        "--same-noise", action="store_true", help="(a) also against exact samples, same draws"
    )
    p.add_argument("--mll", action="store_true", help="also the pipeline's dense MLL (slow)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", type=Path, default=Path("runs/uq_solvers_cache"))
    p.add_argument("--out", type=Path, default=Path("runs/uq_solvers.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out: dict = {"settings": vars(args) | {"cache": str(args.cache), "out": str(args.out)}}
    for seed in range(args.images):
        prob, dip = cached_dip(seed, args.dip_iterations, args.lr, args.cache)
        row: dict = {"dip_seconds": prob["dip_seconds"], "true_noise_var": prob["std"] ** 2}
        if seed == 0 and args.solvers:
            row["solvers"] = std_errors(prob, dip, args)
        if not args.skip_noise:
            row["noise"] = noise_variances(prob, dip, args)
        out[f"image_{seed}"] = row
        _write(args.out, out)
    if not args.skip_noise:
        rel = {
            m: [
                out[f"image_{s}"]["noise"][m]["noise_var"] / out[f"image_{s}"]["true_noise_var"] - 1
                for s in range(args.images)
            ]
            for m in ("em_cg", "em_exact", "mll", "exact_evidence")
            if m in out["image_0"]["noise"]
        }
        out["summary_rel_noise_error"] = {
            m: {"mean": statistics.fmean(v), "min": min(v), "max": max(v)} for m, v in rel.items()
        }
    _write(args.out, out)
    print(json.dumps(out, indent=2, default=str))
    return 0


def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


if __name__ == "__main__":
    raise SystemExit(main())

"""Std maps of the scalable solvers against the exact linearised posterior (issue 5, done-when 1).

28×28 random-ellipse image, protocol operator (parallel beam, 41 bins) with 20 angles, 5 %
noise, the ``small`` U-Net (d = 76,608 conv weights) fitted by DIP. Hyperparameters fixed
(noise variance = the true one, tied prior variance ``--prior-var``) so that every solver
targets the same posterior. Reports the median over pixels of |std_solver / std_exact − 1|
(exact = diag of the dense J H⁻¹ Jᵀ) and the wall-clock time of each solver.

    .venv/bin/python benchmarks/uq_solvers.py --dip-iterations 2000 --samples 128
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dip_uq import reconstruct_with_uncertainty  # noqa: E402
from dip_uq.datasets.kmnist import kmnist_operator  # noqa: E402
from dip_uq.dip import fit_dip  # noqa: E402
from dip_uq.pipeline import exact_image_covariance  # noqa: E402
from operators.noise import add_gaussian_noise  # noqa: E402
from operators.phantoms import random_ellipses  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dip-iterations", type=int, default=2000)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--prior-var", type=float, default=0.06)
    p.add_argument("--sgd-iterations", type=int, default=3000)
    p.add_argument("--solvers", nargs="+", default=["cg", "sgd"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("runs/uq_solvers.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = random_ellipses(28, n_ellipses=8, generator=g)
    op = kmnist_operator(20)
    y, std = add_gaussian_noise(op(x), rel=0.05, generator=g)
    t0 = time.perf_counter()
    dip = fit_dip(
        op, y, tv_weight=1e-4, iterations=args.dip_iterations, lr=1e-3, generator=g, progress=False
    )
    out = {"dip_seconds": time.perf_counter() - t0, "true_noise_var": std**2}
    kw = dict(
        dip=dip, hyper="fixed", noise_var=std**2, prior_variance=args.prior_var, progress=False
    )
    t0 = time.perf_counter()
    base = reconstruct_with_uncertainty(y, op, solver="cg", n_samples=1, **kw)
    cov = exact_image_covariance(base.laplace)
    exact_std = cov.diagonal().sqrt().reshape(28, 28)
    out["exact_seconds"] = time.perf_counter() - t0
    live = exact_std > 1e-6 * float(exact_std.max())
    for solver in args.solvers:
        opts = {"iterations": args.sgd_iterations} if solver in ("sgd", "sdd") else {}
        t0 = time.perf_counter()
        res = reconstruct_with_uncertainty(
            y,
            op,
            solver=solver,
            n_samples=args.samples,
            solver_opts=opts,
            generator=torch.Generator().manual_seed(1),
            **kw,
        )
        rel = (res.std[live] / exact_std[live].to(res.std.dtype) - 1).abs()
        out[solver] = {
            "median_rel_std_error": float(rel.median()),
            "seconds": time.perf_counter() - t0,
            "converged": [b["converged"] for b in res.diagnostics["sample_batches"]],
        }
        print(solver, out[solver], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Linearised Laplace for general networks: ours (streamed EM) vs laplace-torch, side by side.

1. Digits (MLP, classification) and diabetes (MLP, regression): one MAP network each, shared by
   both sides; test NLL / ECE / accuracy (classification) or NLL / RMSE (regression) and wall
   time. Digits three ways: ``digits`` (Adam with weight decay 1e-4, 60 epochs: a calibrated
   MAP), ``digits-ml`` (no weight decay, 1000 epochs, training loss ~0: the usual
   overconfident MAP) and ``digits-noisy`` (20 % label noise in train and test).
   laplace-torch: full and KFAC GGN, prior precision by ``marglik``, GLM predictive (probit).
   Ours: ``Laplace(..., prior="scalar")`` + EM (which also fits σ for regression), with the
   softmax curvature at the network's logits (``network``) and at the tangent
   model's mode (``mode``, the default).
2. Scaling: a ResNet-18 (width 64, 11.2M weights; ``--width``) with BatchNorm on 32×32
   synthetic images, growing numbers of data points and classes (``--sizes``): time per EM
   cycle and peak resident memory (each configuration in a fresh process), and what
   laplace-torch does on the same network. Every worker runs under an address-space cap
   (``--mem-gb``, RLIMIT_AS), so an out-of-memory attempt fails cleanly with an error.

laplace-torch is optional: give its interpreter with ``--laplace-python`` (a separate venv; it is
never a dependency of dip-uq; ``pip install torch==2.13.0 laplace-torch==0.3
curvlinops-for-pytorch==3.0.1 scikit-learn`` then ``pip uninstall torchvision``, whose wheel does
not load with the CPU torch). Without it only our side runs.

    python benchmarks/general.py --quick
    python benchmarks/general.py --only scaling --sizes 16x10,48x10 --k-scaling 2 --cg-iter 1
    python benchmarks/general.py --laplace-python /tmp/benchvenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# benchmarks/ holds a laplace.py of its own: keep it from shadowing the laplace-torch package
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------------------- workers
def _data(task: str, n_train=None):
    from dip_uq.examples import diabetes_loaders, digits_loaders

    if task.startswith("digits"):
        noise = 0.2 if task == "digits-noisy" else 0.0  # digits-ml: clean digits
        return digits_loaders(128, n_train=n_train, label_noise=noise)
    return diabetes_loaders(64)


def _make(task: str, classes: int = 10, width: int = 8):
    from dip_uq.examples import MLP, ResNet18ish

    if task.startswith("digits"):
        return MLP(64, 10, (50,))
    if task == "diabetes":
        return MLP(10, 1, (50,))
    return ResNet18ish(classes, width)


def _scores(task, pred, yt):
    from dip_uq import metrics

    if task == "diabetes":
        mean, var = pred
        return {
            "nll": metrics.gaussian_nll(yt, mean, var),
            "rmse": metrics.rmse(yt, mean),
            "cov90": metrics.coverage(yt, mean, var.sqrt(), levels=(0.9,))[0.9],
        }
    return {
        "nll": metrics.classification_nll(pred, yt),
        "ece": metrics.expected_calibration_error(pred, yt),
        "acc": metrics.accuracy(pred, yt),
    }


def worker_ours(cfg: dict) -> dict:
    from torch.utils.data import DataLoader

    from dip_uq.examples import synthetic_images
    from dip_uq.laplace.front import Laplace

    torch.set_num_threads(cfg.get("threads", 1))
    if cfg["task"] == "resnet":
        net = _make("resnet", cfg["classes"], cfg["width"]).eval()
        loader = DataLoader(
            synthetic_images(cfg["n"], cfg["classes"]), batch_size=cfg.get("batch", 32)
        )
        la = Laplace(
            net,
            "classification",
            n_samples=cfg["k"],
            newton_steps=1,
            curvature="network",  # the scaling figures' setting (docs/laplace.md)
            solver_opts={"iterations": cfg["cg_iter"], "tol": 1e-9},
        )
        t0 = time.perf_counter()
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fixed CG budget on purpose
            la.fit(loader, solve=False)
            t1 = time.perf_counter()
            la._solve_all()
            la.optimize_prior_precision("em", n_steps=cfg["em"])
        t2 = time.perf_counter()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {
            "fit_s": t1 - t0,
            "em_cycle_s": (t2 - t1) / (cfg["em"] + 1),
            "peak_rss_mb": rss,
            "d": la.d,
        }
    net = _make(cfg["task"])
    net.load_state_dict(torch.load(cfg["weights"], weights_only=True))
    net.eval()
    _, trfit, (xt, yt) = _data(cfg["task"], cfg.get("n_train"))
    kind = "regression" if cfg["task"] == "diabetes" else "classification"
    t0 = time.perf_counter()
    la = Laplace(
        net,
        kind,
        prior="scalar",
        n_samples=cfg["k"],
        generator=torch.Generator().manual_seed(cfg.get("seed", 0)),
        curvature=cfg.get("curvature", "network"),
    )
    la.fit(trfit)
    la.optimize_prior_precision("em", n_steps=cfg["em"])
    pred = la(xt, link_approx="probit")
    wall = time.perf_counter() - t0
    if kind == "regression":
        pred = (pred[0], pred[1] + la.sigma_noise**2)
    out = _scores(cfg["task"], pred, yt)
    out.update(wall_s=wall, prior_precision=la.prior_precision.tolist(), sigma=la.sigma_noise)
    return out


def gamma_spread(task: str, k: int = 64) -> dict:
    """Per-sample spread of the two sampled γ̂ for a scalar prior on the task's MAP network
    (exact K draws): function space ‖G z_k‖² against paired ‖ξ_k‖² − ‖L⁻¹z_k‖², with the
    exact γ. Decides the front door's estimator for one prior block."""
    from dip_uq.examples import train
    from dip_uq.laplace.front import Laplace

    torch.manual_seed(0)
    tr, trfit, _ = _data(task)
    settings = {"digits-ml": {"epochs": 1000, "lr": 1e-2, "weight_decay": 0.0}}
    net = train(_make(task), tr, "ce", **settings.get(task, {"epochs": 60, "lr": 1e-2})).eval()
    la = Laplace(net, "classification", prior="scalar", n_samples=k, solver="exact",
                 generator=torch.Generator().manual_seed(0))  # fmt: skip
    la.fit(trfit)
    z = la.samples
    fn = (z * la._system().ggn_mv(z)).sum(1).double()
    pa = (la.xi.double() ** 2).sum(1) - (la._Linv(z).double() ** 2).sum(1)
    return {"exact": float(la._block_gamma().gamma.sum()), "k": k,
            "function": [float(fn.mean()), float(fn.std())],
            "paired": [float(pa.mean()), float(pa.std())]}  # fmt: skip


def worker_laplace_torch(cfg: dict) -> dict:
    from laplace import Laplace as LT

    torch.set_num_threads(cfg.get("threads", 1))
    res = {}
    if cfg["task"] == "resnet":
        from torch.utils.data import DataLoader

        from dip_uq.examples import synthetic_images

        net = _make("resnet", cfg["classes"], cfg["width"]).eval()
        loader = DataLoader(
            synthetic_images(cfg["n"], cfg["classes"]), batch_size=cfg.get("batch", 32)
        )
        hs = cfg["hs"]
        t0 = time.perf_counter()
        try:
            la = LT(net, "classification", subset_of_weights="all", hessian_structure=hs)
            la.fit(loader)
            la.optimize_prior_precision(method="marglik", n_steps=cfg["em"])
            res = {"wall_s": time.perf_counter() - t0}
        except Exception as err:  # noqa: BLE001  report any failure by name
            res = {"error": f"{type(err).__name__}: {str(err)[:160]}"}
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return res
    net = _make(cfg["task"])
    net.load_state_dict(torch.load(cfg["weights"], weights_only=True))
    net.eval()
    _, trfit, (xt, yt) = _data(cfg["task"], cfg.get("n_train"))
    kind = "regression" if cfg["task"] == "diabetes" else "classification"
    for hs in ("full", "kron"):
        t0 = time.perf_counter()
        try:
            la = LT(net, kind, subset_of_weights="all", hessian_structure=hs)
            la.fit(trfit)
            la.optimize_prior_precision(method="marglik")
            if kind == "regression":
                f_mu, f_var = la(xt, pred_type="glm")
                pred = (
                    f_mu.detach(),
                    f_var.detach().reshape(f_mu.shape) + la.sigma_noise.item() ** 2,
                )
            else:
                pred = la(xt, pred_type="glm", link_approx="probit").detach()
            res[hs] = _scores(cfg["task"], pred, yt)
            res[hs]["wall_s"] = time.perf_counter() - t0
        except Exception as err:  # noqa: BLE001
            res[hs] = {"error": f"{type(err).__name__}: {str(err)[:160]}"}
    return res


# ---------------------------------------------------------------------------- driver
def _run(python: str, role: str, cfg: dict, timeout: float, mem_gb: float | None = None) -> dict:
    """One worker in a fresh process; ``mem_gb`` caps its address space (RLIMIT_AS), so an
    out-of-memory run fails with a MemoryError/RuntimeError instead of exhausting a shared
    machine."""
    cfg = {**cfg, "mem_gb": mem_gb}
    cmd = [python, __file__, "--worker", role, "--config", json.dumps(cfg)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["?"]
        kind = (
            "killed (out of memory?)" if out.returncode in (-9, 137) else f"exit {out.returncode}"
        )
        return {"error": f"{kind}: {tail[0][:200]}"}
    return json.loads(lines[-1][len("RESULT ") :])


def _limit_memory(mem_gb: float | None) -> None:
    if mem_gb:
        lim = int(mem_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))


def _has_laplace(python: str | None) -> bool:
    if not python:
        return False
    r = subprocess.run([python, "-c", "import laplace"], capture_output=True)
    return r.returncode == 0


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="small sizes (minutes)")
    ap.add_argument("--laplace-python", default=None, help="interpreter with laplace-torch")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument(
        "--mem-gb", type=float, default=6.0, help="address-space cap of every worker (GiB)"
    )
    ap.add_argument("--width", type=int, default=None, help="ResNet width (default 64; quick 4)")
    ap.add_argument("--sizes", default=None, help="scaling sizes, e.g. 32x10,128x100 (n x classes)")
    ap.add_argument("--k-scaling", type=int, default=2, help="samples K in the scaling run")
    ap.add_argument("--cg-iter", type=int, default=1, help="CG passes per solve (scaling)")
    ap.add_argument("--em-scaling", type=int, default=1, help="EM cycles (scaling)")
    ap.add_argument("--batch", type=int, default=16, help="batch size (scaling)")
    ap.add_argument("--only", choices=("scores", "scaling", "gamma"), default=None)
    ap.add_argument(
        "--seeds", type=int, default=1,
        help="our side's sample seeds 0..N-1 per data set (mean and sd of the NLL)",
    )  # fmt: skip
    ap.add_argument(
        "--tasks",
        default="digits,digits-ml,digits-noisy,diabetes",
        help="score tasks, comma-separated",
    )
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--config", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        cfg = json.loads(args.config)
        _limit_memory(cfg.get("mem_gb"))
        fn = worker_ours if args.worker == "ours" else worker_laplace_torch
        print("RESULT " + json.dumps(fn(cfg)), flush=True)
        return

    if args.only == "gamma":
        print("scalar prior, K exact draws: gamma-hat mean and per-sample sd [mean, sd]")
        for task in ("digits", "digits-ml"):
            print(f"{task:9s} {json.dumps(_round(gamma_spread(task)))}", flush=True)
        return
    lt = args.laplace_python if _has_laplace(args.laplace_python) else None
    if lt is None:
        print("laplace-torch not available (pass --laplace-python): running our side only")
    from dip_uq.examples import train

    em = 4 if args.quick else 8
    k = 16 if args.quick else 64
    with tempfile.TemporaryDirectory() as tmp:
        print("\n== digits (MLP 64-50-10) and diabetes (MLP 10-50-1): test scores ==")
        tasks = args.tasks.split(",") if args.only != "scaling" else ()
        for task in tasks:
            torch.manual_seed(0)
            tr, _, (xt, yt) = _data(task)
            settings = {
                "diabetes": {"epochs": 200, "lr": 1e-3},
                "digits-ml": {"epochs": 1000, "lr": 1e-2, "weight_decay": 0.0},
            }.get(task, {"epochs": 60, "lr": 1e-2})
            net = train(_make(task), tr, "mse" if task == "diabetes" else "ce", **settings)
            weights = os.path.join(tmp, f"{task}.pt")
            torch.save(net.state_dict(), weights)
            with torch.no_grad():
                f = net(xt)
            if task != "diabetes":
                map_s = _scores(task, torch.softmax(f, -1), yt)
            else:
                resid = float(((f - yt) ** 2).mean())  # MAP with its test-optimal σ (optimistic)
                map_s = _scores(task, (f, torch.full_like(f, resid)), yt)
            print(f"{task:9s} MAP            {json.dumps(_round(map_s))}")
            cfg = {"task": task, "weights": weights, "k": k, "em": em}
            for curv in ("network",) if task == "diabetes" else ("network", "mode"):
                nlls = []
                for seed in range(args.seeds):
                    res = _run(sys.executable, "ours", {**cfg, "curvature": curv, "seed": seed},
                               args.timeout)  # fmt: skip
                    nlls.append(res.get("nll", float("nan")))
                    print(f"{task:9s} ours EM {curv:8s}seed {seed} {json.dumps(_round(res))}")
                if args.seeds > 1:
                    t = torch.tensor(nlls, dtype=torch.float64)
                    print(f"{task:9s} ours EM {curv:8s}NLL over seeds 0-{args.seeds - 1}: "
                          f"mean {float(t.mean()):.3f} sd {float(t.std()):.3f}")  # fmt: skip
            if lt:
                res = _run(lt, "lt", cfg, args.timeout)
                for hs in ("full", "kron"):
                    print(f"{task:9s} l-torch {hs:6s} {json.dumps(_round(res.get(hs, res)))}")

        if args.only == "scores":
            return
        print("\n== scaling: ResNet-18-shaped (BatchNorm) on 32x32 synthetic images ==")
        width = args.width or (4 if args.quick else 64)
        sizes = (
            [tuple(int(v) for v in sz.split("x")) for sz in args.sizes.split(",")]
            if args.sizes
            else (
                [(64, 10), (256, 10), (256, 100)]
                if args.quick
                else [(16, 10), (48, 10), (16, 100), (16, 1000)]
            )
        )
        print(
            f"width {width}, K = {args.k_scaling}, {args.cg_iter} CG passes per solve, "
            f"{args.mem_gb} GiB address-space cap per process; load average {os.getloadavg()}"
        )
        for n, c in sizes:
            cfg = {
                "task": "resnet",
                "n": n,
                "classes": c,
                "width": width,
                "k": args.k_scaling,
                "em": args.em_scaling,
                "cg_iter": args.cg_iter,
                "batch": args.batch,
            }
            ours = _run(sys.executable, "ours", cfg, args.timeout, args.mem_gb)
            print(f"n={n:5d} C={c:4d} ours: {json.dumps(_round(ours))}", flush=True)
            if not lt:
                continue
            for hs in ("kron", "full"):
                res = _run(lt, "lt", {**cfg, "hs": hs}, args.timeout, args.mem_gb)
                if "d" in ours:
                    res["dense_ggn_gib"] = round(4 * ours["d"] ** 2 / 2**30, 1)
                print(f"n={n:5d} C={c:4d} l-torch {hs}: {json.dumps(_round(res))}", flush=True)
        print(f"load average at the end {os.getloadavg()}")


def _round(d):
    if isinstance(d, dict):
        return {k: _round(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_round(v) for v in d]
    return round(d, 4) if isinstance(d, float) else d


if __name__ == "__main__":
    main()

"""Linearised-Laplace cost for a CT DIP, as ratios to the DIP fit at the same size (issue 4).

    .venv/bin/python benchmarks/laplace.py --threads 1             # 28^2 and 128^2
    .venv/bin/python benchmarks/laplace.py --quick --threads 1     # smoke run (< ~1 min)
    .venv/bin/python benchmarks/laplace.py --large-samples 8       # fewer draws at 128^2
    .venv/bin/python benchmarks/laplace.py --readme benchmarks/README.md

Per size (each measurement in a fresh subprocess, peak memory = its VmHWM):
  1. DIP fit (methods §5 objective, Adam 1e-4, clip 1, TV): the time per iteration is measured
     on a short fit and multiplied by the methods' iteration budget (``REF_ITERS``; 41000 for
     20 angles at 5 % noise) to give the reference "DIP fit wall time". The short fit's
     weights are the linearisation point (the timings do not depend on how well it fitted).
  2. Linearised Laplace of the conv weights, one prior per U-Net block (``net.blocks()``):
     Matérn-½ on 3×3 filters, Normal on 1×1 convs (the engine's "matern" block kind). J is
     the Jacobian of the network output image (sigmoid included; the cost is the same as
     linearising before it).
     Fixed hyperparameters: σ² = the true noise variance, σ_b² = mean(θ*_b²) per block.
  3. Reference: ``exact`` (dense dual, float64) when n_obs is small, else ``cg`` at tol 1e-8.
  4. Per solver: the wall time until the voxelwise variance map of the K draws is within
     ``TARGET`` (10 %) relative L2 error ‖v − v_ref‖/‖v_ref‖ of the reference map.
     All solvers share the *same* noise (ξ, ε) as the reference (the engine's shared-noise
     convention), so they target the same K draws and the error is solver error only;
     the Monte-Carlo error of K = 64 draws (~sqrt(2/64) = 18 % per pixel) cancels.
     ``cg``: tolerances 0.3, 0.1, 0.03, ... from scratch; the time of the first run that meets
     the target. ``sgd``/``sdd``: doubling iteration budgets, each segment warm-started from
     the previous one (momentum restarts at segment boundaries); the time is the cumulative
     solver time plus one variance-map evaluation.
  5. One EM cycle (mode + K samples + M-step) with each solver at its target setting.
Targets: best solver ≤ 1× DIP fit; ``sgd`` ≤ 3× at 128²; peak memory ≤ 4× DIP training.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dip_uq.dip.trainer import fit_dip  # noqa: E402
from dip_uq.dip.unet import UNet, UNetConfig, conv_weight_count  # noqa: E402
from dip_uq.laplace import Gaussian, LinearisedLaplace, Welford, draw_noise  # noqa: E402
from dip_uq.laplace.em import fit_em  # noqa: E402
from operators import Parallel2D, RayTransform, VolumeGeometry  # noqa: E402
from operators.noise import add_gaussian_noise  # noqa: E402
from operators.phantoms import random_ellipses  # noqa: E402

TARGET = 0.10
REF_ITERS = 41000  # methods §5: 28², 20 angles, 5 % noise (γ = 1e-4)
TV_WEIGHT = 1e-4
CG_TOLS = (0.3, 0.1, 0.03, 0.01, 3e-3, 1e-3, 3e-4)


@dataclass
class Case:
    """One problem size. ``unet`` holds UNetConfig fields; ``samples`` is K."""

    name: str
    size: int
    n_angles: int
    unet: dict
    samples: int = 64
    dip_iterations: int = 200  # iterations actually run to time a DIP step
    solvers: tuple[str, ...] = ("exact", "cg", "sgd", "sdd")
    reference: str = "exact"
    max_iterations: int = 3200  # cap for sgd/sdd budgets
    max_solver_s: float = 1800.0  # stop a solver's sweep beyond this much wall time
    seed: int = 0
    chunk_size: int | None = None  # vmap chunk for J products (bounds peak memory)
    extra: dict = field(default_factory=dict)


def vm_hwm_mb() -> float:
    """Peak resident memory of this process in MiB (Linux /proc VmHWM; 0 where unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


# ---------------------------------------------------------------------------- problem
def _operator(case: Case) -> RayTransform:
    vol = VolumeGeometry(shape=(case.size, case.size))
    return RayTransform(vol, Parallel2D.default(vol, n_angles=case.n_angles))


def prepare(case: Case, path: Path) -> dict:
    """Simulate 5 % noise data, time ``case.dip_iterations`` DIP steps, save the problem."""
    g = torch.Generator().manual_seed(case.seed)
    op = _operator(case)
    x = random_ellipses((case.size, case.size), generator=g)
    y, std = add_gaussian_noise(op(x), rel=0.05, generator=g)
    net = UNet(UNetConfig(ndim=2, **case.unet), generator=g)
    fit_dip(op, y, net=UNet(net.config), tv_weight=TV_WEIGHT, iterations=2, progress=False)
    t0 = time.perf_counter()
    res = fit_dip(
        op, y, net=net, tv_weight=TV_WEIGHT, iterations=case.dip_iterations, progress=False
    )
    step = (time.perf_counter() - t0) / case.dip_iterations
    # the problem is saved before any re-timing so the linearisation point is this fit
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "state": res.net.state_dict(),
            "config": res.net.config.to_dict(),
            "z0": res.input,
            "y": y,
            "noise_var": std**2,
        },
        tmp,
    )
    os.replace(tmp, path)
    return {
        "dip_step_s": step,
        "dip_fit_s": step * REF_ITERS,
        "dip_peak_mb": vm_hwm_mb(),
        "weights": conv_weight_count(res.net),
        "n_obs": int(y.numel()),
    }


def retime_dip(case: Case, path: Path) -> dict:
    """Time the same DIP steps again (shared CPUs: the run keeps the faster of two timings,
    which makes every ratio to the DIP fit stricter, not looser)."""
    data = torch.load(path, weights_only=False)
    net = UNet(UNetConfig(**data["config"]))
    net.load_state_dict(data["state"])
    op = _operator(case)
    fit_dip(op, data["y"], net=net, tv_weight=TV_WEIGHT, iterations=2, progress=False)
    t0 = time.perf_counter()
    fit_dip(
        op, data["y"], net=net, tv_weight=TV_WEIGHT, iterations=case.dip_iterations, progress=False
    )
    return {"dip_step_s": (time.perf_counter() - t0) / case.dip_iterations}


def load_laplace(case: Case, path: Path) -> LinearisedLaplace:
    """The linearised Laplace of the saved DIP with the benchmark's fixed hyperparameters."""
    data = torch.load(path, weights_only=False)
    net = UNet(UNetConfig(**data["config"]))
    net.load_state_dict(data["state"])
    block_of = {w: b for b, ws in net.blocks().items() for w in ws}
    op = _operator(case)
    y = data["y"][None, None]  # the image is (1, 1, H, W), so A f is (1, 1, angles, det)
    la = LinearisedLaplace(
        net,
        Gaussian(float(data["noise_var"]), op),
        data["z0"],
        y,
        params="conv_weights",
        blocks=lambda name: block_of[name],
        prior="matern",
        chunk_size=case.chunk_size,
    )
    theta = la.theta_star()
    sel = la.selection
    mean_sq = sel.block_sum(theta.double() ** 2) / sel.block_sizes().double()
    la.prior.set_variances(mean_sq.clamp_min(1e-8))
    return la


def _noise(la: LinearisedLaplace, case: Case):
    return draw_noise(la.system(), case.samples, torch.Generator().manual_seed(case.seed + 1))


def variance_map(la: LinearisedLaplace, z: torch.Tensor) -> torch.Tensor:
    """Voxelwise variance of J z_k over the K zero-mean draws (Welford), ``(1, 1, H, W)``."""
    return Welford().update(la.functional_samples(z)).second_moment()


def reference(case: Case, path: Path, ref_path: Path) -> dict:
    la = load_laplace(case, path)
    noise = _noise(la, case)
    t0 = time.perf_counter()
    if case.reference == "exact":
        res = la.sample(case.samples, "exact", noise=noise)
    else:
        res = la.sample(case.samples, "cg", noise=noise, tol=1e-8, max_iter=2000)
    var = variance_map(la, res.samples)
    secs = time.perf_counter() - t0
    torch.save(var, ref_path)
    return {"reference": case.reference, "ref_s": secs, "ref_residual": res.residual}


def _rel_err(v: torch.Tensor, ref: torch.Tensor) -> float:
    return float((v.double() - ref.double()).norm() / ref.double().norm())


def solver_run(case: Case, solver: str, path: Path, ref_path: Path, em: bool = True) -> dict:
    """Time-to-target for ``solver``, then one EM cycle at the setting that met it."""
    la = load_laplace(case, path)
    ref = torch.load(ref_path)
    noise = _noise(la, case)
    K = case.samples
    trail: list[tuple[str, float, float]] = []
    reached, secs, opts = False, math.inf, {}
    with torch.no_grad():  # warm-up (vmap/functorch set-up), as the DIP timing has one
        system = la.system()
        la.functional_samples(system.Gt(system.G(torch.zeros(K, la.d))))

    if solver == "exact":
        t0 = time.perf_counter()
        z = la.sample(K, "exact", noise=noise).samples
        err = _rel_err(variance_map(la, z), ref)
        secs = time.perf_counter() - t0
        reached = err <= TARGET
        trail.append(("exact", secs, err))
    elif solver == "cg":
        for tol in CG_TOLS:
            t0 = time.perf_counter()
            res = la.sample(K, "cg", noise=noise, tol=tol, max_iter=1000)
            err = _rel_err(variance_map(la, res.samples), ref)
            elapsed = time.perf_counter() - t0
            trail.append((f"tol={tol:g} it={res.iterations}", elapsed, err))
            opts = {"tol": tol, "max_iter": 1000}
            if err <= TARGET:
                reached, secs = True, elapsed
                break
            if elapsed > case.max_solver_s:
                break
    elif solver in ("sgd", "sdd"):
        total, done, step, init, lr = 0.0, 0, 25, None, None
        while done < case.max_iterations:
            kw = {"iterations": step, "tol": 0.0, "check_every": step}
            if lr is not None:
                kw["lr"] = lr
            t0 = time.perf_counter()
            res = la.sample(K, solver, noise=noise, init=init, **kw)
            total += time.perf_counter() - t0
            done += step
            init = res.state["u" if solver == "sgd" else "alpha"]
            lr = res.state["lr"]
            t0 = time.perf_counter()
            err = _rel_err(variance_map(la, res.samples), ref)
            map_s = time.perf_counter() - t0
            trail.append((f"it={done}", total + map_s, err))
            opts = {"iterations": done, "tol": 0.0, "check_every": done, "lr": lr}
            if err <= TARGET:
                reached, secs = True, total + map_s
                break
            if total > case.max_solver_s:
                break
            step = done  # doubling
    else:
        raise ValueError(f"unknown solver {solver!r}")

    out = {
        "solver": solver,
        "reached": reached,
        "time_s": secs,
        "final_err": trail[-1][2],
        "trail": trail,
    }
    if em:
        em_opts = opts  # the target setting, or the last one tried when none met it
        t0 = time.perf_counter()
        fit_em(
            la,
            n_cycles=1,
            n_samples=K,
            solver=solver,
            generator=torch.Generator().manual_seed(case.seed + 2),
            solver_opts=None if solver == "exact" else em_opts,
            tied_cycles=0,
        )
        out["em_cycle_s"] = time.perf_counter() - t0
    out["peak_mb"] = vm_hwm_mb()
    return out


# ---------------------------------------------------------------------------- driver
def _in_subprocess(task: str, case: Case, workdir: Path, threads: int | None, **kw) -> dict:
    spec = {"task": task, "case": asdict(case), "workdir": str(workdir), "threads": threads, **kw}
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{task} worker failed for {case.name}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _task(task: str, case: Case, workdir: Path, **kw) -> dict:
    prob, ref = workdir / f"{case.name}_problem.pt", workdir / f"{case.name}_ref.pt"
    if task == "prepare":
        return prepare(case, prob)
    if task == "retime":
        return retime_dip(case, prob)
    if task == "reference":
        return reference(case, prob, ref)
    if task == "solver":
        return solver_run(case, kw["solver"], prob, ref, kw.get("em", True))
    raise ValueError(f"unknown task {task!r}")


def run_case(
    case: Case,
    workdir: Path,
    *,
    subprocesses: bool = True,
    threads: int | None = None,
    em: bool = True,
    log=print,
) -> dict:
    """All measurements of one size; returns the DIP figures and one row per solver with
    ratios to the DIP fit (time) and to DIP training (peak memory)."""

    def call(task, **kw):
        if subprocesses:
            return _in_subprocess(task, case, workdir, threads, **kw)
        return _task(task, case, workdir, **kw)

    dip = call("prepare")
    log(
        f"[{case.name}] DIP: {dip['weights']} weights, {dip['n_obs']} obs, "
        f"{1e3 * dip['dip_step_s']:.2f} ms/it -> fit {dip['dip_fit_s']:.0f} s, "
        f"peak {dip['dip_peak_mb']:.0f} MiB"
    )
    ref = call("reference")
    log(f"[{case.name}] reference {ref['reference']}: {ref['ref_s']:.1f} s")
    rows = []
    for s in case.solvers:
        r = call("solver", solver=s, em=em)
        r["time_ratio"] = r["time_s"] / dip["dip_fit_s"]
        r["peak_ratio"] = r["peak_mb"] / dip["dip_peak_mb"] if dip["dip_peak_mb"] else math.nan
        if "em_cycle_s" in r:
            r["em_ratio"] = r["em_cycle_s"] / dip["dip_fit_s"]
        log(
            f"[{case.name}] {s}: reached={r['reached']} time {r['time_s']:.1f} s "
            f"({r['time_ratio']:.3f}x DIP) err {r['final_err']:.3f} "
            f"EM {r.get('em_cycle_s', math.nan):.1f} s peak {r['peak_mb']:.0f} MiB "
            f"({r['peak_ratio']:.2f}x) trail {r['trail']}"
        )
        rows.append(r)
    again = call("retime")["dip_step_s"]
    log(f"[{case.name}] DIP re-timed: {1e3 * again:.2f} ms/it")
    if again < dip["dip_step_s"]:
        factor = again / dip["dip_step_s"]
        dip.update(dip_step_s=again, dip_fit_s=again * REF_ITERS)
        for r in rows:
            r["time_ratio"] /= factor
            if "em_ratio" in r:
                r["em_ratio"] /= factor
    return {"case": asdict(case), "dip": dip, "reference": ref, "solvers": rows}


def cases(
    quick: bool, large_samples: int, max_solver_s: float, chunk_size: int | None = None
) -> list[Case]:
    small = {"channels": (32, 32, 32), "skip_channels": (0, 4, 4)}  # the ``small`` preset
    large = {
        "channels": (64,) * 5,
        "skip_channels": (0, 0, 0, 4, 4),
        "use_sigmoid": True,
    }
    if quick:  # a toy U-Net: exercises every path in well under a minute
        toy = {"channels": (8, 8), "skip_channels": (0, 2)}
        return [Case("16^2 toy", 16, 10, toy, samples=8, dip_iterations=10, max_iterations=400)]
    return [
        Case("28^2", 28, 20, small, samples=64, dip_iterations=400),
        Case(
            "128^2",
            128,
            20,
            large,
            samples=large_samples,
            dip_iterations=10,
            solvers=("cg", "sgd", "sdd"),
            reference="cg",
            max_iterations=800,
            max_solver_s=max_solver_s,
            chunk_size=chunk_size,
        ),
    ]


def markdown(results: list[dict], threads: int | None, note: str = "") -> str:
    lines = [
        "## Linearised Laplace (issue 4)",
        "",
        "Generated by `benchmarks/laplace.py` (see its docstring for the protocol). "
        f"CPU, torch threads = {threads or torch.get_num_threads()}. {note}".rstrip(),
        "",
        "Time = wall time until the variance map of K draws is within 10 % relative L2 error "
        "of the reference map built from the *same* noise draws; ratios are to the DIP fit "
        f"wall time (time per DIP iteration × {REF_ITERS}, methods §5) and to DIP training's "
        "peak memory (VmHWM of each subprocess, including the torch runtime).",
        "",
        "| size | weights | n_obs | K | DIP ms/it | DIP fit s | solver | reached | time s "
        "| × DIP | rel. err | EM cycle s | EM × DIP | peak MiB | × DIP peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        c, d = res["case"], res["dip"]
        for r in res["solvers"]:
            lines.append(
                f"| {c['name']} | {d['weights']} | {d['n_obs']} | {c['samples']} "
                f"| {1e3 * d['dip_step_s']:.2f} | {d['dip_fit_s']:.0f} | {r['solver']} "
                f"| {'yes' if r['reached'] else 'no'} | {r['time_s']:.1f} "
                f"| {r['time_ratio']:.3f} | {r['final_err']:.3f} "
                f"| {r.get('em_cycle_s', math.nan):.1f} | {r.get('em_ratio', math.nan):.3f} "
                f"| {r['peak_mb']:.0f} | {r['peak_ratio']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def write_readme_section(readme: Path, section: str) -> None:
    """Add or replace the ``## Linearised Laplace (issue 4)`` section only (atomic write)."""
    head = section.splitlines()[0]
    text = readme.read_text() if readme.exists() else "# Benchmarks\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.rstrip() == head), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        rest = "".join(lines[end:])
        new = "".join(lines[:start]) + section + ("\n" + rest if rest else "")
    tmp = readme.with_suffix(".md.tmp")
    tmp.write_text(new)
    os.replace(tmp, readme)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--large-samples", type=int, default=64, help="K at 128^2")
    ap.add_argument(
        "--max-solver-s", type=float, default=1800.0, help="cap on one solver's sweep at 128^2"
    )
    ap.add_argument(
        "--chunk-size", type=int, default=None, help="vmap chunk of J products at 128^2"
    )
    ap.add_argument("--only", choices=["28^2", "128^2"], default=None)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--readme", type=Path, help="write the results section into this file")
    ap.add_argument("--note", default="", help="free text added to the README section")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        spec = json.loads(args.worker)
        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        case = Case(**{**spec.pop("case")})
        case.solvers = tuple(case.solvers)
        out = _task(spec.pop("task"), case, Path(spec.pop("workdir")), **spec)
        print(json.dumps(out))
        return

    if args.threads:
        torch.set_num_threads(args.threads)
    todo = [
        c
        for c in cases(args.quick, args.large_samples, args.max_solver_s, args.chunk_size)
        if args.only in (None, c.name)
    ]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in todo:
            results.append(run_case(case, Path(tmp), threads=args.threads))
    table = markdown(results, args.threads, args.note)
    print(table)
    for res in results:
        rows = {r["solver"]: r for r in res["solvers"]}
        best = min((r["time_ratio"] for r in rows.values() if r["reached"]), default=math.inf)
        peak = max(r["peak_ratio"] for r in rows.values())
        msg = f"{res['case']['name']}: best solver {best:.3f}x DIP fit (target <= 1)"
        if "sgd" in rows and res["case"]["size"] >= 128:
            sgd = rows["sgd"]["time_ratio"] if rows["sgd"]["reached"] else math.inf
            msg += f", sgd {sgd:.3f}x (target <= 3)"
        print(msg + f", peak memory <= {peak:.2f}x DIP training (target <= 4)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    if args.readme:
        write_readme_section(args.readme, table)


if __name__ == "__main__":
    main()

"""Linearised-Laplace cost for a CT DIP, as ratios to the DIP fit at the same size (issue 4).

    .venv/bin/python benchmarks/laplace.py --threads 1             # 28^2 and 128^2
    .venv/bin/python benchmarks/laplace.py --quick --threads 1     # smoke run (< ~1 min)
    .venv/bin/python benchmarks/laplace.py --only 128^2 --json out.json   # one size
    .venv/bin/python benchmarks/laplace.py --readme benchmarks/README.md

Per size (each measurement in a fresh subprocess, peak memory = its VmHWM; the load average
is recorded at the start and end of each):
  1. DIP fit (methods §5 objective, Adam 1e-4, clip 1, TV): the time per iteration is measured
     on a short fit and multiplied by the methods' iteration budget (``REF_ITERS``; 41000 for
     20 angles at 5 % noise) to give the reference "DIP fit wall time". The short fit's
     weights are the linearisation point (the timings do not depend on how well it fitted).
     The DIP step is timed again at the end of the run; both timings are reported and the
     faster one is used for the ratios (stricter on shared machines).
  2. Linearised Laplace of the conv weights, one prior per U-Net block (``net.blocks()``):
     Matérn-½ on 3×3 filters, Normal on 1×1 convs (the engine's "matern" block kind). J is
     the Jacobian of the network output image (sigmoid included; the cost is the same as
     linearising before it).
     Fixed hyperparameters: σ² = the true noise variance, σ_b² = mean(θ*_b²) per block.
  3. Reference map: ``exact`` (dense dual, float64) when n_obs is small; otherwise a long
     ``cg`` run (to relative residual ``ref_tol``), whose own iterates give the cg row.
  4. Per solver one run, stopped as soon as the voxelwise variance map of the K draws is
     within ``TARGET`` (10 %) relative L2 error ‖v − v_ref‖/‖v_ref‖ of the reference map:
     the solvers' ``callback`` computes the map every ``check_every`` iterations (every CG
     iteration); the time of these checks is excluded, and the reported time is the solver
     time up to the first check that met the target plus one map evaluation.
     All solvers share the *same* noise (ξ, ε) as the reference (the engine's shared-noise
     convention), so they target the same K draws and the error is solver error only;
     the Monte-Carlo error of K = 64 draws (~sqrt(2/64) = 18 % per pixel) cancels.
     Step sizes: the engine defaults, lr = 1/(λ_max + 1) from power iteration on ĜᵀĜ (the
     largest stable step of the primal (sgd) and of the dual (sdd) full-batch quadratic;
     methods §2.1, §2.3), Nesterov momentum 0.9. The DIP has a single datum, so every batch
     is full and SDD is deterministic dual descent: its iterate averaging, which only damps
     minibatch noise, is off (r = 1).
  5. One EM cycle (mode + K samples + M-step) with each solver at the iteration count that
     met the target (``em_solvers``; at 128² only cg, the others being beyond the budget;
     not run for a solver that did not reach the target).
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
from dip_uq.laplace.solvers import (  # noqa: E402
    Noise,
    nystrom_preconditioner,  # noqa: E402
    with_prebuilt_preconditioner,
)
from dip_uq.laplace.solvers.cg import batched_pcg  # noqa: E402
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
    solvers: tuple[str, ...] = ("exact", "cg", "sgd", "sgd-lowrank", "sdd")
    reference: str = "exact"
    max_iterations: int = 3200  # cap for sgd/sdd
    max_solver_s: float = 1800.0  # stop a solver beyond this much solver time
    check_every: int = 5  # sgd/sdd iterations between variance-map checks
    ref_tol: float = 1e-3  # relative residual of the cg reference (when reference == "cg")
    max_ref_s: float = 1500.0  # ... or this much cg time, whichever comes first
    em_solvers: tuple[str, ...] = ("exact", "cg", "sgd", "sdd", "sgd-lowrank")
    precond_rank: int = 200  # rank of sgd-lowrank's preconditioner
    sample_batch: int | None = None  # production runs: K draws solved this many at a time
    seed: int = 0
    chunk_size: int | None = None  # vmap chunk for J products (bounds peak memory)
    extra: dict = field(default_factory=dict)


def load_avg() -> float:
    """1-minute load average (nan where unavailable)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return math.nan


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
    fit_dip(y, op, net=UNet(net.config), tv_weight=TV_WEIGHT, iterations=2, progress=False)
    t0 = time.perf_counter()
    res = fit_dip(
        y, op, net=net, tv_weight=TV_WEIGHT, iterations=case.dip_iterations, progress=False
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
        "dip_step_start_s": step,
        "load_start": load_avg(),
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
    fit_dip(data["y"], op, net=net, tv_weight=TV_WEIGHT, iterations=2, progress=False)
    t0 = time.perf_counter()
    fit_dip(
        data["y"], op, net=net, tv_weight=TV_WEIGHT, iterations=case.dip_iterations, progress=False
    )
    return {"dip_step_s": (time.perf_counter() - t0) / case.dip_iterations, "load": load_avg()}


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


class Monitor:
    """Solver callback: the variance map of the current draws against ``ref`` every check.

    Its own time (θ from the solver state, the map, the error) is excluded from the solver
    time; ``hit`` = (iteration, solver time + one map, error) of the first check within
    ``TARGET``. Stops the solver at the hit (``stop``) or beyond ``cap_s`` of solver time.
    ``ref = None`` keeps every map instead (for a reference built from the same run).
    """

    def __init__(self, la, ref, cap_s: float, stop: bool = True, log=None) -> None:
        self.la, self.ref, self.cap_s, self.stop, self.log = la, ref, cap_s, stop, log
        self.trail: list[tuple[int, float, float, float]] = []  # it, solver s, map s, err
        self.maps: list[torch.Tensor] = []
        self.hit: tuple[int, float, float] | None = None
        self.start()

    def start(self) -> None:
        self.t0, self.overhead = time.perf_counter(), 0.0

    def __call__(self, it: int, current) -> bool:
        t = time.perf_counter()
        solver_s = t - self.t0 - self.overhead
        v = variance_map(self.la, current())
        map_s = time.perf_counter() - t
        err = math.nan if self.ref is None else _rel_err(v, self.ref)
        if self.ref is None:
            self.maps.append(v)
        self.trail.append((it, solver_s, map_s, err))
        if self.hit is None and err <= TARGET:
            self.hit = (it, solver_s + map_s, err)
        if self.log:
            self.log(f"it={it} solver {solver_s:.1f} s map {map_s:.1f} s err {err:.4f}")
        self.overhead += time.perf_counter() - t
        return (self.stop and self.hit is not None) or solver_s > self.cap_s


def _progress(case: Case, solver: str):
    def log(msg: str) -> None:
        print(
            f"  [{case.name} {solver}] {msg} (load {load_avg():.1f})", file=sys.stderr, flush=True
        )

    return log


def reference(case: Case, path: Path, ref_path: Path) -> dict:
    """The reference map; with a cg reference also the cg row, from the same run's iterates."""
    load0 = load_avg()
    la = load_laplace(case, path)
    noise = _noise(la, case)
    if case.reference == "exact":
        t0 = time.perf_counter()
        res = la.sample(case.samples, "exact", noise=noise)
        var = variance_map(la, res.samples)
        torch.save(var, ref_path)
        return {"reference": "exact", "ref_s": time.perf_counter() - t0, "ref_residual": 0.0}
    _warm_up(la, case)
    # the engine's cg, spelled out to keep every iterate α_t (K × n_obs, cheap); their maps
    # (one VJP + one JVP each) are formed afterwards, only until one is within the target
    system = la.system()
    alphas: list[tuple[int, float, torch.Tensor]] = []
    t0 = time.perf_counter()
    with torch.no_grad():
        c, theta_p = system.dual_rhs(noise, None)
        precond, _ = nystrom_preconditioner(system)
        start = time.perf_counter()

        def keep(it, a):
            alphas.append((it, time.perf_counter() - t0, a.clone()))
            _progress(case, "cg reference")(f"it={it} solver {alphas[-1][1]:.1f} s")
            return time.perf_counter() - t0 > case.max_ref_s

        alpha, iters, trace = batched_pcg(
            system.kernel_mv, c, precond, tol=case.ref_tol, max_iter=200, callback=keep
        )
        ref_s = time.perf_counter() - t0
        theta = lambda a: theta_p + system.prior.cov_mv(system.Gt(a))  # noqa: E731
        var = variance_map(la, theta(alpha))
    torch.save(var, ref_path)
    trail, hit = [], None
    for it, secs, a in alphas:
        t1 = time.perf_counter()
        with torch.no_grad():
            err = _rel_err(variance_map(la, theta(a)), var)
        trail.append((it, secs, time.perf_counter() - t1, err))
        if err <= TARGET:
            hit = (it, secs + trail[-1][2], err)
            break
    row = _row("cg", hit, trail, {"tol": case.ref_tol, "iterations": iters})
    row.update(peak_mb=vm_hwm_mb(), load=(load0, load_avg()), precond_s=start - t0)
    return {
        "reference": f"cg to residual {trace[-1]:.2g} ({iters} it, {ref_s:.0f} s)",
        "ref_s": ref_s,
        "ref_residual": trace[-1],
        "cg_row": row,
    }


def _rel_err(v: torch.Tensor, ref: torch.Tensor) -> float:
    return float((v.double() - ref.double()).norm() / ref.double().norm())


def _warm_up(la: LinearisedLaplace, case: Case) -> None:
    """vmap/functorch set-up outside the timings, as the DIP timing has a warm-up."""
    with torch.no_grad():
        system = la.system()
        k = min(case.samples, case.chunk_size or case.samples)
        la.functional_samples(system.Gt(system.G(torch.zeros(k, la.d))))


def _row(solver: str, hit, trail, setting: dict) -> dict:
    last = trail[-1] if trail else (0, math.nan, 0.0, math.nan)
    return {
        "solver": solver,
        "reached": hit is not None,
        "iterations": hit[0] if hit else last[0],
        "time_s": hit[1] if hit else last[1] + last[2],
        "final_err": hit[2] if hit else last[3],
        "setting": setting,
        "trail": [tuple(round(x, 4) for x in t) for t in trail],
    }


def solver_run(case: Case, solver: str, path: Path, ref_path: Path, em: bool = True) -> dict:
    """Time to target for ``solver`` (one run, stopped at the target), then one EM cycle at
    the iteration count that met it (or the last one reached)."""
    load0 = load_avg()
    la = load_laplace(case, path)
    ref = torch.load(ref_path)
    noise = _noise(la, case)
    K = case.samples
    _warm_up(la, case)
    mon = Monitor(la, ref, case.max_solver_s, log=_progress(case, solver))
    if solver == "exact":
        z = la.sample(K, "exact", noise=noise).samples
        mon(0, lambda: z)
        em_opts = None
    elif solver == "cg":
        res = la.sample(K, "cg", noise=noise, tol=1e-6, iterations=500, callback=mon)
        it = mon.hit[0] if mon.hit else res.iterations
        em_opts = {"tol": 1e-12, "iterations": max(it, 1)}
    elif solver in ("sgd", "sdd", "sgd-lowrank"):
        kw = {"averaging": 1.0} if solver == "sdd" else {}
        if solver == "sgd":  # plain sgd, the methods' algorithm (the engine default is "auto")
            kw = {"precond": None}
        if solver == "sgd-lowrank":  # the build is inside the timed call
            kw = {"precond": "lowrank", "precond_rank": case.precond_rank}
        res = la.sample(
            K,
            solver.split("-")[0],
            noise=noise,
            iterations=case.max_iterations,
            tol=0.0,
            check_every=case.check_every,
            callback=mon,
            **kw,
        )
        it = mon.hit[0] if mon.hit else res.iterations
        em_opts = {"iterations": it, "tol": 0.0, "check_every": it, "lr": res.state["lr"], **kw}
        if solver == "sgd-lowrank":  # the step comes from the (rebuilt) preconditioner
            em_opts.pop("lr")
    else:
        raise ValueError(f"unknown solver {solver!r}")
    out = _row(solver, mon.hit, mon.trail, em_opts or {})
    if em and solver in case.em_solvers and (mon.hit is not None or solver == "exact"):
        t0 = time.perf_counter()
        fit_em(
            la,
            n_cycles=1,
            n_samples=K,
            solver=solver.split("-")[0],
            generator=torch.Generator().manual_seed(case.seed + 2),
            solver_opts=em_opts,
            tied_cycles=0,
        )
        out["em_cycle_s"] = time.perf_counter() - t0
    out["peak_mb"] = vm_hwm_mb()
    out["load"] = (load0, load_avg())
    return out


# ---------------------------------------------------------------------------- driver
def _in_subprocess(task: str, case: Case, workdir: Path, threads: int | None, **kw) -> dict:
    spec = {"task": task, "case": asdict(case), "workdir": str(workdir), "threads": threads, **kw}
    proc = subprocess.run(  # stderr (progress lines, tracebacks) goes straight to ours
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        stdout=subprocess.PIPE,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{task} worker failed for {case.name} (exit {proc.returncode}; see stderr)"
        )
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
    if task == "em":
        return em_cycle(case, kw["solver"], prob, kw["setting"])
    if task == "batched":
        return batched_run(case, kw["solver"], prob, ref, kw["setting"])
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
        f"peak {dip['dip_peak_mb']:.0f} MiB, load {dip['load_start']:.1f}"
    )
    ref = call("reference")
    log(f"[{case.name}] reference {ref['reference']}: {ref['ref_s']:.1f} s")
    rows = []
    for s in case.solvers:
        if s == "cg" and "cg_row" in ref:  # the cg reference run's own iterates
            r = dict(ref["cg_row"])
            if em and "cg" in case.em_solvers:
                e = call("em", solver="cg", setting=_em_setting(r))
                r["em_cycle_s"], r["em_peak_mb"] = e["em_cycle_s"], e["peak_mb"]
        else:
            r = call("solver", solver=s, em=em and case.sample_batch is None)
            if em and case.sample_batch is not None and s in case.em_solvers and r["reached"]:
                e = call("em", solver=s, setting=r["setting"])
                r["em_cycle_s"], r["em_peak_mb"] = e["em_cycle_s"], e["peak_mb"]
        if case.sample_batch is not None and s in ("cg", "sgd-lowrank") and r["reached"]:
            setting = (
                dict(r["setting"]) if s != "cg" else {"tol": 0.0, "iterations": r["iterations"]}
            )
            b = call("batched", solver=s, setting=setting)
            r["batched"] = {
                **b,
                "time_ratio": b["time_s"] / dip["dip_fit_s"],
                "peak_ratio": b["peak_mb"] / dip["dip_peak_mb"],
            }
            log(f"[{case.name}] {s} in batches of {case.sample_batch}: {b}")
        r["time_ratio"] = r["time_s"] / dip["dip_fit_s"]
        r["peak_ratio"] = r["peak_mb"] / dip["dip_peak_mb"] if dip["dip_peak_mb"] else math.nan
        if "em_cycle_s" in r:
            r["em_ratio"] = r["em_cycle_s"] / dip["dip_fit_s"]
        log(
            f"[{case.name}] {s}: reached={r['reached']} it={r['iterations']} "
            f"time {r['time_s']:.1f} s ({r['time_ratio']:.3f}x DIP) err {r['final_err']:.3f} "
            f"EM {r.get('em_cycle_s', math.nan):.1f} s peak {r['peak_mb']:.0f} MiB "
            f"({r['peak_ratio']:.2f}x) load {r.get('load')}"
        )
        rows.append(r)
    again = call("retime")
    dip["dip_step_end_s"], dip["load_end"] = again["dip_step_s"], again["load"]
    log(
        f"[{case.name}] DIP re-timed: {1e3 * again['dip_step_s']:.2f} ms/it, load {again['load']:.1f}"
    )
    if again["dip_step_s"] < dip["dip_step_s"]:
        factor = again["dip_step_s"] / dip["dip_step_s"]
        dip.update(dip_step_s=again["dip_step_s"], dip_fit_s=again["dip_step_s"] * REF_ITERS)
        for r in rows:
            r["time_ratio"] /= factor
            if "em_ratio" in r:
                r["em_ratio"] /= factor
    return {"case": asdict(case), "dip": dip, "reference": ref, "solvers": rows}


def _em_setting(row: dict) -> dict:
    return {"tol": 1e-12, "iterations": max(int(row["iterations"]), 1)}


def em_cycle(case: Case, solver: str, path: Path, setting: dict) -> dict:
    """One EM cycle with ``solver`` at ``setting`` (its own subprocess: its own peak), the
    draws solved ``case.sample_batch`` at a time when set."""
    la = load_laplace(case, path)
    _warm_up(la, case)
    t0 = time.perf_counter()
    fit_em(
        la,
        n_cycles=1,
        n_samples=case.samples,
        solver=solver.split("-")[0],
        generator=torch.Generator().manual_seed(case.seed + 2),
        solver_opts=setting,
        tied_cycles=0,
        sample_batch=case.sample_batch,
    )
    return {"em_cycle_s": time.perf_counter() - t0, "peak_mb": vm_hwm_mb()}


def batched_run(case: Case, solver: str, path: Path, ref_path: Path, setting: dict) -> dict:
    """The production configuration of a solver row: the same K draws solved
    ``case.sample_batch`` at a time, at the iteration count that met the target in the
    one-batch run, with one preconditioner for all batches (built inside the timed part).
    Draws are independent, so the map (and its error) equals the one-batch run's; time and
    peak memory are this configuration's."""
    la = load_laplace(case, path)
    ref = torch.load(ref_path)
    noise = _noise(la, case)
    _warm_up(la, case)
    base = solver.split("-")[0]
    t0 = time.perf_counter()
    opts = with_prebuilt_preconditioner(la.system(), base, dict(setting))
    acc = Welford()
    for start in range(0, case.samples, case.sample_batch):
        sl = slice(start, min(start + case.sample_batch, case.samples))
        part = Noise(noise.xi[sl], noise.eps[sl])
        z = la.sample(part.xi.shape[0], base, noise=part, **opts).samples
        acc.update(la.functional_samples(z))
        del z
    seconds = time.perf_counter() - t0
    return {
        "time_s": seconds,
        "err": _rel_err(acc.second_moment(), ref),
        "peak_mb": vm_hwm_mb(),
    }


def cases(
    quick: bool, large_samples: int, max_solver_s: float, chunk_size: int | None = 4
) -> list[Case]:
    """28² (small preset, all solvers, exact reference) and 128² (cg reference; sgd/sdd
    capped at ``max_solver_s`` of solver time; J products in vmap chunks of ``chunk_size``)."""
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
        Case("28^2", 28, 20, small, samples=64, dip_iterations=400, max_solver_s=max_solver_s),
        Case(
            "128^2",
            128,
            20,
            large,
            samples=large_samples,
            dip_iterations=20,
            solvers=("cg", "sgd-lowrank", "sgd", "sdd"),
            reference="cg",
            ref_tol=3e-3,
            max_ref_s=900.0,
            max_iterations=800,
            max_solver_s=max_solver_s,
            check_every=5,
            em_solvers=("cg", "sgd-lowrank"),
            chunk_size=chunk_size,
        ),
    ]


def markdown(results: list[dict], threads: int | None, note: str = "") -> str:
    lines = [
        "## Linearised Laplace: `laplace.py`",
        "",
        "Generated by `benchmarks/laplace.py` (see its docstring for the protocol). "
        f"CPU, torch threads = {threads or torch.get_num_threads()}. {note}".rstrip(),
        "",
        "Time = solver wall time until the variance map of K draws is within 10 % relative L2 "
        "error of the reference map built from the *same* noise draws (checks excluded, one "
        "map included); ratios are to the DIP fit wall time (time per DIP iteration × "
        f"{REF_ITERS}, methods §5; the faster of the start and end timings) and to DIP "
        "training's peak memory (VmHWM of each subprocess, including the torch runtime).",
        "",
    ]
    for res in results:
        c, d = res["case"], res["dip"]
        lines.append(
            f"- {c['name']}: {d['weights']} weights, {d['n_obs']} measurements, K = "
            f"{c['samples']}; DIP {1e3 * d['dip_step_start_s']:.1f} ms/it at the start, "
            f"{1e3 * d.get('dip_step_end_s', math.nan):.1f} ms/it at the end -> fit "
            f"{d['dip_fit_s']:.0f} s; DIP training peak {d['dip_peak_mb']:.0f} MiB; load "
            f"average {d['load_start']:.1f} (start), {d.get('load_end', math.nan):.1f} (end); "
            f"reference {res['reference']['reference']}."
        )
    lines += [
        "",
        "| size | solver | reached | it | time s | × DIP | rel. err | EM cycle s | EM × DIP "
        "| peak MiB | × DIP peak | EM peak MiB (×) | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        c = res["case"]
        dpeak = res["dip"]["dip_peak_mb"]
        for r in res["solvers"]:
            load = r.get("load") or (math.nan, math.nan)
            em_peak = r.get("em_peak_mb", math.nan)
            lines.append(
                f"| {c['name']} | {r['solver']} | {'yes' if r['reached'] else 'no'} "
                f"| {r['iterations']} | {r['time_s']:.1f} | {r['time_ratio']:.3f} "
                f"| {r['final_err']:.3f} | {r.get('em_cycle_s', math.nan):.1f} "
                f"| {r.get('em_ratio', math.nan):.3f} | {r['peak_mb']:.0f} "
                f"| {r['peak_ratio']:.2f} | {em_peak:.0f} ({em_peak / dpeak:.2f}) "
                f"| {load[0]:.1f}-{load[1]:.1f} |"
            )
            b = r.get("batched")
            if b:
                lines.append(
                    f"| {c['name']} | {r['solver']}, {c['samples']} draws in batches of "
                    f"{c['sample_batch']} | same draws | {r['iterations']} | {b['time_s']:.1f} "
                    f"| {b['time_ratio']:.3f} | {b['err']:.3f} | | | {b['peak_mb']:.0f} "
                    f"| {b['peak_ratio']:.2f} | | |"
                )
    return "\n".join(lines) + "\n"


def write_readme_section(readme: Path, section: str) -> None:
    """Add or replace the Linearised Laplace section (its heading line) only (atomic write)."""
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
    ap.add_argument("--max-solver-s", type=float, default=900.0, help="cap on one solver's time")
    ap.add_argument("--chunk-size", type=int, default=4, help="vmap chunk of J products at 128^2")
    ap.add_argument("--only", choices=["28^2", "128^2"], default=None)
    ap.add_argument(
        "--sample-batch",
        type=int,
        default=None,
        help="also run the production configuration: the K draws this many at a time "
        "(EM cycles too), for its time and peak memory",
    )
    ap.add_argument("--solvers", default=None, help="comma-separated subset of the solvers")
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
    if args.solvers:
        keep = tuple(args.solvers.split(","))  # in this order
        for c in todo:
            c.solvers = tuple(s for s in keep if s in c.solvers)
    for c in todo:
        c.sample_batch = args.sample_batch
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in todo:
            results.append(run_case(case, Path(tmp), threads=args.threads))
    table = markdown(results, args.threads, args.note)
    print(table)
    for res in results:
        rows = {r["solver"]: r for r in res["solvers"]}
        best = min((r["time_ratio"] for r in rows.values() if r["reached"]), default=math.inf)
        peak = max(
            (
                min(r["peak_ratio"], r.get("batched", {}).get("peak_ratio", math.inf))
                for r in rows.values()
            ),
            default=math.nan,
        )
        msg = f"{res['case']['name']}: best solver {best:.3f}x DIP fit (target <= 1)"
        for name in ("sgd", "sgd-lowrank"):
            if name in rows and res["case"]["size"] >= 128:
                sgd = rows[name]["time_ratio"] if rows[name]["reached"] else math.inf
                msg += f", {name} {sgd:.3f}x (target <= 3)"
        print(
            msg + f", sampling peak memory <= {peak:.2f}x DIP training (target <= 4; the "
            "smaller of one batch and the batched run)"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    if args.readme:
        write_readme_section(args.readme, table)


if __name__ == "__main__":
    main()

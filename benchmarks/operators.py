"""Operator speed and memory, as ratios against a baseline measured in the same run.

    .venv/bin/python benchmarks/operators.py            # full table (about a minute)
    .venv/bin/python benchmarks/operators.py --quick    # smaller sizes, for a smoke run

2D: parallel beam 256^2, 180 angles, 367 bins; torch vs ASTRA CPU (``linear``) vs the sparse
matrix vs ODL (``astra_cpu``), forward and adjoint, median of >= 5 runs, ratios to ASTRA CPU.
3D: cone beam 64^3 x 90 views and 128^3 x 180 views with the torch projector: forward and
adjoint time and peak memory (each case in a fresh subprocess; peak RSS minus the RSS after
allocating the volume and sinogram is reported as the projector's own working memory).
Targets (issue 2): torch forward <= 1.5x ASTRA CPU, adjoint <= 2x; 3D forward + adjoint
<= 2 s at 64^3 x 90 and <= 20 s at 128^3 x 180 on 2 cores, peak memory < 1 GiB.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from operators import ConeBeam3D, Parallel2D, RayTransform, VolumeGeometry, uniform_angles  # noqa: E402


def median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (caches, allocator)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_2d(n: int, n_angles: int, n_det: int, repeats: int) -> list[dict]:
    vol = VolumeGeometry(shape=(n, n))
    geom = Parallel2D(angles=uniform_angles(n_angles), det_count=n_det)
    x = torch.rand(n, n, generator=torch.Generator().manual_seed(0))
    rows = []

    def add(name: str, fwd: Callable[[], object], adj: Callable[[], object]) -> None:
        rows.append(
            {
                "backend": name,
                "forward_s": median_time(fwd, repeats),
                "adjoint_s": median_time(adj, repeats),
            }
        )

    op = RayTransform(vol, geom, backend="torch")
    y = op(x)
    add("torch", lambda: op(x), lambda: op.T(y))
    try:
        import astra

        pid = astra.create_projector("linear", geom.to_astra(), vol.to_astra())
        xn = np.ascontiguousarray(x.numpy()[::-1])  # ASTRA rows run downwards
        yn = np.zeros(geom.shape, np.float32)
        xo = np.zeros_like(xn)
        add(
            "astra_cpu",
            lambda: astra.projector.direct_FP(pid, xn, out=yn),
            lambda: astra.projector.direct_BP(pid, yn, out=xo),
        )
    except Exception as err:  # noqa: BLE001 - report, don't crash the table
        rows.append({"backend": "astra_cpu", "error": repr(err)})
    try:
        opm = RayTransform(vol, geom, backend="matrix", dtype=torch.float32)
        add("matrix", lambda: opm(x), lambda: opm.T(y))
    except Exception as err:  # noqa: BLE001
        rows.append({"backend": "matrix", "error": repr(err)})
    try:
        import odl
        from odl.applications import tomo

        space = odl.uniform_discr([-n / 2, -n / 2], [n / 2, n / 2], (n, n), dtype="float32")
        apart = odl.uniform_partition(0, math.pi, n_angles)
        dpart = odl.uniform_partition(-n_det / 2, n_det / 2, n_det)
        ogeom = tomo.Parallel2dGeometry(apart, dpart)
        rt = tomo.RayTransform(space, ogeom, impl="astra_cpu")
        xe = rt.domain.element(x.numpy())
        ye = rt(xe)
        add("odl", lambda: rt(xe), lambda: rt.adjoint(ye))
    except Exception as err:  # noqa: BLE001
        rows.append({"backend": "odl", "error": repr(err)})
    return rows


def _vm_hwm_mb() -> float:
    """Peak resident memory of this process in MiB (Linux /proc; 0 where unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def bench_3d_case(n: int, n_views: int) -> dict:
    """Run in a fresh process; VmHWM (peak resident set of this process image, reset by
    exec unlike ru_maxrss, which a child inherits from its parent) is its own peak."""

    torch.manual_seed(0)
    vol = VolumeGeometry(shape=(n, n, n))
    geom = ConeBeam3D.default(vol, n_angles=n_views)
    op = RayTransform(vol, geom, backend="torch")
    x = torch.rand(vol.shape)
    y = torch.empty(geom.shape)
    base = _vm_hwm_mb()
    t0 = time.perf_counter()
    y = op(x)
    t1 = time.perf_counter()
    op.T(y)
    t2 = time.perf_counter()
    peak = _vm_hwm_mb()
    data_mb = (x.numel() + y.numel()) * 4 / 2**20
    return {
        "case": f"cone {n}^3 x {n_views} views, det {geom.det_shape}",
        "forward_s": t1 - t0,
        "adjoint_s": t2 - t1,
        "peak_rss_mb": peak,
        "working_mb": peak - base,
        "volume_plus_sinogram_mb": data_mb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--case3d", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.case3d:
        print(json.dumps(bench_3d_case(*args.case3d)))
        return

    n, n_angles, n_det = (128, 90, 183) if args.quick else (256, 180, 367)
    print(
        f"## 2D parallel {n}^2, {n_angles} angles, {n_det} bins (median of {args.repeats}, threads={args.threads})"
    )
    rows = bench_2d(n, n_angles, n_det, args.repeats)
    ref = next((r for r in rows if r["backend"] == "astra_cpu" and "error" not in r), None)
    print("| backend | forward ms | adjoint ms | forward / ASTRA | adjoint / ASTRA |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['backend']} | n/a | n/a | | | ({r['error'][:80]})")
            continue
        rf = f"{r['forward_s'] / ref['forward_s']:.2f}" if ref else "n/a"
        ra = f"{r['adjoint_s'] / ref['adjoint_s']:.2f}" if ref else "n/a"
        print(
            f"| {r['backend']} | {1e3 * r['forward_s']:.1f} | {1e3 * r['adjoint_s']:.1f} | {rf} | {ra} |"
        )

    cases = [(32, 45), (64, 90)] if args.quick else [(64, 90), (128, 180)]
    print("\n## 3D cone beam, torch projector (fresh process per case)")
    print(
        "| case | forward s | adjoint s | fwd+adj s | peak RSS MiB | working MiB | vol+sino MiB |"
    )
    print("|---|---|---|---|---|---|---|")
    for n3, views in cases:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--threads",
                str(args.threads),
                "--case3d",
                str(n3),
                str(views),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"| {r['case']} | {r['forward_s']:.2f} | {r['adjoint_s']:.2f} | "
            f"{r['forward_s'] + r['adjoint_s']:.2f} | {r['peak_rss_mb']:.0f} | {r['working_mb']:.0f} | "
            f"{r['volume_plus_sinogram_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()

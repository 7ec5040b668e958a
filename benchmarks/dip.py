"""DIP training speed: iterations per second and the operator's share of a step.

    .venv/bin/python benchmarks/dip.py            # the three cases below
    .venv/bin/python benchmarks/dip.py --quick    # fewer steps, for a smoke run
    .venv/bin/python benchmarks/dip.py --device cuda
    .venv/bin/python benchmarks/dip.py --threads 1  # small CPU problems run best on one thread

Cases (each a full ``fit_dip`` step: forward, loss with TV, backward, clip, Adam):
  * ``small`` preset on 28^2, parallel beam, 20 angles (the KMNIST setting);
  * a 5-scale, 64-channel U-Net (skips [0, 0, 0, 4, 4]) on 128^2, parallel beam, 60 angles;
  * 3D 64^3, 3 scales of 16 channels, cone beam, 60 views.

The operator share is measured in the same run: the time of the operator's part of a step
(``A x`` forward plus ``A^T r`` in the backward pass, timed alone on the same shapes) divided
by the time of the whole step. Target (issue 3): operator <= 25 % of a step with the torch
backend at 128^2. Speed figures are ratios inside one run; no absolute timing is asserted.
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

from dip_uq.dip.trainer import fit_dip  # noqa: E402
from dip_uq.dip.unet import UNet, UNetConfig, conv_weight_count  # noqa: E402
from operators import ConeBeam3D, Parallel2D, RayTransform, VolumeGeometry  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_step(fn, steps: int, device: torch.device) -> float:
    fn()  # warm-up: grids, allocator, cuDNN choice
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_case(name: str, shape, geometry_fn, config: UNetConfig, steps: int, device) -> dict:
    vol = VolumeGeometry(shape=shape)
    op = RayTransform(vol, geometry_fn(vol))
    x_true = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(device)
    y = op(x_true).detach()

    # one whole training step (what fit_dip does per iteration), timed through fit_dip itself
    net = UNet(config, generator=torch.Generator().manual_seed(0)).to(device)
    fit_dip(y, op, net=net, tv_weight=1e-4, iterations=2, lr=1e-4, progress=False)  # warm-up
    t_fit = []
    for _ in range(2):
        _sync(device)
        t0 = time.perf_counter()
        fit_dip(y, op, net=net, tv_weight=1e-4, iterations=steps, lr=1e-4, progress=False)
        _sync(device)
        t_fit.append((time.perf_counter() - t0) / steps)
    step = min(t_fit)  # includes the per-fit FBP input, amortised over `steps`

    # the operator's part: forward projection and its adjoint (the backward of A x)
    x = torch.rand(shape, device=device, requires_grad=True)

    def op_part() -> None:
        r = op(x) - y
        r.pow(2).sum().backward()

    t_op = _median_step(op_part, steps, device)
    return {
        "case": name,
        "shape": list(shape),
        "sinogram": list(op.range_shape),
        "conv_weights": conv_weight_count(net),
        "step_s": step,
        "iterations_per_s": 1.0 / step,
        "operator_s": t_op,
        "operator_share": t_op / step,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    steps = 5 if args.quick else 30
    cases = [
        ("small 28^2", (28, 28), lambda v: Parallel2D.default(v, n_angles=20), UNetConfig(ndim=2)),
        (
            "5x64 128^2",
            (128, 128),
            lambda v: Parallel2D.default(v, n_angles=60),
            UNetConfig(ndim=2, channels=(64,) * 5, skip_channels=(0, 0, 0, 4, 4)),
        ),
        (
            "3D 16ch 64^3",
            (64, 64, 64),
            lambda v: ConeBeam3D.default(v, n_angles=60),
            UNetConfig(ndim=3, channels=(16,) * 3, skip_channels=(0, 4, 4)),
        ),
    ]
    rows = []
    print(f"device={device}, torch threads={torch.get_num_threads()}, steps={steps}")
    print(f"{'case':14s} {'it/s':>8s} {'step ms':>9s} {'op ms':>8s} {'op share':>9s}")
    for name, shape, gfn, cfg in cases:
        s = 2 if (args.quick and len(shape) == 3) else (steps if len(shape) == 2 else 5)
        r = bench_case(name, shape, gfn, cfg, s, device)
        rows.append(r)
        print(
            f"{name:14s} {r['iterations_per_s']:8.2f} {1e3 * r['step_s']:9.1f} "
            f"{1e3 * r['operator_s']:8.1f} {100 * r['operator_share']:8.1f}%"
        )
    target = rows[1]["operator_share"] <= 0.25
    print(f"target operator share <= 25% at 128^2: {'met' if target else 'NOT met'}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

"""Calibration suite: is the default std map honest on real anatomy?

Every 2D case simulates a fan-beam scan of a real slice that ships offline with our
dependencies (:mod:`dip_uq.io.datasets.samples`: pydicom's CT and MR test slices, matplotlib's
MR head) or of a textured phantom (:func:`operators.phantoms.textured_phantom`), adds white
Gaussian noise (std = level · mean|A x|) and runs the **default call**
``reconstruct_with_uncertainty(y, A)`` (only the generator's seed is set). It then scores the
result against the ground truth, for the default predictive and, refitted from the same
held-out record (``UQResult.recalibrate``), for every calibration mode, and it records what
the held-out views predicted without the truth.

The cases are split: ``tune`` cases were looked at while choosing defaults, ``test`` cases
never were (they must not be used for tuning: report them as they come out). ``3d`` cases
are cone-beam scans (``ConeBeam3D.default``) of textured 3D phantoms.

    .venv/bin/python benchmarks/calibration.py --split all --out runs/calibration
    .venv/bin/python benchmarks/calibration.py --cases ct_small-64-60-2 --threads 2
    .venv/bin/python benchmarks/calibration.py --table runs/calibration   # table only

Each case writes ``OUT/<case>.json`` (a rerun skips finished cases) and ``OUT/<case>/`` (the
saved result); ``OUT/table.md`` gathers them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dip_uq import UQResult, reconstruct_with_uncertainty  # noqa: E402
from dip_uq.io.datasets.samples import sample_slice  # noqa: E402
from dip_uq.uq.evaluation import evaluate_uq  # noqa: E402
from operators import ConeBeam3D, FanBeam2D, RayTransform, VolumeGeometry  # noqa: E402
from operators.noise import add_gaussian_noise  # noqa: E402
from operators.phantoms import textured_phantom  # noqa: E402

#: name -> (image, size, views, noise level, split)
CASES = {
    "ct_small-64-60-2": ("ct_small", 64, 60, 0.02, "tune"),
    "ct_small-64-40-5": ("ct_small", 64, 40, 0.05, "tune"),
    "ct_head-64-50-3": ("ct_head", 64, 50, 0.03, "tune"),
    "mr_small-64-40-3": ("mr_small", 64, 40, 0.03, "tune"),
    "texture0-64-50-3": ("texture:0", 64, 50, 0.03, "tune"),
    "ct_head-96-50-3": ("ct_head", 96, 50, 0.03, "tune"),
    "ct_skull-64-60-2": ("ct_skull", 64, 60, 0.02, "test"),
    "ct_skull-96-50-3": ("ct_skull", 96, 50, 0.03, "test"),
    "mr_abdomen-64-40-5": ("mr_abdomen", 64, 40, 0.05, "test"),
    "mr_head-64-60-2": ("mr_head", 64, 60, 0.02, "test"),
    "texture1-64-40-4": ("texture:1", 64, 40, 0.04, "test"),
    "ct_small-96-50-3": ("ct_small", 96, 50, 0.03, "test"),
    # cone beam, textured phantoms (run on their own: --split 3d)
    "texture3d-32-60-5": ("texture3d:0", 32, 60, 0.05, "3d"),
    "texture3d-64-60-5": ("texture3d:0", 64, 60, 0.05, "3d"),
}
MODES = ("weights", "weights+noise", "per-component", "scalar", "none")
LEVELS = ("0.5", "0.9", "0.95")


def image_of(name: str, size: int) -> torch.Tensor:
    if name.startswith("texture3d:"):
        g = torch.Generator().manual_seed(int(name.split(":")[1]))
        return textured_phantom((size, size, size), generator=g)
    if name.startswith("texture:"):
        g = torch.Generator().manual_seed(int(name.split(":")[1]))
        return textured_phantom((size, size), generator=g)
    return sample_slice(name, size=size)


def scores(res: UQResult, x: torch.Tensor) -> dict:
    m = evaluate_uq(res, x, patch_sizes=())
    return {
        "coverage": m["coverage"],
        "zscore_std": m["zscore"]["std"],
        "test_ll": m["test_log_likelihood"],
        "constant_ll": m["constant_std_log_likelihood"],
        "corr": m["std_error_correlation"],
    }


#: ``--quick`` (the smoke test): a 24² image, 12 views and a few iterations of everything
QUICK = dict(
    size=24, views=12, options=dict(em_cycles=1, em_samples=4, n_samples=4, noise_probes=4)
)


def run_case(name: str, out: Path, threads: int, quick: bool = False) -> dict:
    image, size, views, level, split = CASES[name]
    torch.set_num_threads(threads)
    options: dict = {}
    if quick:
        size, views = QUICK["size"], QUICK["views"]
        options = {**QUICK["options"], "dip": {"iterations": 40}}
    x = image_of(image, size)
    vol = VolumeGeometry(shape=x.shape)
    geometry = (ConeBeam3D if x.dim() == 3 else FanBeam2D).default(vol, n_angles=views)
    op = RayTransform(vol, geometry)
    g = torch.Generator().manual_seed(0)
    y, std = add_gaussian_noise(op(x), rel=level, generator=g)
    t0 = time.perf_counter()
    res = reconstruct_with_uncertainty(
        y, op, generator=torch.Generator().manual_seed(0), progress=False, **options
    )
    seconds = time.perf_counter() - t0
    res.save(out / name)
    row = {
        "case": name,
        "split": split,
        "image": image,
        "size": size,
        "views": views,
        "noise": level,
        "seconds": seconds,
        "timings": res.diagnostics["timings"],
        "psnr": evaluate_uq(res, x, patch_sizes=())["psnr"],
        "noise_var_true": std**2,
        "noise_var": res.noise_var,
        "dip_misfit_over_true": res.diagnostics["dip"]["data_misfit"] / std**2,
        "dip_iterations": res.diagnostics["dip"].get("iterations"),
        "modes": {},
    }
    for mode in MODES:
        r = res if mode == res.calibration["mode"] else res.recalibrate(mode)
        row["modes"][mode] = {
            "image": scores(r, x),
            "scales": r.variance_scales,
            "heldout": r.calibration["calibrated"]["coverage"],
            "heldout_ll": r.calibration["calibrated"]["log_likelihood"],
            "predicted": r.calibration["predicted_image_coverage"]["calibrated"],
        }
    row["predicted_raw"] = res.calibration["predicted_image_coverage"]["raw"]
    # a diagnostic outside the product's modes: the weight posterior alone, scale fitted
    from dip_uq.uq.calibration import fit_variance_scales

    h = res.heldout
    s_w = fit_variance_scales(
        h["residual"], {"weights": h["variance_weights"]}, res.noise_var, mode="per-component"
    )["weights"]
    alone = UQResult(res.mean, (s_w * res.components["weights"]).sqrt(), res.noise_var)
    row["weights_alone"] = {"scale": s_w, "image": scores(alone, x)}
    (out / f"{name}.json").write_text(json.dumps(row, indent=2, default=float))
    return row


def table(rows: list[dict]) -> str:
    f3 = lambda v: f"{v:.3f}"  # noqa: E731
    lines = [
        "| case | split | PSNR | s | mode | cov 50/90/95 | z std | LL − const | held-out 90 "
        "| predicted 90 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for mode, m in r["modes"].items():
            im = m["image"]
            cov = "/".join(f3(im["coverage"][k]) for k in LEVELS)
            sc = ", ".join(f"{k} {v:.3g}" for k, v in m["scales"].items())
            lines.append(
                f"| {r['case']} | {r['split']} | {r['psnr']:.2f} | {r['seconds']:.0f} | {mode} "
                f"({sc}) | {cov} | {im['zscore_std']:.2f} | {im['test_ll'] - im['constant_ll']:+.3f} "
                f"| {m['heldout']['0.9']:.3f} | {m['predicted']['0.9']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def summary(rows: list[dict]) -> str:
    """The default predictive per case, and how many cases meet each target."""
    f3 = lambda v: f"{v:.3f}"  # noqa: E731
    lines = [
        "| case | split | PSNR | s | cov 50 / 90 | z std | LL − oracle | held-out 90 (meas. / "
        "pred. image) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    checks = {
        "90 % coverage in [0.85, 0.95]": lambda im, m: 0.85 <= im["coverage"]["0.9"] <= 0.95,
        "50 % coverage in [0.42, 0.58]": lambda im, m: 0.42 <= im["coverage"]["0.5"] <= 0.58,
        "z std in [0.8, 1.25]": lambda im, m: 0.8 <= im["zscore_std"] <= 1.25,
        "LL above the constant-std oracle": lambda im, m: im["test_ll"] > im["constant_ll"],
        "held-out measurement 90 % within 0.05": lambda im, m: (
            abs(m["heldout"]["0.9"] - im["coverage"]["0.9"]) <= 0.05
        ),
        "held-out predicted image 90 % within 0.05": lambda im, m: (
            abs(m["predicted"]["0.9"] - im["coverage"]["0.9"]) <= 0.05
        ),
    }
    met = dict.fromkeys(checks, 0)
    for r in rows:
        mode = next(iter(r["modes"]))  # the default mode is written first
        m = r["modes"][mode]
        im = m["image"]
        lines.append(
            f"| {r['case']} | {r['split']} | {r['psnr']:.2f} | {r['seconds']:.0f} | "
            f"{f3(im['coverage']['0.5'])} / {f3(im['coverage']['0.9'])} | "
            f"{im['zscore_std']:.2f} | {im['test_ll'] - im['constant_ll']:+.3f} | "
            f"{f3(m['heldout']['0.9'])} / {f3(m['predicted']['0.9'])} |"
        )
        for name, ok in checks.items():
            met[name] += bool(ok(im, m))
    lines += ["", f"| target | cases meeting it (of {len(rows)}) |", "|---|---|"]
    lines += [f"| {name} | {n} |" for name, n in met.items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--split", choices=("tune", "test", "all", "3d"), default="all")
    p.add_argument("--cases", nargs="+", help="case names (default: the split's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("runs/calibration"))
    p.add_argument("--table", type=Path, help="only print the table of finished cases here")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = p.parse_args(argv)
    if args.table is not None:
        rows = [json.loads(f.read_text()) for f in sorted(args.table.glob("*.json"))]
        print(summary(rows))
        print(table(rows))
        return 0
    names = args.cases or [
        n for n, c in CASES.items() if args.split == c[4] or (args.split == "all" and c[4] != "3d")
    ]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; choose from {sorted(CASES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in names:
        f = args.out / f"{n}.json"
        rows.append(
            json.loads(f.read_text())
            if f.exists()
            else run_case(n, args.out, args.threads, args.quick)
        )
        print(f"{n}: done", flush=True)
    md = summary(rows) + "\n" + table(rows)
    (args.out / "table.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Inputs and helpers of the bad-input battery (``tests/test_bad_inputs.py``): tiny
problems, the broken files the cases read, and the in-process command line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from dip_uq import UQResult, reconstruct_with_uncertainty
from dip_uq.cli import main
from dip_uq.dip import UNet, fit_dip
from dip_uq.io.geometry_file import read_geometry_file, write_geometry_file
from dip_uq.laplace import Laplace
from operators import (
    ConeBeam3D,
    FanBeam2D,
    MatrixOperator,
    Parallel2D,
    RayTransform,
    VolumeGeometry,
    uniform_angles,
)

NAN = float("nan")
V8 = VolumeGeometry(shape=(8, 8))
V16 = VolumeGeometry(shape=(16, 16))
V8_3D = VolumeGeometry(shape=(8, 8, 8))
PAR = Parallel2D(angles=uniform_angles(4), det_count=12)
A = RayTransform(V8, PAR)
X = torch.ones(8, 8)
Y = A(X)
FAST = dict(progress=False)  # fit_dip / pipeline keywords of every API case
TINY_UQ = dict(
    holdout=0, noise_term=False, hyper="fixed", solver="exact", n_samples=2, progress=False
)


def tiny_net(seed: int = 0) -> UNet:
    return UNet(
        channels=(4, 4), skip_channels=(0, 2), generator=torch.Generator().manual_seed(seed)
    )


def with_value(t: torch.Tensor, index: tuple, value: float) -> torch.Tensor:
    t = t.clone()
    t[index] = value
    return t


class CLIExit(Exception):
    """``dip-uq`` ended with exit status 2; the message is what it printed on stderr."""


# ------------------------------------------------------------------------------ the files
def build_env(d: Path) -> SimpleNamespace:
    """Every file the cases read, in ``d``: good ones and broken ones, plus three finished
    runs whose settings the resume cases change."""
    e = SimpleNamespace(dir=d)
    e.geom = write_geometry_file(d / "geom.toml", V8, PAR)
    e.sino = d / "sino.npy"
    np.save(e.sino, Y.numpy())
    e.gt_nan = d / "gt_nan.npy"
    np.save(e.gt_nan, with_value(X, (0, 0), NAN).numpy())
    e.gt_small = d / "gt_small.npy"
    np.save(e.gt_small, np.ones((4, 4)))
    e.complex_sino = d / "complex.npy"
    np.save(e.complex_sino, Y.numpy().astype(np.complex64))
    np.savez(d / "good.npz", sino=Y.numpy())
    npz = (d / "good.npz").read_bytes()
    e.trunc_npz = d / "trunc.npz"
    e.trunc_npz.write_bytes(npz[: len(npz) // 2])
    e.empty_npz = d / "empty.npz"
    e.empty_npz.write_bytes(b"")
    e.two_npz = d / "two.npz"
    np.savez(e.two_npz, a=Y.numpy(), b=Y.numpy())
    npy = e.sino.read_bytes()
    e.trunc_npy = d / "trunc.npy"
    e.trunc_npy.write_bytes(npy[: len(npy) // 2])
    e.object_npy = d / "object.npy"
    np.save(e.object_npy, np.array([{"a": 1}], dtype=object))
    for name in ("junk.tif", "junk.h5", "junk.dcm", "junk.xyz"):
        (d / name).write_bytes(b"junk" * 16)
    (d / "no_dicom").mkdir()
    (d / "no_dicom" / "notes.txt").write_text("not an image")
    e.a_file = d / "a_file"
    e.a_file.write_text("I am a file, not a directory")
    e.unwritable = _unwritable_dir(d)
    e.results = _saved_results(d)
    e.la = Laplace(_mlp(), "regression", n_samples=2).fit(
        DataLoader(TensorDataset(torch.randn(8, 3), torch.randn(8, 3)), batch_size=8)
    )
    e.dip_ckpt = d / "dip_ckpt"  # a finished fit_dip run with lr=1e-3
    fit_dip(Y, A, net=tiny_net(), tv_weight=0.0, iterations=2, lr=1e-3,
            checkpoint_dir=e.dip_ckpt, **FAST)  # fmt: skip
    e.uq_ckpt = d / "uq_ckpt"  # a finished pipeline run with the matern prior
    reconstruct_with_uncertainty(Y, A, dip={"iterations": 2}, checkpoint_dir=e.uq_ckpt,
                                 **TINY_UQ)  # fmt: skip
    e.cli_out = d / "cli_out"  # a finished `reconstruct` with --lr 1e-3
    assert main(reconstruct_argv(e, e.cli_out, "--lr", "1e-3")) == 0
    e.capsys = None  # set by the test
    return e


def _unwritable_dir(d: Path) -> Path | None:
    """A directory nothing can be created in (None where this process can write anywhere)."""
    if os.name == "posix" and os.geteuid() != 0:
        ro = d / "read_only"
        ro.mkdir()
        ro.chmod(0o500)
        return ro / "out"
    sys_dir = Path("/sys/dip-uq-battery")  # read-only even for root on Linux
    try:
        sys_dir.mkdir()
    except OSError:
        return sys_dir
    sys_dir.rmdir()
    return None


def _saved_results(d: Path) -> SimpleNamespace:
    """Saved UQResults, each damaged in one way."""
    r = UQResult(mean=torch.rand(16, 16), std=torch.rand(16, 16) + 0.1, noise_var=1.0)
    out = SimpleNamespace()
    for name in ("trunc_npz", "trunc_json", "no_std", "mismatch", "json_list", "no_noise_var"):
        setattr(out, name, r.save(d / "results" / name))
    npz = (out.trunc_npz / "result.npz").read_bytes()
    (out.trunc_npz / "result.npz").write_bytes(npz[: len(npz) // 2])
    text = (out.trunc_json / "result.json").read_text()
    (out.trunc_json / "result.json").write_text(text[: len(text) // 2])
    np.savez(out.no_std / "result.npz", mean=np.zeros((16, 16)))
    np.savez(out.mismatch / "result.npz", mean=np.zeros((16, 16)), std=np.ones((8, 8)))
    (out.json_list / "result.json").write_text("[1, 2]")
    (out.no_noise_var / "result.json").write_text("{}")
    out.result = r
    return out


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).eval()


def geometry_json(e, name: str, projection: dict, volume: dict | None = None) -> Path:
    """A JSON geometry file: an 8² volume and a parallel projection, with changes."""
    base = {"type": "parallel2d", "angles": [0.0, 1.0], "det_count": 12}
    content = {"volume": volume or {"shape": [8, 8]}, "projection": {**base, **projection}}
    path = e.dir / f"{name}.json"
    path.write_text(json.dumps(content))
    return path


def cone_vec(**projection) -> dict:
    g = ConeBeam3D(angles=uniform_angles(2), det_shape=(8, 12), src_origin=30, origin_det=10)
    return {"type": "cone3d_vec", "vectors": g.to_vec().tolist(), "det_shape": [8, 12],
            **projection}  # fmt: skip


def read_geometry(e, name: str, projection: dict, volume: dict | None = None):
    return read_geometry_file(geometry_json(e, name, projection, volume))


def reconstruct_argv(e, out: Path, *extra: str) -> list[str]:
    return ["reconstruct", str(e.sino), "-g", str(e.geom), "-o", str(out), "--iterations", "2",
            "--no-progress", *extra]  # fmt: skip


def uncertainty_argv(e, *extra: str) -> list[str]:
    return ["uncertainty", str(e.sino), "-g", str(e.geom), "-o", str(e.dir / "uq_out"),
            "--iterations", "2", "--no-progress", *extra]  # fmt: skip


def cli(e, argv: list[str]) -> int:
    """Run ``dip-uq`` in-process; exit status 2 raises :class:`CLIExit` with its stderr."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as stop:  # argparse's own errors
        rc = stop.code
    err = e.capsys.readouterr().err
    if rc == 2:
        assert "error:" in err, err
        raise CLIExit(err)
    return rc


def fan(src_origin: float, origin_det: float) -> FanBeam2D:
    return FanBeam2D(angles=uniform_angles(4), det_count=24, src_origin=src_origin,
                     origin_det=origin_det)  # fmt: skip


def cone(src_origin: float, origin_det: float) -> ConeBeam3D:
    return ConeBeam3D(angles=uniform_angles(4), det_shape=(8, 12), src_origin=src_origin,
                      origin_det=origin_det)  # fmt: skip


def nan_matrix_operator() -> MatrixOperator:
    m = torch.eye(64, dtype=torch.float64)[:48].clone()
    m[3, 5] = NAN
    return MatrixOperator(m.to_sparse(), (8, 8), (48,))


def laplace(likelihood="regression", **kw):
    return Laplace(_mlp(), likelihood, **kw)


def fit_laplace(likelihood: str, x: torch.Tensor, y: torch.Tensor):
    return laplace(likelihood, n_samples=2).fit([(x, y)])


X3 = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))


def text_file(path: Path, text: str) -> Path:
    path.write_text(text)
    return path

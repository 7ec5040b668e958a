"""``dip-uq uncertainty`` end to end on a tiny scan, and its bad-input errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dip_uq import UQResult
from dip_uq.cli import main
from dip_uq.dip import UNet, UNetConfig
from dip_uq.dip.pretrain import save_pretrained
from dip_uq.io.geometry_file import write_geometry_file
from operators import Parallel2D, RayTransform, VolumeGeometry, uniform_angles
from operators.noise import add_gaussian_noise
from operators.phantoms import random_ellipses

torch.set_num_threads(1)


def _scan(tmp_path):
    g = torch.Generator().manual_seed(0)
    vol = VolumeGeometry(shape=(16, 16))
    geo = Parallel2D(angles=uniform_angles(8), det_count=23)
    x = random_ellipses(16, n_ellipses=4, generator=g)
    y, _ = add_gaussian_noise(RayTransform(vol, geo)(x), rel=0.05, generator=g)
    write_geometry_file(tmp_path / "g.json", vol, geo)
    np.save(tmp_path / "y.npy", y.numpy())
    np.save(tmp_path / "x.npy", x.numpy())
    # a tiny U-Net keeps the exact solver cheap (the CLI takes any saved dip_uq U-Net)
    save_pretrained(
        UNet(UNetConfig(channels=(4, 4), skip_channels=(0, 2)), generator=g), tmp_path / "tiny.pt"
    )
    return tmp_path / "y.npy", tmp_path / "g.json", tmp_path / "x.npy"


def test_uncertainty_command(tmp_path, capsys):
    y, g, x = _scan(tmp_path)
    out = tmp_path / "o"
    args = [
        "uncertainty",
        str(y),
        "-g",
        str(g),
        "-o",
        str(out),
        "--iterations",
        "30",
        "--lr",
        "1e-3",
        "--em-cycles",
        "2",
        "--em-samples",
        "4",
        "--solver",
        "exact",
        "--net",
        str(tmp_path / "tiny.pt"),
        "--n-samples",
        "8",
        "--ground-truth",
        str(x),
        "--no-progress",
    ]
    rc = main(args)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    for name in (
        "reconstruction.npz",
        "reconstruction.tif",
        "std.npz",
        "std.tif",
        "uncertainty.png",
        "metrics.json",
    ):
        assert (out / name).stat().st_size > 0, name
    m = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(m["test_log_likelihood"]) and 0 <= m["coverage"]["0.9"] <= 1
    # the held-out views' scores, on every run
    assert m["heldout"]["views"] and 0 <= m["heldout"]["raw"]["coverage"]["0.9"] <= 1
    assert m["predictive"]["components"] == ["noise", "weights"]
    assert "held-out views" in captured.out
    assert (out / "std_weights.npz").stat().st_size > 0
    res = UQResult.load(out / "result")
    assert res.std.shape == (16, 16) and float(res.std.min()) >= 0
    assert len(res.trajectories["noise_var"]) == 2
    assert res.diagnostics["dtype"] == "float64"  # --precision default
    assert isinstance(res.diagnostics["warnings"], list)
    assert m["converged"] == res.converged and m["warnings"] == res.warnings
    # --resume finds every stage done and reproduces the map
    assert main(args + ["--resume"]) == 0
    torch.testing.assert_close(UQResult.load(out / "result").std, res.std)
    # EM's default is the methods' per-block schedule; --tied changes the stage, so a
    # resume under it is refused, naming the setting
    assert res.diagnostics["tied"] is False
    capsys.readouterr()
    assert main(args + ["--resume", "--tied"]) == 2
    assert "tied: saved False, now True" in capsys.readouterr().err


def test_uncertainty_bad_input(tmp_path, capsys):
    y, g, x = _scan(tmp_path)
    np.save(tmp_path / "bad.npy", np.zeros((3, 4), dtype=np.float32))
    out = ["-g", str(g), "-o", str(tmp_path / "o")]
    rc = main(["uncertainty", str(tmp_path / "bad.npy"), *out])
    assert rc == 2 and "does not match the geometry" in capsys.readouterr().err
    rc = main(["uncertainty", str(y), *out, "--n-samples", "0"])
    assert rc == 2 and "--n-samples" in capsys.readouterr().err
    rc = main(["uncertainty", str(y), *out, "--holdout", "1.5"])
    assert rc == 2 and "--holdout" in capsys.readouterr().err
    rc = main(["uncertainty", str(y), *out, "--linear-output"])
    assert rc == 2 and "--net" in capsys.readouterr().err
    rc = main(["uncertainty", str(y), *out, "--ground-truth", str(tmp_path / "bad.npy")])
    assert rc == 2 and "ground truth shape" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["uncertainty", str(y), *out, "--tied", "--per-block"])
    assert exc.value.code == 2 and "not allowed with" in capsys.readouterr().err

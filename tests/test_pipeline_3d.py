"""3D cone beam: the linearised DIP through sgd + EM on a 32³ volume."""

from __future__ import annotations

import math

import pytest
import torch

from dip_uq import reconstruct_with_uncertainty
from dip_uq.dip import UNet, UNetConfig, fit_dip
from operators import ConeBeam3D, RayTransform, VolumeGeometry
from operators.noise import add_gaussian_noise
from operators.phantoms import shepp_logan_3d

torch.set_num_threads(1)


@pytest.mark.parametrize("n", [8, pytest.param(32, marks=pytest.mark.slow)])
def test_cone_sgd_em(tmp_path, n):
    """32³ takes about 3 minutes on one shared core (slow); 8³ runs the same path."""
    g = torch.Generator().manual_seed(0)
    vol = VolumeGeometry(shape=(n, n, n))
    op = RayTransform(vol, ConeBeam3D.default(vol, n_angles=8))
    x = shepp_logan_3d((n, n, n))
    y, std = add_gaussian_noise(op(x), rel=0.05, generator=g)
    net = UNet(UNetConfig(ndim=3, channels=(4, 4), skip_channels=(0, 2)), generator=g)
    dip = fit_dip(
        op, y, net=net, tv_weight=1e-4, iterations=20, lr=1e-2, generator=g, progress=False
    )
    with pytest.warns(RuntimeWarning, match="did not converge"):
        res = reconstruct_with_uncertainty(
            y,
            op,
            dip=dip,
            solver="sgd",
            hyper="em",
            em_cycles=2,
            em_samples=4,
            n_samples=4,
            solver_opts={"iterations": 15, "tol": 1e-8, "lr": 1e-4},
            generator=g,
            progress=False,
        )
    assert res.std.shape == (n, n, n) and res.mean.shape == (n, n, n)
    assert torch.all(torch.isfinite(res.std)) and float(res.std.max()) > 0
    assert len(res.trajectories["noise_var"]) == 2
    assert all(math.isfinite(v) and v > 0 for v in res.trajectories["noise_var"])
    # warnings carry diagnostics, and the diagnostics are in the result
    assert all(not b["converged"] for b in res.diagnostics["sample_batches"])
    out = res.write_outputs(tmp_path, ground_truth=x)
    assert (tmp_path / "uncertainty.png").stat().st_size > 0
    assert out["metrics"]["ssim"] is None and math.isfinite(out["metrics"]["psnr"])

"""Calibration: a true image drawn from the model's own linear-Gaussian prior is covered by the
posterior's central intervals at their nominal rate."""

from __future__ import annotations

import torch

from dip_uq import reconstruct_with_uncertainty
from dip_uq.dip import UNet, UNetConfig, fit_dip
from dip_uq.metrics import coverage
from operators import Parallel2D, RayTransform, VolumeGeometry, uniform_angles
from operators.noise import add_gaussian_noise
from operators.phantoms import random_ellipses

torch.set_num_threads(1)


def test_intervals_cover_at_nominal_rate():
    g = torch.Generator().manual_seed(0)
    x = random_ellipses(12, n_ellipses=5, generator=g, dtype=torch.float64)
    op = RayTransform(
        VolumeGeometry(shape=(12, 12)), Parallel2D(angles=uniform_angles(10), det_count=17)
    )
    y, std = add_gaussian_noise(op(x), rel=0.05, generator=g)
    net = UNet(UNetConfig(channels=(4, 4), skip_channels=(0, 2), use_sigmoid=False), generator=g)
    dip = fit_dip(
        y,
        op,
        net=net.double(),
        tv_weight=1e-4,
        iterations=100,
        lr=1e-2,
        generator=g,
        progress=False,
    )
    nv, pv = std**2, 0.02
    kw = dict(
        dip=dip.net,
        net_input=dip.input,
        prior="matern",
        hyper="fixed",
        noise_var=nv,
        prior_variance=pv,
        solver="exact",
        exact_covariance=True,
        progress=False,
        holdout=0,  # the weight posterior alone (the held-out views' score: test_heldout_calibration)
        noise_term=False,
    )
    base = reconstruct_with_uncertainty(y, op, n_samples=1, **kw)
    la = base.laplace
    theta_star = la.theta_star()
    hits = {0.5: [], 0.9: [], 0.95: []}
    hits_mc = []
    for _ in range(25):
        theta = la.prior.sample(1, generator=g)[0]
        x_true = base.mean + la.functional_samples((theta - theta_star)[None])[0]
        y_new = op(x_true) + nv**0.5 * torch.randn(op.range_shape, generator=g, dtype=torch.float64)
        post = reconstruct_with_uncertainty(
            y_new, op, n_samples=400, sample_batch=400, generator=g, **kw
        )
        theta_lin = post.laplace.linear_mode("exact").samples[0]
        mean = post.mean + post.laplace.functional_samples((theta_lin - theta_star)[None])[0]
        exact_std = post.covariance.diagonal().sqrt().reshape(mean.shape)
        for lev, c in coverage(x_true, mean, exact_std).items():
            hits[lev].append(c)
        hits_mc.append(coverage(x_true, mean, post.std, levels=(0.9,))[0.9])
    for lev, cs in hits.items():
        assert abs(sum(cs) / len(cs) - lev) < 0.03, (lev, sum(cs) / len(cs))
    # the Monte-Carlo std map (400 samples) is calibrated too
    assert abs(sum(hits_mc) / len(hits_mc) - 0.9) < 0.03

"""Calibration on held-out views (docs/methods.md §6.3): the split, the scale fit, the scores,
and the pipeline's held-out record on a model whose truth is drawn from the model itself."""

from __future__ import annotations

import math

import pytest
import torch

from dip_uq import UQResult, reconstruct_with_uncertainty
from dip_uq.dip import UNet, UNetConfig, fit_dip
from dip_uq.uq.calibration import (
    FLOOR,
    calibrate_on_heldout,
    fit_variance_scales,
    holdout_views,
    measurement_scores,
    split_heldout,
)
from operators import FanBeam2D, Parallel2D, RayTransform, VolumeGeometry, uniform_angles
from operators.noise import add_gaussian_noise
from operators.phantoms import random_ellipses

pytestmark = pytest.mark.usefixtures("one_thread")


def test_holdout_views_are_stratified_and_seeded():
    v = holdout_views(60, 0.1, seed=0)
    assert len(v) == 6 and len(set(v)) == 6
    assert [i // 10 for i in v] == list(range(6))  # one view from each block of 10
    assert v == holdout_views(60, 0.1, seed=0) and v != holdout_views(60, 0.1, seed=1)
    assert len(holdout_views(10, 0.1)) == 2  # two at least: cross-fitting needs them
    assert len(holdout_views(6, 0.1)) == 1
    assert holdout_views(40, 0.0) == []
    with pytest.raises(ValueError, match="fewer than 2"):
        holdout_views(3, 0.5)
    with pytest.raises(ValueError, match="fraction"):
        holdout_views(10, 1.0)


def test_split_heldout_partitions_the_sinogram():
    vol = VolumeGeometry(shape=(12, 12))
    op = RayTransform(vol, FanBeam2D.default(vol, n_angles=20))
    x = torch.rand(12, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = op(x)
    sp = split_heldout(y, op, 0.2, seed=3)
    assert len(sp.views) == 4 and sorted(sp.views + sp.fit_views) == list(range(20))
    assert torch.allclose(sp.fit_operator(x), sp.fit_y) and torch.allclose(
        sp.heldout_operator(x), sp.heldout_y
    )
    assert sp.view_of.shape == (sp.heldout_y.numel(),)
    # measurement j of the flat held-out sinogram belongs to view view_of[j]
    assert torch.equal(sp.view_of.reshape(sp.heldout_y.shape)[:, 0], torch.arange(4))
    none = split_heldout(y, op, 0.0)
    assert none.heldout_operator is None and none.fit_operator is op


def test_fit_variance_scales_recovers_known_scales():
    g = torch.Generator().manual_seed(0)
    n = 4000
    vw = torch.rand(n, generator=g, dtype=torch.float64) * 4
    vd = torch.rand(n, generator=g, dtype=torch.float64)
    r = (3.0 * vw + 0.5 * vd + 1.0).sqrt() * torch.randn(n, generator=g, dtype=torch.float64)
    comps = {"weights": vw, "noise": vd}
    s = fit_variance_scales(r, comps, 1.0, mode="per-component")
    assert abs(s["weights"] / 3.0 - 1) < 0.15 and abs(s["noise"] / 0.5 - 1) < 0.6
    w = fit_variance_scales(r, comps, 1.0, mode="weights+noise")
    assert w["noise"] == 1.0 and 2.0 < w["weights"] < 3.5  # noise fixed at 1 > 0.5
    alone = fit_variance_scales(r, comps, 1.0, mode="weights")  # the noise part as a floor
    assert alone["noise"] == FLOOR and alone["weights"] > w["weights"]
    assert fit_variance_scales(r, comps, 1.0, mode="none") == {"weights": 1.0, "noise": 1.0}
    one = fit_variance_scales(r, comps, 1.0, mode="scalar")
    assert one["weights"] == one["noise"]
    with pytest.raises(ValueError, match="calibration mode"):
        fit_variance_scales(r, comps, 1.0, mode="magic")


def test_scores_on_a_true_model_are_nominal():
    """Truth drawn from the predictive itself: held-out coverage and the predicted image
    coverage are nominal, the fitted weight scale near 1, the PIT histogram flat. (Each draw's
    image error is shared by its 40 rays, so only 60 draws inform the scales: a component
    whose held-out variance hardly varies from ray to ray, like the noise part here, is
    poorly identified on its own; the "weights" mode fits only the weights' scale.)"""
    g = torch.Generator().manual_seed(1)
    n_vox, n_h, draws = 64, 40, 60
    Ah = torch.randn(n_h, n_vox, generator=g, dtype=torch.float64) / math.sqrt(n_vox)
    Lw = torch.randn(n_vox, 8, generator=g, dtype=torch.float64) * 0.3  # low-rank weights part
    dn = 0.05 + torch.rand(n_vox, generator=g, dtype=torch.float64) * 0.05  # diagonal noise part
    s2 = 0.02
    comps = {"weights": ((Ah @ Lw) ** 2).sum(1), "noise": (Ah**2 * dn).sum(1)}
    img = {"weights": (Lw**2).sum(1), "noise": dn}
    resid, views = [], []
    for k in range(draws):
        e = Lw @ torch.randn(8, generator=g, dtype=torch.float64) + dn.sqrt() * torch.randn(
            n_vox, generator=g, dtype=torch.float64
        )
        resid.append(Ah @ e + math.sqrt(s2) * torch.randn(n_h, generator=g, dtype=torch.float64))
        views.append(torch.full((n_h,), k))
    r = torch.cat(resid)
    cal = calibrate_on_heldout(
        r,
        {c: v.repeat(draws) for c, v in comps.items()},
        img,
        s2,
        torch.cat(views),
        list(range(draws)),
        mode="weights+noise",
    )
    assert abs(cal.raw["coverage"]["0.9"] - 0.9) < 0.03
    assert abs(cal.calibrated["coverage"]["0.9"] - 0.9) < 0.03
    assert abs(cal.predicted_image_coverage["raw"]["0.9"] - 0.9) < 0.03
    assert abs(cal.scales["weights"] - 1) < 0.35 and cal.scales["noise"] == 1.0, cal.scales
    assert max(cal.raw["pit_histogram"]) < 0.13 and cal.cross_fitted


def test_scores_see_an_overconfident_model():
    g = torch.Generator().manual_seed(2)
    v = torch.rand(3000, generator=g, dtype=torch.float64) + 0.5
    r = (9 * v + 0.1).sqrt() * torch.randn(3000, generator=g, dtype=torch.float64)
    views = torch.arange(3000) % 5
    cal = calibrate_on_heldout(
        r, {"weights": v}, {"weights": v.clone()}, 0.1, views, list(range(5)), mode="weights"
    )
    assert cal.raw["coverage"]["0.9"] < 0.5  # three times too confident in std
    assert abs(cal.scales["weights"] / 9 - 1) < 0.1
    assert abs(cal.calibrated["coverage"]["0.9"] - 0.9) < 0.03
    # the raw intervals would cover 2Φ(1.645/3) − 1 ≈ 0.42 of the image
    assert abs(cal.predicted_image_coverage["raw"]["0.9"] - 0.417) < 0.03
    s = measurement_scores(r, 9 * v + 0.1)
    assert abs(s["zscore_std"] - 1) < 0.05


def _tiny_problem():
    g = torch.Generator().manual_seed(0)
    x = random_ellipses(12, n_ellipses=5, generator=g, dtype=torch.float64)
    op = RayTransform(
        VolumeGeometry(shape=(12, 12)), Parallel2D(angles=uniform_angles(20), det_count=17)
    )
    y, std = add_gaussian_noise(op(x), rel=0.05, generator=g)
    return op, y, std, g


def test_heldout_score_when_truth_is_drawn_from_the_model():
    """The pipeline's held-out record: truths drawn from the linearised posterior of the fit
    views, held-out measurements simulated from them, are covered at the nominal rate."""
    op, y, std, g = _tiny_problem()
    sp = split_heldout(y, op, 0.2, seed=0)
    net = UNet(UNetConfig(channels=(4, 4), skip_channels=(0, 2), use_sigmoid=False), generator=g)
    dip = fit_dip(
        sp.fit_y,
        sp.fit_operator,
        net=net.double(),
        tv_weight=1e-4,
        iterations=100,
        lr=1e-2,
        generator=g,
        progress=False,
    )
    nv = std**2
    res = reconstruct_with_uncertainty(
        y,
        op,
        dip=dip.net,
        net_input=dip.input,
        holdout=0.2,
        holdout_seed=0,
        prior="matern",
        hyper="fixed",
        noise_var=nv,
        prior_variance=0.02,
        solver="exact",
        n_samples=600,
        sample_batch=600,
        noise_term=False,
        calibration="none",
        progress=False,
        generator=g,
    )
    assert res.calibration["views"] == sp.views and res.variance_scales == {"weights": 1.0}
    la = res.laplace
    held = sp.heldout_operator
    var_h = res.heldout["variance_weights"] + nv
    hits, img_hits = [], []
    z90 = 1.6448536269514722
    for _ in range(40):
        z = la.sample(1, "exact", g).samples
        x_true = res.mean + la.functional_samples(z)[0]
        y_h = held(x_true) + std * torch.randn(held.range_shape, generator=g, dtype=torch.float64)
        r = (y_h - held(res.mean)).reshape(-1)
        hits.append(float((r.abs() <= z90 * var_h.sqrt()).double().mean()))
        img_hits.append(float(((x_true - res.mean).abs() <= z90 * res.std).double().mean()))
    assert abs(sum(hits) / len(hits) - 0.9) < 0.03
    assert abs(sum(img_hits) / len(img_hits) - 0.9) < 0.03


def test_saved_result_carries_every_component(tmp_path):
    g = torch.Generator().manual_seed(0)
    mean = torch.rand(6, 6, generator=g)
    comps = {"weights": torch.rand(6, 6, generator=g), "noise": torch.rand(6, 6, generator=g)}
    n = 30
    heldout = {
        "residual": torch.randn(n, generator=g, dtype=torch.float64),
        "view_of": torch.arange(n) % 3,
        "variance_weights": torch.rand(n, generator=g, dtype=torch.float64),
        "variance_noise": torch.rand(n, generator=g, dtype=torch.float64),
    }
    scales = {"weights": 2.0, "noise": 1.0}
    res = UQResult(
        mean=mean,
        std=(2 * comps["weights"] + comps["noise"]).sqrt(),
        noise_var=0.1,
        components=comps,
        variance_scales=scales,
        calibration={"views": [1, 5, 9], "mode": "weights"},
        heldout=heldout,
    )
    res.save(tmp_path / "r")
    back = UQResult.load(tmp_path / "r")
    assert set(back.components) == {"weights", "noise"} and back.variance_scales == scales
    for c in comps:
        assert torch.equal(back.components[c], comps[c])
        assert torch.allclose(back.component_std(c), res.component_std(c))
    assert torch.allclose(back.std_weights, (2 * comps["weights"]).sqrt())
    assert back.calibration["views"] == [1, 5, 9]
    re = back.recalibrate("per-component")  # the held-out record survives the round trip
    assert re.calibration["mode"] == "per-component" and set(re.variance_scales) == set(comps)
    assert torch.allclose(re.std**2, sum(re.variance_scales[c] * comps[c] for c in comps))
    with pytest.raises(ValueError, match="shape"):
        UQResult(mean=mean, std=torch.ones(5, 5), noise_var=0.1)
    with pytest.raises(ValueError, match="held-out"):
        UQResult(mean=mean, std=mean, noise_var=0.1, components={"weights": mean}).recalibrate(
            "scalar"
        )

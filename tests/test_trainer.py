"""DIP training: quality against FBP/FDK, min-loss selection, checkpoints and resume,
determinism, MC dropout, pretraining, stopping rule and bad input."""

import math
from pathlib import Path

import pytest
import torch

from dip_uq.dip import checkpoint as ckpt_mod
from dip_uq.dip.checkpoint import CheckpointError, load_checkpoint
from dip_uq.dip.trainer import (
    CHECKPOINT_NAME,
    HeldOutStopping,
    VarianceStopping,
    fit_dip,
    initial_input,
)
from dip_uq.dip.unet import UNet, mc_dropout_samples
from dip_uq.metrics import psnr
from operators import ConeBeam3D, Parallel2D, RayTransform, VolumeGeometry
from operators.analytic import fbp, fdk
from operators.noise import add_gaussian_noise
from operators.phantoms import shepp_logan_2d, shepp_logan_3d

pytestmark = pytest.mark.usefixtures("one_thread")


def _problem_2d(n: int, n_angles: int, rel: float = 0.05, seed: int = 0):
    vol = VolumeGeometry(shape=(n, n))
    op = RayTransform(vol, Parallel2D.default(vol, n_angles=n_angles))
    x = shepp_logan_2d((n, n))
    y, _ = add_gaussian_noise(op(x), rel=rel, generator=torch.Generator().manual_seed(seed))
    return op, x, y


def _tiny_net(seed: int = 0, **kw) -> UNet:
    cfg = dict(channels=(4, 4), skip_channels=(0, 2), use_sigmoid=True)
    cfg.update(kw)
    return UNet(generator=torch.Generator().manual_seed(seed), **cfg)


def _gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------ quality
def test_dip_tv_beats_fbp_by_3db_on_shepp_logan():
    op, x, y = _problem_2d(64, 20)
    psnr_fbp = psnr(fbp(y, op), x)
    res = fit_dip(y, op, tv_weight=1e-3, iterations=400, lr=3e-3, generator=_gen(), progress=False)
    psnr_dip = psnr(res.image, x)
    assert psnr_dip >= psnr_fbp + 3.0, (psnr_dip, psnr_fbp)


@pytest.mark.slow
def test_dip_tv_beats_fbp_long_run_paper_lr():
    op, x, y = _problem_2d(64, 20)
    psnr_fbp = psnr(fbp(y, op), x)
    res = fit_dip(y, op, tv_weight=1e-3, iterations=3000, lr=1e-3, generator=_gen(), progress=False)
    assert psnr(res.image, x) >= psnr_fbp + 5.0


def test_3d_cone_beam_dip_improves_over_fdk():
    n = 32
    vol = VolumeGeometry(shape=(n, n, n))
    op = RayTransform(vol, ConeBeam3D.default(vol, n_angles=8))
    x = shepp_logan_3d((n, n, n))
    y, _ = add_gaussian_noise(op(x), rel=0.05, generator=_gen(0))
    psnr_fdk = psnr(fdk(y, op), x)
    net = {"channels": (8, 8, 8), "skip_channels": (0, 4, 4), "use_sigmoid": False}
    # γ for a volume (docs/dip.md): 1e-3 held this fit at 108× the noise and 16.0 dB
    res = fit_dip(
        y, op, net=net, tv_weight=1e-6, iterations=120, lr=3e-3, generator=_gen(), progress=False
    )
    assert res.image.shape == (n, n, n)
    # measured: FDK 15.7 dB, DIP 17.0 dB after 120 iterations (8 views, 5% noise)
    assert psnr(res.image, x) > psnr_fdk + 1.0


@pytest.mark.slow
def test_3d_cone_beam_dip_longer_run():
    n = 32
    vol = VolumeGeometry(shape=(n, n, n))
    op = RayTransform(vol, ConeBeam3D.default(vol, n_angles=8))
    x = shepp_logan_3d((n, n, n))
    y, _ = add_gaussian_noise(op(x), rel=0.05, generator=_gen(0))
    net = {"channels": (16, 16, 16), "skip_channels": (0, 4, 4), "use_sigmoid": False}
    res = fit_dip(
        y, op, net=net, tv_weight=3e-4, iterations=400, lr=2e-3, generator=_gen(), progress=False
    )
    # measured: FDK 15.7 dB, DIP 16.6 dB
    assert psnr(res.image, x) > psnr(fdk(y, op), x) + 0.5


# ------------------------------------------------------------------------------ selection
def test_returns_min_loss_iterate_not_last_nor_ground_truth_best():
    op, x, y = _problem_2d(16, 8)
    seen = {}

    def record(it, loss, image):
        seen[it] = (loss, image.clone())

    # a large step size makes the loss jump around, so the last iterate is not the best
    kw = dict(tv_weight=1e-3, iterations=40, lr=5e-2, init="noise", progress=False)
    res = fit_dip(y, op, net=_tiny_net(), generator=_gen(), callback=record, **kw)
    losses = res.loss_history
    assert len(losses) == 40 and res.iterations_run == 40
    assert res.best_iteration == int(torch.argmin(losses))
    assert res.best_loss == float(losses.min()) == seen[res.best_iteration][0]
    assert res.best_iteration != 39 or losses[39] == losses.min()
    assert torch.equal(res.image, seen[res.best_iteration][1])
    with torch.no_grad():  # the returned net carries the best parameters
        assert torch.equal(res.net(res.input).reshape(16, 16), res.image)
    # the loss is recomputed exactly from the image: (1/d_y)||A x - y||^2 + g TV(x)
    from dip_uq.dip.tv import tv

    img = res.image
    expected = float(((op(img) - y) ** 2).sum() / y.numel() + 1e-3 * tv(img))
    assert res.best_loss == pytest.approx(expected, rel=1e-5)
    # a ground truth only adds logging; it never changes the selection
    res_gt = fit_dip(y, op, net=_tiny_net(), generator=_gen(), ground_truth=x, log_every=10, **kw)
    assert res_gt.best_iteration == res.best_iteration
    assert torch.equal(res_gt.image, res.image)
    assert [m[0] for m in res_gt.metrics] == [0, 10, 20, 30, 39]


def test_deterministic_under_seed():
    op, _, y = _problem_2d(16, 8)
    kw = dict(tv_weight=1e-4, iterations=15, lr=1e-2, init="noise", progress=False)
    a = fit_dip(y, op, net={"channels": (4, 4), "skip_channels": (0, 2)}, generator=_gen(5), **kw)
    b = fit_dip(y, op, net={"channels": (4, 4), "skip_channels": (0, 2)}, generator=_gen(5), **kw)
    assert torch.equal(a.loss_history, b.loss_history)
    assert torch.equal(a.image, b.image)


# ------------------------------------------------------------------------------ checkpoints
class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_resume_equals_uninterrupted_bit_for_bit(tmp_path, dropout):
    op, _, y = _problem_2d(16, 8)
    kw = dict(tv_weight=1e-3, iterations=30, lr=1e-2, init="noise", progress=False)
    full = fit_dip(y, op, net=_tiny_net(dropout=dropout), generator=_gen(), **kw)

    def crash(it, loss, image):
        if it == 17:
            raise _Interrupt

    d = tmp_path / "ck"
    with pytest.raises(_Interrupt):
        fit_dip(
            y,
            op,
            net=_tiny_net(dropout=dropout),
            generator=_gen(),
            callback=crash,
            checkpoint_dir=d,
            checkpoint_every=5,
            **kw,
        )
    saved = load_checkpoint(d / CHECKPOINT_NAME)
    assert saved["iteration"] == 15  # the last completed checkpoint survived the crash
    # resume with a fresh (differently initialised) net and generator: state comes from disk
    res = fit_dip(
        y,
        op,
        net=_tiny_net(seed=99, dropout=dropout),
        generator=_gen(42),
        checkpoint_dir=d,
        checkpoint_every=5,
        resume=True,
        **kw,
    )
    assert torch.equal(res.loss_history, full.loss_history)
    assert res.best_iteration == full.best_iteration
    assert torch.equal(res.image, full.image)
    for (k, p), q in zip(res.net.state_dict().items(), full.net.state_dict().values()):
        assert torch.equal(p, q), k
    # resuming a finished run returns the same result without training
    again = fit_dip(
        y, op, net=_tiny_net(dropout=dropout), generator=_gen(), checkpoint_dir=d, resume=True, **kw
    )
    assert torch.equal(again.image, full.image)


def test_interrupted_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    op, _, y = _problem_2d(16, 8)
    kw = dict(tv_weight=1e-3, iterations=12, lr=1e-2, init="noise", progress=False)
    real_save = torch.save
    calls = {"n": 0}

    def flaky_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # die half way through the second checkpoint
            Path(f).write_bytes(b"partial garbage")
            raise KeyboardInterrupt
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt_mod.torch, "save", flaky_save)
    with pytest.raises(KeyboardInterrupt):
        fit_dip(
            y,
            op,
            net=_tiny_net(),
            generator=_gen(),
            checkpoint_dir=tmp_path,
            checkpoint_every=5,
            **kw,
        )
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["iteration"] == 5
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]  # no temp left behind
    # a process killed outright (SIGTERM) cannot clean up: the next run removes its leftover
    (tmp_path / f".{CHECKPOINT_NAME}.1a2b3c4d.tmp.pt").write_bytes(b"partial")
    fit_dip(y, op, net=_tiny_net(), generator=_gen(), checkpoint_dir=tmp_path,
            checkpoint_every=5, resume=True, **kw)  # fmt: skip
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]


def test_resume_refuses_a_different_problem(tmp_path):
    op, _, y = _problem_2d(16, 8)
    kw = dict(iterations=5, lr=1e-2, init="noise", progress=False, checkpoint_dir=tmp_path)
    fit_dip(y, op, net=_tiny_net(), tv_weight=1e-3, **kw)
    with pytest.raises(CheckpointError, match="tv_weight"):
        fit_dip(y, op, net=_tiny_net(), tv_weight=2e-3, resume=True, **kw)
    with pytest.raises(CheckpointError, match="sinogram values differ"):
        fit_dip(y * 1.1, op, net=_tiny_net(), tv_weight=1e-3, resume=True, **kw)
    with pytest.raises(CheckpointError, match="saturation barrier"):
        fit_dip(y, op, net=_tiny_net(), tv_weight=1e-3, resume=True, saturation_barrier=6.0, **kw)
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        fit_dip(y, op, net=_tiny_net(), tv_weight=1e-3, resume=True, **kw)


# ------------------------------------------------------------------------------ variants
def test_mcdo_variant_trains_and_samples():
    op, _, y = _problem_2d(16, 8)
    net = UNet.from_preset("small", dropout=0.05, generator=_gen(0))
    res = fit_dip(
        y, op, net=net, tv_weight=1e-3, iterations=10, lr=1e-3, generator=_gen(), progress=False
    )
    s = mc_dropout_samples(res.net, res.input, 8, generator=_gen(3))
    assert s.shape == (8, 1, 1, 16, 16)
    assert torch.isfinite(s).all() and float(s.std(0).mean()) > 0


def test_stopping_rule_stops_when_variance_stops_falling():
    rule = VarianceStopping(window=3, patience=6, every=1)
    stops = []
    for t in range(40):
        # oscillation amplitude falls until t=10, then grows again
        amp = abs(t - 10) + 1.0
        stops.append(rule.update(t, torch.full((4, 4), amp * (-1) ** t)))
    first = stops.index(True)
    assert rule.best_at in (10, 11, 12) and first == rule.best_at + 6


def test_stopping_rule_in_training_is_off_by_default_and_ends_runs():
    op, _, y = _problem_2d(16, 8)
    kw = dict(tv_weight=1e-3, iterations=60, lr=1e-2, init="noise", progress=False)
    res = fit_dip(y, op, net=_tiny_net(), generator=_gen(), **kw)
    assert res.iterations_run == 60 and not res.stopped_early
    rule = VarianceStopping(window=2, patience=1, every=1)
    res = fit_dip(y, op, net=_tiny_net(), generator=_gen(), stopping=rule, **kw)
    assert res.stopped_early and res.iterations_run < 60
    assert len(res.loss_history) == res.iterations_run


def _heldout_problem():
    vol = VolumeGeometry(shape=(16, 16))
    op = RayTransform(vol, Parallel2D.default(vol, n_angles=10))
    x = shepp_logan_2d((16, 16))
    y, _ = add_gaussian_noise(op(x), rel=0.05, generator=torch.Generator().manual_seed(0))
    fit, held = [v for v in range(10) if v % 5], [0, 5]
    from operators.subset import take_views

    return take_views(op, fit), y[fit], take_views(op, held), y[held]


def test_heldout_stopping_returns_the_lowest_heldout_iterate_and_stops():
    op, y, op_h, y_h = _heldout_problem()
    seen = {}

    def log(it, loss, image):  # the held-out residual of every iterate, computed here
        seen[it] = float((op_h(image) - y_h).pow(2).mean())

    kw = dict(tv_weight=1e-3, iterations=400, lr=1e-2, progress=False, callback=log)
    rule = HeldOutStopping(op_h, y_h, every=1, patience=5)
    res = fit_dip(y, op, net=_tiny_net(), generator=_gen(), stopping=rule, **kw)
    best = min(seen, key=seen.get)
    assert res.best_iteration == best == rule.best_at
    assert abs(float((op_h(res.image) - y_h).pow(2).mean()) - seen[best]) < 1e-6
    assert res.stopped_early and res.iterations_run == best + 5 + 1
    # not the lowest training loss: selection is on measurements the fit never saw
    assert res.best_iteration != int(res.loss_history.argmin()) or res.iterations_run < 400


def test_heldout_stopping_resumes_bit_for_bit(tmp_path):
    op, y, op_h, y_h = _heldout_problem()
    kw = dict(tv_weight=1e-3, iterations=40, lr=1e-2, init="noise", progress=False)

    def rule():
        return HeldOutStopping(op_h, y_h, every=3, patience=1000)

    full = fit_dip(y, op, net=_tiny_net(), generator=_gen(), stopping=rule(), **kw)

    def crash(it, loss, image):
        if it == 23:
            raise _Interrupt

    d = tmp_path / "ck"
    with pytest.raises(_Interrupt):
        fit_dip(
            y,
            op,
            net=_tiny_net(),
            generator=_gen(),
            stopping=rule(),
            callback=crash,
            checkpoint_dir=d,
            checkpoint_every=10,
            **kw,
        )
    res = fit_dip(
        y,
        op,
        net=_tiny_net(seed=5),
        generator=_gen(7),
        stopping=rule(),
        checkpoint_dir=d,
        checkpoint_every=10,
        resume=True,
        **kw,
    )
    assert res.best_iteration == full.best_iteration
    assert torch.equal(res.image, full.image)
    with pytest.raises(ValueError, match="patience"):
        HeldOutStopping(op_h, y_h, patience=0)
    with pytest.raises(ValueError, match="sinogram shape"):
        HeldOutStopping(op_h, y)


def test_init_options():
    op, _, y = _problem_2d(16, 8)
    z = initial_input(y, op, "fbp")
    assert torch.allclose(z[0, 0], fbp(y, op))
    zb = initial_input(y, op, "backprojection")
    c = float((zb[0, 0] * op.T(y)).sum() / op.T(y).pow(2).sum())
    # least-squares scale: A(c A^T y) is as close to y as any multiple
    for s in (0.9 * c, 1.1 * c):
        assert (op(zb[0, 0]) - y).norm() <= (op(s * op.T(y)) - y).norm()
    zn = initial_input(y, op, "noise", generator=_gen(0))
    assert zn.shape == (1, 1, 16, 16) and 0 <= zn.min() and zn.max() <= 0.1


# ------------------------------------------------------------------------------ bad input
def test_bad_input_names_the_problem(tmp_path):
    op, _, y = _problem_2d(16, 8)
    kw = dict(tv_weight=1e-3, iterations=3, progress=False, net=_tiny_net())
    with pytest.raises(ValueError, match=r"sinogram shape \(8, 20\) does not match .* \(8, 23\)"):
        fit_dip(y[:, :20], op, **kw)
    bad = y.clone()
    bad[2, 3] = math.nan
    with pytest.raises(ValueError, match="1 NaN or infinite"):
        fit_dip(bad, op, **kw)
    with pytest.raises(ValueError, match="tv_weight"):
        fit_dip(y, op, **{**kw, "tv_weight": -1.0})
    for its in (0, -5, 2.5):
        with pytest.raises(ValueError, match="iterations must be a positive integer"):
            fit_dip(y, op, **{**kw, "iterations": its})
    with pytest.raises(ValueError, match="resume=True needs a checkpoint_dir"):
        fit_dip(y, op, resume=True, **kw)
    with pytest.raises(ValueError, match="init must be"):
        fit_dip(y, op, init="zeros", **kw)
    with pytest.raises(TypeError, match="domain_shape"):
        fit_dip(y, object(), **kw)
    with pytest.raises(ValueError, match="ground_truth shape"):
        fit_dip(y, op, ground_truth=torch.zeros(3, 3), **kw)


def test_edip_pretraining_learns_saves_and_is_reused(tmp_path):
    from dip_uq.dip.pretrain import load_pretrained, pretrain_edip

    op, x, y = _problem_2d(16, 8)
    path = tmp_path / "edip.pt"
    res = pretrain_edip(
        op,
        net={"channels": (8, 8), "skip_channels": (0, 4)},
        n_images=16,
        iterations=60,
        batch_size=4,
        lr=1e-2,
        generator=_gen(0),
        save_path=path,
        progress=False,
    )
    h = res.loss_history
    assert float(h[-10:].mean()) < 0.5 * float(h[:10].mean())
    net = load_pretrained(path)
    for (k, p), q in zip(net.state_dict().items(), res.net.state_dict().values()):
        assert torch.equal(p, q), k
    # the saved file is reusable as the starting point of a DIP fit
    fit = fit_dip(y, op, net=path, tv_weight=1e-3, iterations=3, lr=1e-4, progress=False)
    assert fit.net.config == net.config
    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        load_pretrained(tmp_path / "none.pt")
    with pytest.raises(CheckpointError, match="not a pretrained"):
        load_pretrained(_dip_checkpoint(tmp_path, op, y))


def _dip_checkpoint(tmp_path, op, y):
    fit_dip(
        y,
        op,
        net=_tiny_net(),
        tv_weight=1e-3,
        iterations=2,
        init="noise",
        progress=False,
        checkpoint_dir=tmp_path / "ck",
    )
    return tmp_path / "ck" / CHECKPOINT_NAME


def test_progress_bar_with_ground_truth_logging(capsys):
    op, x, y = _problem_2d(16, 8)
    res = fit_dip(
        y,
        op,
        net=_tiny_net(),
        tv_weight=1e-3,
        iterations=12,
        lr=1e-2,
        init="noise",
        ground_truth=x,
        log_every=5,
        progress=True,
    )
    assert [m[0] for m in res.metrics] == [0, 5, 10, 11]
    assert all(math.isfinite(p) and -1 <= s <= 1 for _, p, s in res.metrics)
    assert "DIP" in capsys.readouterr().err  # tqdm writes to stderr


def test_param_clamp_bounds_every_parameter():
    op, _, y = _problem_2d(16, 8)
    res = fit_dip(
        y,
        op,
        net=_tiny_net(),
        tv_weight=1e-3,
        iterations=10,
        lr=5e-2,
        init="noise",
        param_clamp=0.05,
        progress=False,
    )
    assert max(float(p.detach().abs().max()) for p in res.net.parameters()) <= float(
        torch.tensor(0.05)
    )
    free = fit_dip(
        y, op, net=_tiny_net(), tv_weight=1e-3, iterations=10, lr=5e-2, init="noise", progress=False
    )
    assert max(float(p.detach().abs().max()) for p in free.net.parameters()) > 0.05
    with pytest.raises(ValueError, match="param_clamp"):
        fit_dip(y, op, net=_tiny_net(), tv_weight=0, iterations=1, param_clamp=-1.0)


def test_vector_geometry_falls_back_to_backprojection_input():
    from operators import ConeVec3D

    vol = VolumeGeometry(shape=(8, 8, 8))
    cone = ConeBeam3D.default(vol, n_angles=4)
    op = RayTransform(vol, ConeVec3D(vectors=cone.to_vec(), det_shape=cone.det_shape))
    y = op(shepp_logan_3d((8, 8, 8)))
    with pytest.warns(UserWarning, match="scaled backprojection"):
        z = initial_input(y, op, "fbp")
    assert torch.allclose(z, initial_input(y, op, "backprojection"))
    net = {"channels": (4, 4), "skip_channels": (0, 2)}
    with pytest.warns(UserWarning):
        res = fit_dip(y, op, net=net, tv_weight=0.0, iterations=2, progress=False)
    assert res.image.shape == (8, 8, 8)


# ------------------------------------------------------------------------------ saturation
def _dead_net(**kw) -> UNet:
    """Every output pre-activation past the sigmoid's -15 clamp: no gradient reaches it."""
    net = _tiny_net(**kw)
    with torch.no_grad():
        net.outc.bias.fill_(-20.0)
    return net


def test_saturation_barrier_revives_a_dead_sigmoid_output():
    """Without the barrier a fully saturated sigmoid U-Net receives zero gradient and never
    moves (the failure that loses small features on sparse images, docs/dip.md); with it the
    pre-activations climb back towards the live range and the fit starts."""
    op, x, y = _problem_2d(16, 8)
    kw = dict(tv_weight=1e-4, iterations=200, lr=1e-2, generator=_gen(), progress=False)
    stuck = fit_dip(y, op, net=_dead_net(), saturation_barrier=None, **kw)
    assert stuck.loss_history[0] == stuck.loss_history[-1]  # no gradient at all: frozen
    z = stuck.input
    assert stuck.net.saturated_fraction(z) == 1.0
    alive = fit_dip(y, op, net=_dead_net(), **kw)
    t = alive.net.pre_activation(z).detach()
    assert float(t.max()) > -15.0  # back inside the clamp: the data term acts again
    assert alive.best_loss < 0.5 * stuck.best_loss
    assert psnr(alive.image.reshape(x.shape), x) > psnr(stuck.image.reshape(x.shape), x) + 1


def test_saturation_barrier_adds_its_penalty_to_the_loss_and_only_for_sigmoid_nets():
    """The recorded first loss is data + TV + κ mean relu(|t| - c)², computed by hand; a
    linear-output net trains identically with and without the barrier."""
    from dip_uq.dip.tv import tv

    op, _, y = _problem_2d(16, 8)
    net = _dead_net()
    z = initial_input(y, op, "fbp")
    with torch.no_grad():
        t = net.pre_activation(z)
        img = net.activation(t).reshape(16, 16)
        data = float((op(img) - y).pow(2).sum() / y.numel())
        expect = data + 1e-4 * float(tv(img, ndim=2))
        expect += 2e-3 * float(torch.relu(t.abs() - 7.0).pow(2).mean())
    res = fit_dip(
        y, op, net=net, tv_weight=1e-4, iterations=1, saturation_barrier=7.0,
        saturation_weight=2e-3, progress=False,
    )  # fmt: skip
    assert float(res.loss_history[0]) == pytest.approx(expect, rel=1e-5)
    kw = dict(tv_weight=1e-4, iterations=20, lr=1e-2, generator=None, progress=False)
    a = fit_dip(y, op, net=_tiny_net(use_sigmoid=False), **kw)
    b = fit_dip(y, op, net=_tiny_net(use_sigmoid=False), saturation_barrier=None, **kw)
    assert torch.equal(a.loss_history, b.loss_history)
    for bad in (dict(saturation_barrier=0.0), dict(saturation_weight=-1.0)):
        with pytest.raises(ValueError, match="saturation"):
            fit_dip(y, op, net=_tiny_net(), **{**kw, **bad})


def test_data_misfit_is_reported_and_exposes_an_over_weighted_tv():
    """``data_misfit`` = (1/d_y)‖A x* − y‖² at the returned iterate; a TV weight far too
    large for the image holds the fit far above the noise (docs/dip.md: γ vs volume size)."""
    op, x, y = _problem_2d(32, 10)
    kw = dict(net=None, iterations=150, lr=3e-3, progress=False)
    res = {}
    for w in (1e-6, 1e-1):
        res[w] = fit_dip(y, op, tv_weight=w, generator=_gen(), **{**kw, "net": _tiny_net()})
        r = res[w]
        assert r.data_misfit == pytest.approx(float((op(r.image) - y).pow(2).mean()), rel=1e-5)
    assert res[1e-1].data_misfit > 2 * res[1e-6].data_misfit  # measured 1.84 vs 0.48

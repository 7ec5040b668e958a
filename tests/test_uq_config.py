"""UQConfig (one validated table of defaults) and the fingerprinted stage store."""

from __future__ import annotations

import json

import pytest
import torch

from dip_uq import reconstruct_with_uncertainty
from dip_uq.errors import CheckpointError
from dip_uq.uq.config import DIPConfig, UQConfig
from dip_uq.uq.store import StageStore, digest
from operators import Parallel2D, RayTransform, VolumeGeometry, uniform_angles
from operators.noise import add_gaussian_noise
from operators.phantoms import random_ellipses

pytestmark = pytest.mark.usefixtures("one_thread")


def test_defaults_validate_and_round_trip():
    cfg = UQConfig()
    assert cfg.holdout == 0.1 and cfg.calibration == "weights" and cfg.dtype == "float64"
    back = UQConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    c2 = cfg.replace(n_samples=128, dip={"iterations": 10}, dtype=torch.float32)
    assert c2.n_samples == 128 and c2.dip.iterations == 10 and c2.dip.lr == cfg.dip.lr
    assert c2.dtype == "float32" and c2.torch_dtype is torch.float32
    assert cfg.resolved_tied is False and cfg.replace(hyper="mll").resolved_tied is True
    assert cfg.replace(solver="exact").resolved_estimator == "exact"
    assert DIPConfig().tv_for(784) == pytest.approx(1e-4)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(holdout=1.0), "holdout"),
        (dict(prior="laplace"), "unknown prior"),
        (dict(hyper="bogus"), "unknown hyper"),
        (dict(solver="magic"), "unknown solver"),
        (dict(em_cycles=0), "em_cycles must be >= 1"),
        (dict(em_samples=-3), "em_samples must be >= 1"),
        (dict(n_samples=0), "n_samples must be >= 1"),
        (dict(noise_probes=1), "noise_probes must be >= 2"),
        (dict(calibration="magic"), "unknown calibration"),
        (dict(dtype="float16"), "unknown dtype"),
        (dict(prior_variance=-1.0), "prior_variance"),
        (dict(noise_var=float("nan")), "noise_var"),
        (dict(em_estimator="exact"), "needs the exact solver"),
        (dict(dip={"lr": 0.0}), "dip.lr"),
        (dict(dip={"stopping": "soon"}), "dip.stopping"),
        (dict(dip={"iterations": 2.5}), "dip.iterations"),
    ],
)
def test_bad_options_are_named(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        UQConfig().replace(**bad)


def test_unknown_option_is_refused_before_any_work():
    op = RayTransform(
        VolumeGeometry(shape=(8, 8)), Parallel2D(angles=uniform_angles(6), det_count=11)
    )
    y = torch.zeros(op.range_shape)
    with pytest.raises(TypeError, match="unknown option"):
        reconstruct_with_uncertainty(y, op, n_sample=3)
    with pytest.raises(ValueError, match="unknown hyper"):
        reconstruct_with_uncertainty(y, op, hyper="magic")
    with pytest.raises(TypeError, match="UQConfig"):
        reconstruct_with_uncertainty(y, op, config={"n_samples": 3})


def test_digest_is_deterministic_and_sensitive():
    a = torch.arange(6.0).reshape(2, 3)
    assert digest(a, {"x": 1}) == digest(a.clone(), {"x": 1})
    assert digest(a) != digest(a + 1e-7) and digest(a) != digest(a.double())
    assert digest({"b": 1, "a": 2}) == digest({"a": 2, "b": 1})


def test_store_reuses_refuses_and_recomputes(tmp_path):
    store = StageStore(tmp_path)
    assert store.load("s", {"k": 1}, "u1") is None
    store.save("s", {"k": 1}, "u1", {"v": torch.ones(2)})
    assert torch.equal(store.load("s", {"k": 1}, "u1")["v"], torch.ones(2))
    with pytest.raises(CheckpointError, match="k: saved 1, now 2"):
        store.load("s", {"k": 2}, "u1")
    assert store.load("s", {"k": 1}, "u2") is None and store.recomputed == ["s"]
    assert StageStore(tmp_path, resume=False).load("s", {"k": 1}, "u1") is None
    (tmp_path / ".s.pt.abcd.tmp.pt").write_bytes(b"half")  # a killed writer's leftover
    StageStore(tmp_path)
    assert not list(tmp_path.glob(".*.tmp*"))


def test_resume_after_a_longer_dip_recomputes_the_later_stages(tmp_path):
    """A rerun with more DIP iterations continues the DIP from its checkpoint and recomputes
    every later stage (their inputs changed), matching a fresh run."""
    g = torch.Generator().manual_seed(0)
    x = random_ellipses(12, n_ellipses=4, generator=g)
    op = RayTransform(
        VolumeGeometry(shape=(12, 12)), Parallel2D(angles=uniform_angles(10), det_count=17)
    )
    y, _ = add_gaussian_noise(op(x), rel=0.05, generator=g)
    kw = dict(em_cycles=1, em_samples=4, n_samples=4, noise_probes=4, progress=False,
              dip={"iterations": 10, "net": {"channels": (4, 4), "skip_channels": (0, 2)}})  # fmt: skip
    reconstruct_with_uncertainty(
        y, op, checkpoint_dir=tmp_path, generator=torch.Generator().manual_seed(1), **kw
    )
    kw["dip"] = {**kw["dip"], "iterations": 30}
    resumed = reconstruct_with_uncertainty(
        y, op, checkpoint_dir=tmp_path, generator=torch.Generator().manual_seed(1), **kw
    )
    fresh = reconstruct_with_uncertainty(y, op, generator=torch.Generator().manual_seed(1), **kw)
    assert set(resumed.diagnostics["recomputed_stages"]) >= {"hyper", "samples", "noise_term"}
    torch.testing.assert_close(resumed.mean, fresh.mean)
    assert resumed.noise_var == pytest.approx(fresh.noise_var, rel=1e-6)
    torch.testing.assert_close(resumed.std, fresh.std, rtol=1e-5, atol=1e-9)

"""An interrupted uncertainty run resumes bit for bit, whichever stage it was killed in.

The run is interrupted right after a stage's checkpoint was written (EM after one cycle, the
sample stream after its first batch, the noise term, the finished hyperparameters); the
rerun, with a different generator (the saved state is restored), must give exactly the std
map, noise variance and scales of an uninterrupted run.
"""

import pytest
import torch

from dip_uq import reconstruct_with_uncertainty
from dip_uq.dip import UNet, UNetConfig
from operators import Parallel2D, RayTransform, VolumeGeometry, uniform_angles
from operators.noise import add_gaussian_noise
from operators.phantoms import random_ellipses

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    x = random_ellipses(12, n_ellipses=5, generator=g, dtype=torch.float64)
    op = RayTransform(
        VolumeGeometry(shape=(12, 12)), Parallel2D(angles=uniform_angles(20), det_count=17)
    )
    y, _ = add_gaussian_noise(op(x), rel=0.05, generator=g)
    net = UNet(UNetConfig(channels=(4, 4), skip_channels=(0, 2)), generator=g).double()
    return y, op, net


def _run(problem, tmp_path, seed):
    y, op, net = problem
    return reconstruct_with_uncertainty(
        y,
        op,
        dip={"net": net.config.to_dict(), "iterations": 60, "lr": 1e-2, "tv_weight": 1e-4},
        prior="normal",
        em_cycles=3,
        em_samples=4,
        n_samples=8,
        sample_batch=4,
        noise_probes=4,
        holdout=0.2,
        solver="cg",
        dtype=torch.float64,
        checkpoint_dir=tmp_path,
        generator=torch.Generator().manual_seed(seed),
        progress=False,
    )


def _interrupt_after(monkeypatch, name: str):
    """The first write of checkpoint ``name`` (a stage's, or the DIP's own) raises right
    after it landed on disk."""
    import dip_uq.dip.run as dip_run
    import dip_uq.uq.store as store

    for module in (store, dip_run):
        real = module.atomic_save

        def save(obj, path, real=real):
            out = real(obj, path)
            if str(path).endswith(f"{name}.pt"):
                raise KeyboardInterrupt
            return out

        monkeypatch.setattr(module, "atomic_save", save)


@pytest.mark.parametrize("stage", ["dip_checkpoint", "em_cycle", "hyper", "samples", "noise_term"])
def test_interrupted_run_resumes_bit_for_bit(problem, tmp_path, monkeypatch, stage):
    ref = _run(problem, tmp_path / "ref", seed=5)
    with monkeypatch.context() as m:
        _interrupt_after(m, stage)
        with pytest.raises(KeyboardInterrupt):
            _run(problem, tmp_path / "cut", seed=5)
    res = _run(problem, tmp_path / "cut", seed=123)
    assert torch.equal(res.mean, ref.mean)
    rel = float(((res.std - ref.std).abs() / ref.std).max())
    assert torch.equal(res.std, ref.std), rel
    assert res.noise_var == ref.noise_var
    assert res.variance_scales == ref.variance_scales

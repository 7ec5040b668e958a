"""LoDoPaB loader, operator and noise model on tiny fake HDF5 files in the official layout."""

from __future__ import annotations

import math
import pickle

import h5py
import numpy as np
import pytest
import torch

from dip_uq.io import DataFormatError
from dip_uq.io.datasets.lodopab import (
    LODOPAB_MU_MAX,
    LoDoPaB,
    lodopab_geometry,
    lodopab_noise,
    lodopab_operator,
)

IMG, ANG, DET = 8, 10, 13  # tiny stand-ins for 362, 1000, 513
SHAPES = {"image_shape": (IMG, IMG), "sinogram_shape": (ANG, DET)}


def _obj(seed: int) -> torch.Tensor:
    """A lopsided image in our (y, x) order."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(IMG, IMG, dtype=torch.float64)
    r, c = torch.randint(0, IMG - 3, (2,), generator=g).tolist()
    x[r : r + 3, c : c + 2] = 0.5
    x[1, IMG - 2] = 1.0
    return x


def write_part(root, part="test", counts=(128, 128)):
    """Fake files: ground truth stored in ODL order (ours transposed), observations made by
    our operator from our orientation."""
    op = lodopab_operator(image_size=IMG, n_angles=ANG, det_count=DET)
    i = 0
    for k, n in enumerate(counts):
        gts = torch.stack([_obj(i + s) for s in range(n)])
        obs = op(gts)
        i += n
        with h5py.File(root / f"ground_truth_{part}_{k:03d}.hdf5", "w") as f:
            f["data"] = gts.transpose(1, 2).numpy().astype(np.float32)
        with h5py.File(root / f"observation_{part}_{k:03d}.hdf5", "w") as f:
            f["data"] = obs.numpy().astype(np.float32)


def test_random_access_across_files_and_orientation(tmp_path):
    write_part(tmp_path)
    ds = LoDoPaB(tmp_path, "test", **SHAPES)
    assert len(ds) == 256
    op = lodopab_operator(image_size=IMG, n_angles=ANG, det_count=DET)
    for i in (0, 127, 128, 255, -1):
        obs, gt = ds[i]
        assert obs.shape == (ANG, DET) and gt.shape == (IMG, IMG)
        np.testing.assert_allclose(gt.double().numpy(), _obj(i % 256).numpy(), atol=1e-7)
        np.testing.assert_allclose(op(gt.double()).numpy(), obs.numpy(), atol=1e-5)
    raw = LoDoPaB(tmp_path, "test", orientation="raw", **SHAPES)
    np.testing.assert_array_equal(raw[130][1].numpy(), ds[130][1].numpy().T)
    # Pickles (DataLoader workers) without open file handles and reads again.
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone[5][0].numpy(), ds[5][0].numpy())
    ds.close()


def test_index_past_end_names_files(tmp_path):
    write_part(tmp_path, counts=(128, 3))
    ds = LoDoPaB(tmp_path, "test", **SHAPES)
    assert len(ds) == 131
    with pytest.raises(IndexError, match=r"index 131 out of range: .* 131 test samples .*001.hdf5"):
        ds[131]


def test_geometry_matches_the_data_set_description():
    vol, geom = lodopab_geometry()
    assert vol.shape == (362, 362)
    np.testing.assert_allclose(vol.min_pt, (-0.13, -0.13))
    np.testing.assert_allclose(vol.max_pt, (0.13, 0.13))
    assert len(geom.angles) == 1000
    assert geom.angles[0] == pytest.approx(math.pi / 2000)
    assert geom.angles[1] - geom.angles[0] == pytest.approx(math.pi / 1000)
    assert geom.det_count == 513
    assert geom.det_spacing * 513 / 2 == pytest.approx(0.18385, abs=1e-5)
    op = lodopab_operator(downsample=181, angle_step=100)
    assert op.domain_shape == (2, 2) and op.range_shape == (10, 513)
    with pytest.raises(ValueError, match="divide 362"):
        lodopab_operator(downsample=3)


def test_orientation_agrees_with_odl():
    """The stored arrays come from ODL: ODL's ray transform on the stored (x, y) array equals
    ours on its transpose, with the same angles and detector."""
    odl = pytest.importorskip("odl")
    from odl.applications import tomo

    space = odl.uniform_discr([-0.13, -0.13], [0.13, 0.13], (IMG, IMG), dtype="float32")
    geom = tomo.parallel_beam_geometry(space, num_angles=ANG, det_shape=(DET,))
    try:
        ray = tomo.RayTransform(space, geom, impl="astra_cpu")
    except Exception as err:  # pragma: no cover - ASTRA CPU missing
        pytest.skip(f"ODL astra_cpu unavailable: {err}")
    ours = _obj(3).numpy().astype(np.float32)
    want = np.asarray(ray(ours.T.copy()).data)
    got = lodopab_operator(image_size=IMG, n_angles=ANG, det_count=DET)(torch.from_numpy(ours))
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(geom.angles, lodopab_geometry(n_angles=ANG)[1].angles)


def test_noise_model_statistics_and_zero_counts():
    y = torch.full((20000,), 0.02, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    noisy = lodopab_noise(y, generator=g)
    counts = 4096 * torch.exp(-LODOPAB_MU_MAX * noisy)
    # Counts are integers with Poisson mean and variance n0 exp(-mu y).
    assert torch.allclose(counts, counts.round(), atol=1e-6)
    lam = 4096 * math.exp(-LODOPAB_MU_MAX * 0.02)
    assert float(counts.mean()) == pytest.approx(lam, rel=0.01)
    assert float(counts.var()) == pytest.approx(lam, rel=0.05)
    # Opaque rays: zero counts become 0.1 -> -log(0.1/4096)/mu_max.
    dark = lodopab_noise(torch.full((5,), 1.0), generator=g)
    np.testing.assert_allclose(dark.numpy(), -math.log(0.1 / 4096) / LODOPAB_MU_MAX, rtol=1e-6)
    a = lodopab_noise(y[:10], generator=torch.Generator().manual_seed(1))
    b = lodopab_noise(y[:10], generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="NaN"):
        lodopab_noise(torch.tensor([float("nan")]))


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no ground_truth_test_NNN.hdf5"):
        LoDoPaB(tmp_path, "test", **SHAPES)
    write_part(tmp_path, counts=(4, 4))
    with pytest.raises(
        DataFormatError,
        match=r"ground_truth_test_000.hdf5: dataset 'data' has shape \(4, 8, 8\), expected \(samples, 362, 362\)",
    ):
        LoDoPaB(tmp_path, "test")
    (tmp_path / "observation_test_001.hdf5").unlink()
    with pytest.raises(
        FileNotFoundError, match="observation_test_001.hdf5: observation file missing"
    ):
        LoDoPaB(tmp_path, "test", **SHAPES)
    with h5py.File(tmp_path / "observation_test_001.hdf5", "w") as f:
        f["data"] = np.zeros((3, ANG, DET), np.float32)
    with pytest.raises(DataFormatError, match="observation_test_001.hdf5: 3 samples but"):
        LoDoPaB(tmp_path, "test", **SHAPES)
    (tmp_path / "observation_test_001.hdf5").write_bytes(b"not hdf5")
    with pytest.raises(DataFormatError, match="observation_test_001.hdf5: cannot open HDF5"):
        LoDoPaB(tmp_path, "test", **SHAPES)
    with pytest.raises(ValueError, match="part"):
        LoDoPaB(tmp_path, "training")

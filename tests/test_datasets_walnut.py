"""Walnut loader on tiny fake data sets written in the exact on-disk layout."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from dip_uq.io import DataFormatError
from dip_uq.io.datasets.walnut import (
    WALNUT_DETECTOR_SHAPE,
    MatrixOperator,
    _chord_lengths,
    closest_rows,
    load_walnut_ground_truth,
    load_walnut_projections,
    max_fraction_rows,
    read_walnut_geometry,
    resample_detector,
    walnut_orient,
    walnut_slice_problem,
)
from operators import ConeBeam3D, ConeVec3D, RayTransform, VolumeGeometry

VOL = VolumeGeometry(shape=(5, 5, 5), voxel_size=0.1)  # mm, like the real 0.1 mm grid
DARK, FLAT0, FLAT1 = 100.0, 1150.0, 850.0  # mean flat - dark = 900


def fake_vectors(angles, *, rows, cols, src_z=0.0, pixel=0.15) -> np.ndarray:
    """cone_vec rows: source 2 mm from the axis, detector 1 mm beyond (magnification 1.5)."""
    g = ConeBeam3D(
        angles=angles, det_shape=(rows, cols), det_spacing=pixel, src_origin=2.0, origin_det=1.0
    )
    v = g.to_vec()
    v[:, 2] += src_z  # orbit height
    v[:, 5] += src_z
    return v


def write_walnut(root: Path, det_images: np.ndarray, vecs: np.ndarray, *, orbit: int = 2) -> Path:
    """Write ``det_images`` (views, rows, cols) -- intended line integrals paired with
    ``vecs[:views]`` -- in the raw layout: reversed file order, inverse orientation fix,
    transmissions, dark and flats, plus the duplicate first angle as file 0."""
    pdir = root / "Projections" / f"tubeV{orbit}"
    pdir.mkdir(parents=True)
    n = det_images.shape[0]
    assert vecs.shape[0] == n + 1
    np.savetxt(pdir / "scan_geom_corrected.geom", vecs)
    to_raw = lambda img: np.flipud(img.T)  # noqa: E731 - inverse of transpose(flipud(.))
    rows, cols = det_images.shape[1:]
    tifffile.imwrite(pdir / "di000000.tif", np.full((cols, rows), DARK, np.float32))
    tifffile.imwrite(pdir / "io000000.tif", np.full((cols, rows), FLAT0, np.float32))
    tifffile.imwrite(pdir / "io000001.tif", np.full((cols, rows), FLAT1, np.float32))
    for k in range(n):  # geometry row k <-> file n - k
        raw = DARK + 900.0 * np.exp(-to_raw(det_images[k]))
        tifffile.imwrite(pdir / f"scan_{n - k:06d}.tif", raw.astype(np.float32))
    tifffile.imwrite(
        pdir / "scan_000000.tif", (DARK + 900.0 * np.exp(-to_raw(det_images[0]))).astype(np.float32)
    )
    return root


def write_reconstruction(root: Path, vol: np.ndarray) -> None:
    rdir = root / "Reconstructions"
    rdir.mkdir(parents=True)
    for k in range(vol.shape[0]):
        tifffile.imwrite(rdir / f"full_AGD_50_{k:06d}.tiff", vol[k].astype(np.float32))


ANGLES = (0.0, 0.7, 2.1, 2 * math.pi)  # 3 views + the repeated first angle (like 1201 rows)


def test_orientation_fix_and_reverse_file_pairing(tmp_path):
    rows, cols, n = 8, 6, 3
    # Distinct per-view, per-pixel values: view k, detector pixel (r, c) -> k + 0.01 r + 0.1 c.
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    det = np.stack([k + 0.01 * r + 0.1 * c for k in range(n)]).astype(np.float64)
    write_walnut(tmp_path, det, fake_vectors(ANGLES, rows=rows, cols=cols))
    raw3 = tifffile.imread(tmp_path / "Projections/tubeV2/scan_000003.tif")
    assert raw3.shape == (cols, rows)  # raw files are portrait: (cols, rows) like 768 x 972
    # Hand check of the fix on one pixel: detector (r, c) = raw (cols - 1 - c, r).
    assert walnut_orient(raw3)[5, 1] == raw3[cols - 1 - 1, 5]
    data = load_walnut_projections(tmp_path, volume=VOL)
    assert data.projections.shape == (rows, n, cols)  # (det_rows, angles, det_cols)
    assert [f.name for f in data.files] == ["scan_000003.tif", "scan_000002.tif", "scan_000001.tif"]
    assert data.geometry_rows == (0, 1, 2)
    got = data.projections.permute(1, 0, 2).double().numpy()
    np.testing.assert_allclose(got, det, rtol=0, atol=2e-6)
    assert got[2, 7, 5] == pytest.approx(2 + 0.07 + 0.5, abs=2e-6)
    assert WALNUT_DETECTOR_SHAPE == (972, 768)


def test_angle_subsampling_pairs_files_with_rows(tmp_path):
    rows, cols = 8, 6
    det = np.stack([np.full((rows, cols), float(k)) for k in range(3)])
    vecs = fake_vectors(ANGLES, rows=rows, cols=cols)
    write_walnut(tmp_path, det, vecs)
    data = load_walnut_projections(tmp_path, angle_step=2, volume=VOL)
    assert [f.name for f in data.files] == ["scan_000003.tif", "scan_000001.tif"]
    np.testing.assert_allclose(data.geometry.to_vec(), vecs[[0, 2]])
    np.testing.assert_allclose(data.projections[0, :, 0], [0.0, 2.0], atol=2e-6)


def test_resample_detector_by_hand():
    v = fake_vectors((0.3,), rows=8, cols=6)
    d, u, vv = v[0, 3:6], v[0, 6:9], v[0, 9:12]
    # Keep columns 1, 3, 5 (centres -1.5, 0.5, 2.5 in u) and rows 0, 4 (-3.5, 0.5 in v):
    # new centre d + 0.5 u - 1.5 v, u' = 2 u, v' = 4 v.
    new, shape = resample_detector(v, (8, 6), step=(4, 2), offset=(0, 1), mode="subsample")
    assert shape == (2, 3)
    np.testing.assert_allclose(new[0, 3:6], d + 0.5 * u - 1.5 * vv, atol=1e-12)
    np.testing.assert_allclose(new[0, 6:9], 2 * u)
    np.testing.assert_allclose(new[0, 9:12], 4 * vv)
    old = ConeVec3D(vectors=v, det_shape=(8, 6)).detector_pixels()[0]
    sub = ConeVec3D(vectors=new, det_shape=shape).detector_pixels()[0]
    np.testing.assert_allclose(sub, old[0::4, 1::2], atol=1e-12)
    # Binning 6 columns by 4 drops the remainder: one pixel = mean of columns 0..3.
    new, shape = resample_detector(v, (8, 6), step=(1, 4), mode="bin")
    assert shape == (8, 1)
    binned = ConeVec3D(vectors=new, det_shape=shape).detector_pixels()[0]
    np.testing.assert_allclose(binned[:, 0], old[:, 0:4].mean(1), atol=1e-12)
    np.testing.assert_allclose(new[0, 3:6], d - 1.0 * u, atol=1e-12)  # (0+1+2+3)/4 - 2.5 = -1
    with pytest.raises(ValueError, match="mode"):
        resample_detector(v, (8, 6), step=2, mode="average")


def test_detector_binning_of_data(tmp_path):
    rows, cols = 8, 6
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    det = np.stack([0.1 * r + 0.01 * c + k for k in range(3)])
    write_walnut(tmp_path, det, fake_vectors(ANGLES, rows=rows, cols=cols))
    data = load_walnut_projections(tmp_path, det_step=2, det_mode="bin", volume=VOL)
    assert data.projections.shape == (4, 3, 3)
    want = det.reshape(3, 4, 2, 3, 2).mean(axis=(2, 4)).transpose(1, 0, 2)
    np.testing.assert_allclose(data.projections.numpy(), want, atol=2e-6)
    assert data.geometry.det_shape == (4, 3)


def test_point_projects_where_cone_vec_says(tmp_path):
    """A hot voxel projects, through our torch projector and the loaded geometry, to the
    detector pixel given by ASTRA's cone_vec formula (solved by hand for view 0)."""
    rows, cols = 9, 9
    vecs = fake_vectors(ANGLES, rows=rows, cols=cols, src_z=0.05, pixel=0.1)
    write_walnut(tmp_path, np.zeros((3, rows, cols)), vecs)
    data = load_walnut_projections(tmp_path, volume=VolumeGeometry(shape=(9, 9, 9), voxel_size=0.1))
    vol = torch.zeros(9, 9, 9, dtype=torch.float64)
    iz, iy, ix = 6, 2, 5
    vol[iz, iy, ix] = 1.0
    p = [data.volume.coords(2)[ix], data.volume.coords(1)[iy], data.volume.coords(0)[iz]]
    # By hand for view 0 (angle 0): source (0, -2, 0.05), detector centre (0, 1, 0.05),
    # u = 0.1 x, v = 0.1 z; the ray through p meets the plane y = 1 at
    # s + (1 + 2)/(p_y + 2) (p - s); pixel = centre + offset / 0.1.
    s = np.array([0.0, -2.0, 0.05])
    hit = s + 3.0 / (p[1] + 2.0) * (np.array(p) - s)
    want = ((hit[2] - 0.05) / 0.1 + (rows - 1) / 2, hit[0] / 0.1 + (cols - 1) / 2)
    np.testing.assert_allclose(data.geometry.project_point(p)[0], want, atol=1e-9)
    sino = RayTransform(data.volume, data.geometry, backend="torch")(vol)  # (rows, views, cols)
    expected = data.geometry.project_point(p)
    for k in range(3):
        img = sino[:, k, :]
        rr, cc = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        centroid = ((img * rr).sum() / img.sum(), (img * cc).sum() / img.sum())
        np.testing.assert_allclose([float(centroid[0]), float(centroid[1])], expected[k], atol=0.35)


def test_projections_match_our_operator(tmp_path):
    """Data made by our projector from a lopsided object, stored in the raw layout, load back
    to the same sinogram: file order, pairing, orientation and -log all consistent."""
    rows, cols = 8, 6
    vecs = fake_vectors(ANGLES, rows=rows, cols=cols, src_z=0.02)
    obj = torch.zeros(5, 5, 5, dtype=torch.float64)
    obj[1:3, 0:2, 3:5] = 1.0
    obj[3, 2:4, 1] = 2.0
    geom = ConeVec3D(vectors=vecs[:3], det_shape=(rows, cols))
    sino = RayTransform(VOL, geom, backend="torch")(obj).numpy()  # (rows, views, cols)
    write_walnut(tmp_path, sino.transpose(1, 0, 2), vecs)
    data = load_walnut_projections(tmp_path, volume=VOL)
    assert data.geometry == geom
    np.testing.assert_allclose(data.projections.numpy(), sino, atol=1e-5)
    assert float(np.abs(sino[:, 0] - sino[:, 1]).max()) > 0.05  # views really differ


def test_ground_truth_slices(tmp_path):
    vol = np.arange(5 * 4 * 3, dtype=np.float32).reshape(5, 4, 3)
    write_reconstruction(tmp_path, vol)
    np.testing.assert_array_equal(load_walnut_ground_truth(tmp_path).numpy(), vol)
    np.testing.assert_array_equal(load_walnut_ground_truth(tmp_path, slices=3).numpy(), vol[3])
    (tmp_path / "Reconstructions/full_AGD_50_000002.tiff").unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        load_walnut_ground_truth(tmp_path)


def test_slice_problem_matches_brute_force(tmp_path):
    """Slice 2 of 5 sits at z = 0, the source orbit too, and the detector has an odd number of
    rows: the chosen row is the central one and its rays lie in the slice. For an object
    constant along z the 3D data then equal the slice operator applied to the slice."""
    rows, cols = 7, 6
    vecs = fake_vectors(ANGLES, rows=rows, cols=cols)
    gt2 = torch.zeros(5, 5, dtype=torch.float64)
    gt2[1:4, 2:4] = 0.05
    gt2[0, 0] = 0.07
    obj = gt2.expand(5, 5, 5).contiguous()
    geom = ConeVec3D(vectors=vecs[:3], det_shape=(rows, cols))
    sino = RayTransform(VOL, geom, backend="torch")(obj).numpy()
    write_walnut(tmp_path, sino.transpose(1, 0, 2), vecs)
    write_reconstruction(tmp_path, obj.numpy())
    prob = walnut_slice_problem(
        tmp_path, angle_step=1, col_step=2, slice_index=2, volume=VOL, dtype=torch.float64, chunk=4
    )
    assert prob.rows.shape == (3, 3) and bool((prob.rows == 3).all())
    assert prob.measurements.shape == (3, 3)
    np.testing.assert_allclose(prob.measurements.numpy(), 14 * sino[3, :, 0::2], atol=1e-4)
    np.testing.assert_allclose(prob.ground_truth.numpy(), 14 * gt2.numpy(), atol=1e-6)
    np.testing.assert_allclose(
        prob.operator(prob.ground_truth).numpy(), prob.measurements.numpy(), atol=1e-4
    )
    # The sparse matrix equals the dense matrix from forward-projecting every basis image.
    slab_op = RayTransform(prob.volume, prob.rays, backend="torch")
    basis = torch.eye(25, dtype=torch.float64).reshape(25, 1, 5, 5)
    dense = slab_op(basis).reshape(25, 9).T
    np.testing.assert_allclose(prob.operator.matrix.to_dense().numpy(), dense.numpy(), atol=1e-12)
    # Exact transpose.
    g = torch.Generator().manual_seed(0)
    x, y = (
        torch.randn(5, 5, generator=g, dtype=torch.float64),
        torch.randn(3, 3, generator=g, dtype=torch.float64),
    )
    lhs = float((prob.operator(x) * y).sum())
    rhs = float((x * prob.operator.T(y)).sum())
    assert lhs == pytest.approx(rhs, rel=1e-12)


def test_closest_rows_against_brute_force():
    vecs = fake_vectors((0.0, 1.1), rows=9, cols=4, src_z=0.3)
    geom = ConeVec3D(vectors=vecs, det_shape=(9, 4))
    z0 = 0.12
    got = closest_rows(geom, z0)
    pix = geom.detector_pixels()  # (views, rows, cols, 3)
    src = geom.sources()
    for k in range(2):
        for j in range(4):
            best, arg = np.inf, -1
            for i in range(9):  # sample the ray densely; height where it is nearest the axis
                t = np.linspace(0, 1, 20001)[:, None]
                pts = src[k] + t * (pix[k, i, j] - src[k])
                z = pts[np.argmin(np.hypot(pts[:, 0], pts[:, 1])), 2]
                if abs(z - z0) < best:
                    best, arg = abs(z - z0), i
            assert got[k, j] == arg


# ----------------------------------------------------------------------------- bad input


def _good(tmp_path) -> Path:
    return write_walnut(tmp_path, np.zeros((3, 8, 6)), fake_vectors(ANGLES, rows=8, cols=6))


def test_missing_projection_file_is_named(tmp_path):
    _good(tmp_path)
    (tmp_path / "Projections/tubeV2/scan_000002.tif").unlink()
    with pytest.raises(FileNotFoundError, match="scan_000002.tif"):
        load_walnut_projections(tmp_path, volume=VOL)
    with pytest.raises(FileNotFoundError, match="tubeV1"):
        load_walnut_projections(tmp_path, orbit=1, volume=VOL)


def test_wrong_image_shape_is_named(tmp_path):
    _good(tmp_path)
    tifffile.imwrite(tmp_path / "Projections/tubeV2/scan_000001.tif", np.ones((8, 6), np.float32))
    with pytest.raises(
        DataFormatError, match=r"scan_000001.tif: image shape \(8, 6\), expected \(6, 8\)"
    ):
        load_walnut_projections(tmp_path, volume=VOL)


def test_truncated_tiff_is_named(tmp_path):
    _good(tmp_path)
    path = tmp_path / "Projections/tubeV2/scan_000003.tif"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DataFormatError, match="scan_000003.tif: cannot read TIFF"):
        load_walnut_projections(tmp_path, volume=VOL)


def test_geometry_with_wrong_column_count(tmp_path):
    _good(tmp_path)
    geom = tmp_path / "Projections/tubeV2/scan_geom_corrected.geom"
    np.savetxt(geom, np.zeros((4, 11)))
    with pytest.raises(DataFormatError, match="scan_geom_corrected.geom: line 1 has 11 columns"):
        read_walnut_geometry(geom)
    with pytest.raises(DataFormatError, match="11 columns"):
        load_walnut_projections(tmp_path, volume=VOL)


def test_dead_pixels_are_clipped_with_warning(tmp_path):
    _good(tmp_path)
    path = tmp_path / "Projections/tubeV2/scan_000002.tif"
    raw = tifffile.imread(path)
    raw[0, 0] = DARK  # zero transmission
    tifffile.imwrite(path, raw)
    with pytest.warns(UserWarning, match="1 pixel values"):
        data = load_walnut_projections(tmp_path, volume=VOL)
    assert torch.isfinite(data.projections).all()
    assert float(data.projections.max()) == pytest.approx(-math.log(1e-6), rel=1e-6)


def test_max_fraction_rows_against_full_3d_projection():
    """The literature's rule, brute force: project the slice's indicator and a volume of ones
    through the whole 3D grid for every detector pixel; take the row with the largest ratio."""
    vol = VolumeGeometry(shape=(7, 7, 7), voxel_size=0.1)
    vecs = fake_vectors((0.0, 1.1, 2.5), rows=15, cols=5, src_z=0.13, pixel=0.1)
    geom = ConeVec3D(vectors=vecs, det_shape=(15, 5))
    op = RayTransform(vol, geom, backend="torch")
    for k in (1, 3, 4):
        ind = torch.zeros(7, 7, 7, dtype=torch.float64)
        ind[k] = 1.0
        frac = op(ind) / op(torch.ones(7, 7, 7, dtype=torch.float64)).clamp_min(1e-12)
        want = frac.argmax(dim=0).numpy()  # (views, cols)
        np.testing.assert_array_equal(max_fraction_rows(geom, vol, k), want)


def test_chord_lengths_by_hand():
    vol = VolumeGeometry(shape=(4, 4, 4), voxel_size=0.5)  # box [-1, 1]^3
    src = np.array([[-5.0, 0.0, 0.0], [-5.0, 0.0, 0.0], [-5.0, 3.0, 0.0], [0.0, 0.0, 0.0]])
    pix = np.array([[5.0, 0.0, 0.0], [5.0, 5.0, 0.0], [5.0, 3.0, 0.0], [0.0, 0.0, 9.0]])
    # Along x through the centre: 2. The line y = (x + 5)/2 has y >= 2 for x >= -1: misses.
    # Parallel to x at y = 3: misses. Along z through the centre (the whole line counts, like
    # the projector's, even though the source sits inside): 2.
    np.testing.assert_allclose(_chord_lengths(src, pix, vol), [2.0, 0.0, 0.0, 2.0])


def test_matrix_operator_batches_autograd_and_errors():
    ind = torch.tensor([[0, 1, 2, 2], [0, 3, 5, 1]])
    m = torch.sparse_coo_tensor(
        ind, torch.tensor([1.0, 2.0, 3.0, -1.0]), (3, 6), check_invariants=True
    )
    op = MatrixOperator(m, (2, 3), (3,))
    dense = m.to_dense().double()
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    np.testing.assert_allclose(op(x).numpy(), (x.reshape(4, 6) @ dense.T).numpy(), atol=1e-12)
    y = torch.randn(5, 3, dtype=torch.float64)
    np.testing.assert_allclose(op.T(y).numpy(), (y @ dense).reshape(5, 2, 3).numpy(), atol=1e-12)
    assert op.T.domain_shape == (3,) and op.T.range_shape == (2, 3) and op.T.T is op
    xr = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(op, (xr,))
    assert op.norm() == pytest.approx(float(torch.linalg.matrix_norm(dense, 2)), rel=1e-6)
    with pytest.raises(ValueError, match=r"expected input \(\.\.\., \(2, 3\)\), got \(3, 2\)"):
        op(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="does not match range"):
        MatrixOperator(m, (2, 2), (3,))


def test_slice_matrix_cache(tmp_path, monkeypatch):
    from dip_uq.io.datasets import walnut as wmod

    root = tmp_path / "w"
    vecs = fake_vectors(ANGLES, rows=7, cols=6)
    write_walnut(root, np.random.default_rng(0).random((3, 7, 6)), vecs)
    kw = dict(angle_step=1, col_step=2, slice_index=2, volume=VOL, with_ground_truth=False)
    cache = tmp_path / "cache" / "A.npz"
    first = walnut_slice_problem(root, cache=cache, **kw)
    assert cache.is_file()

    def no_probe(*args, **kwargs):
        raise AssertionError("the cached matrix should have been used")

    monkeypatch.setattr(wmod, "probe_matrix", no_probe)
    again = walnut_slice_problem(root, cache=cache, **kw)
    assert torch.equal(again.operator.matrix.to_dense(), first.operator.matrix.to_dense())
    # Other settings: the stale cache is not used (here: would have to probe).
    with pytest.raises(AssertionError, match="cached matrix"):
        walnut_slice_problem(root, cache=cache, **{**kw, "col_step": 3})
    monkeypatch.undo()
    third = walnut_slice_problem(root, cache=cache, **{**kw, "col_step": 3})
    assert third.operator.matrix.shape == (6, 25)  # 3 views x 2 columns
    assert sorted(p.name for p in cache.parent.iterdir()) == ["A.npz"]

"""Geometries are value objects: validated, comparable, printable, sliceable, convertible."""

import math

import numpy as np
import pytest

from operators import (
    ConeBeam3D,
    ConeVec3D,
    FanBeam2D,
    GeometryError,
    Parallel2D,
    Parallel3D,
    ParallelVec3D,
    VolumeGeometry,
    uniform_angles,
)
from operators.geometry import ProjectionGeometry


def all_geometries():
    v2 = VolumeGeometry(shape=(10, 12), voxel_size=0.5)
    v3 = VolumeGeometry(shape=(6, 8, 7), voxel_size=(1.0, 0.5, 0.5))
    cone = ConeBeam3D.default(v3, n_angles=5)
    par3 = Parallel3D.default(v3, n_angles=5)
    return [
        Parallel2D.default(v2, n_angles=6),
        FanBeam2D.default(v2, n_angles=6),
        par3,
        cone,
        par3.to_vec_geometry(),
        cone.to_vec_geometry(),
    ]


def test_volume_geometry_coordinates():
    v = VolumeGeometry(shape=(4, 6), voxel_size=(2.0, 0.5), center=(1.0, -1.0))
    assert v.extent == (8.0, 3.0)
    assert v.min_pt == (-3.0, -2.5)
    assert v.max_pt == (5.0, 0.5)
    np.testing.assert_allclose(v.coords(0), [-2.0, 0.0, 2.0, 4.0])
    # world (x, y) -> (row, col) continuous index; row follows y upwards.
    np.testing.assert_allclose(v.world_to_index([-2.25, -2.0]), [0.0, 0.0])
    np.testing.assert_allclose(v.world_to_index([0.25, 4.0]), [3.0, 5.0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(shape=(4,)), "shape"),
        (dict(shape=(0, 4)), ">= 1"),
        (dict(shape=(4, 4), voxel_size=-1.0), "voxel_size"),
        (dict(shape=(4, 4), voxel_size=(1.0, 1.0, 1.0)), "voxel_size"),
    ],
)
def test_volume_geometry_rejects_bad_input(kwargs, message):
    with pytest.raises(GeometryError, match=message):
        VolumeGeometry(**kwargs)


def test_constructors_are_keyword_only():
    with pytest.raises(TypeError):
        Parallel2D((0.0, 1.0), 10)  # type: ignore[misc]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Parallel2D(angles=[], det_count=4), "empty"),
        (lambda: Parallel2D(angles=[0.0, float("nan")], det_count=4), "NaN"),
        (lambda: Parallel2D(angles=[0.0], det_count=0), "det_count"),
        (lambda: Parallel2D(angles=[0.0], det_count=4, det_spacing=0), "det_spacing"),
        (lambda: FanBeam2D(angles=[0.0], det_count=4, src_origin=-1, origin_det=1), "src_origin"),
        (lambda: ConeBeam3D(angles=[0.0], det_shape=(4,), src_origin=5), "det_shape"),
        (lambda: ConeVec3D(vectors=np.zeros((2, 11)), det_shape=(2, 2)), r"\(n_views, 12\)"),
        (lambda: ConeVec3D(vectors=np.zeros((0, 12)), det_shape=(2, 2)), "empty"),
        (lambda: ConeVec3D(vectors=np.ones((2, 12)) * np.nan, det_shape=(2, 2)), "NaN"),
    ],
)
def test_projection_geometry_rejects_bad_input(make, message):
    with pytest.raises(GeometryError, match=message):
        make()


@pytest.mark.parametrize("geom", all_geometries(), ids=lambda g: type(g).__name__)
def test_value_semantics(geom: ProjectionGeometry):
    # equality and hashing by value
    if "vectors" in repr(geom):  # vector geometries abbreviate their (n, 12) table
        clone = type(geom)(vectors=geom.to_vec(), det_shape=geom.det_shape)
    else:  # the repr reads like the constructor call and evaluates back to an equal object
        clone = eval(repr(geom), {**globals(), "math": math, "uniform_angles": uniform_angles})
    assert clone == geom
    assert hash(clone) == hash(geom)
    # immutability
    with pytest.raises(AttributeError):
        geom.det_shape = (1, 1)  # type: ignore[misc]
    # slicing selects views and keeps everything else
    half = geom[::2]
    assert len(half) == math.ceil(len(geom) / 2)
    np.testing.assert_array_equal(half.to_vec(), geom.to_vec()[::2])
    assert geom[1] == geom[[1]]
    assert half != geom
    # sinogram shape convention
    if geom.ndim == 2:
        assert geom.shape == (len(geom), geom.det_shape[0])
    else:
        assert geom.shape == (geom.det_shape[0], len(geom), geom.det_shape[1])


def test_vector_form_matches_astra_formulas():
    g = ConeBeam3D(
        angles=[0.3], det_shape=(3, 4), det_spacing=(2.0, 1.5), src_origin=10, origin_det=5
    )
    s, c = math.sin(0.3), math.cos(0.3)
    expected = [s * 10, -c * 10, 0, -s * 5, c * 5, 0, c * 1.5, s * 1.5, 0, 0, 0, 2.0]
    np.testing.assert_allclose(g.to_vec()[0], expected)
    p = Parallel2D(angles=[0.3], det_count=4, det_spacing=2.0)
    np.testing.assert_allclose(p.to_vec()[0], [s, -c, 0, 0, 2 * c, 2 * s])


def test_project_point_centre_and_offsets():
    g = Parallel2D(angles=[0.0, math.pi / 2], det_count=11)
    # at angle 0 the detector u axis is +x; at pi/2 it is +y
    np.testing.assert_allclose(g.project_point([2.0, -3.0])[:, 1], [5 + 2.0, 5 - 3.0])
    cone = ConeBeam3D(angles=[0.0], det_shape=(9, 9), src_origin=10, origin_det=10)
    # a point at the origin projects to the detector centre; z magnifies by 2
    np.testing.assert_allclose(cone.project_point([0, 0, 0])[0], [4, 4])
    np.testing.assert_allclose(cone.project_point([0, 0, 1])[0], [6, 4])


def test_defaults_cover_the_volume():
    v = VolumeGeometry(shape=(32, 32))
    p = Parallel2D.default(v)
    assert p.det_count * p.det_spacing >= 32 * math.sqrt(2)
    assert len(p) == math.ceil(math.pi / 2 * 32)
    f = FanBeam2D.default(v)
    corners = [(x, y) for x in (-16, 16) for y in (-16, 16)]
    for x, y in corners:
        cols = f.project_point([x, y])[:, 1]
        assert cols.min() >= -0.5 and cols.max() <= f.det_count - 0.5
    v3 = VolumeGeometry(shape=(16, 20, 20))
    cone = ConeBeam3D.default(v3, n_angles=8)
    for x in (-10, 10):
        for y in (-10, 10):
            for z in (-8, 8):
                rc = cone.project_point([x, y, z])
                assert rc[:, 0].min() >= -0.5 and rc[:, 0].max() <= cone.det_shape[0] - 0.5
                assert rc[:, 1].min() >= -0.5 and rc[:, 1].max() <= cone.det_shape[1] - 0.5


def test_to_astra_dicts():
    astra = pytest.importorskip("astra")
    v = VolumeGeometry(shape=(4, 6), center=(1.0, 2.0))
    d = v.to_astra()
    assert (d["GridRowCount"], d["GridColCount"]) == (4, 6)
    # ASTRA 2D rows run downwards, so the y window is mirrored
    assert d["option"]["WindowMinY"] == -3.0 and d["option"]["WindowMaxY"] == 1.0
    g = Parallel2D(angles=[0.0, 1.0], det_count=5).to_astra()
    assert g["type"] == "parallel" and g["DetectorCount"] == 5
    assert ConeVec3D(vectors=np.eye(12)[:1] + 1, det_shape=(2, 3)).to_astra()["type"] == "cone_vec"
    assert ParallelVec3D(vectors=np.ones((1, 12)), det_shape=(2, 3)).to_astra()["type"] == (
        "parallel3d_vec"
    )
    del astra

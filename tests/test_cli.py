"""The geometry-file schema and the ``dip-uq`` command (reconstruct, demo, bad input)."""

import json
import math

import numpy as np
import pytest
import torch

from dip_uq.cli import main
from dip_uq.io.geometry_file import GeometryFileError, read_geometry_file, write_geometry_file
from operators import (
    ConeBeam3D,
    ConeVec3D,
    FanBeam2D,
    Parallel2D,
    Parallel3D,
    RayTransform,
    VolumeGeometry,
    uniform_angles,
)
from operators.phantoms import shepp_logan_2d

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ geometry files
def _geometries():
    v2 = VolumeGeometry(shape=(16, 16), voxel_size=0.5)
    v3 = VolumeGeometry(shape=(6, 8, 8), voxel_size=(1.0, 0.5, 0.5), center=(1.0, 0.0, 0.0))
    cone = ConeBeam3D.default(v3, n_angles=5)
    return [
        (v2, Parallel2D.default(v2, n_angles=7)),
        (
            v2,
            FanBeam2D(
                angles=uniform_angles(5),
                det_count=30,
                src_origin=40,
                origin_det=20,
                det_spacing=0.7,
                det_offset=0.3,
            ),
        ),
        (v3, Parallel3D.default(v3, n_angles=4)),
        (v3, cone),
        (v3, ConeVec3D(vectors=cone.to_vec(), det_shape=cone.det_shape)),
    ]


@pytest.mark.parametrize("suffix", [".json", ".toml"])
@pytest.mark.parametrize("case", range(5))
def test_geometry_file_round_trip(tmp_path, suffix, case):
    vol, geom = _geometries()[case]
    path = write_geometry_file(tmp_path / f"g{suffix}", vol, geom)
    v2, g2 = read_geometry_file(path)
    assert v2 == vol and g2 == geom


def test_handwritten_toml_with_angle_table(tmp_path):
    p = tmp_path / "scan.toml"
    p.write_text(
        "[volume]\nshape = [32, 32]\n\n[projection]\ntype = 'fanbeam2d'\n"
        "angles = {n = 12, stop = 6.283185307179586}\ndet_count = 50\n"
        "src_origin = 100.0\norigin_det = 50\n"
    )
    vol, geom = read_geometry_file(p)
    assert vol.shape == (32, 32) and vol.voxel_size == (1.0, 1.0)
    assert geom == FanBeam2D(
        angles=uniform_angles(12, stop=2 * math.pi), det_count=50, src_origin=100.0, origin_det=50.0
    )


@pytest.mark.parametrize(
    "content, message",
    [
        ({"projection": {}}, "missing the required key 'volume'"),
        (
            {"volume": {"shape": [8, 8]}, "projection": {"type": "parallel2d", "det_count": 5}},
            "missing the required key 'angles'",
        ),
        (
            {"volume": {"shape": [8, 8]}, "projection": {"type": "parallel2d", "angles": [0.0]}},
            "missing the required key 'det_count'",
        ),
        (
            {
                "volume": {"shape": [8, 8]},
                "projection": {
                    "type": "fanbeam2d",
                    "angles": [0.0],
                    "det_count": 5,
                    "src_origin": 9,
                },
            },
            "missing the required key 'origin_det'",
        ),
        ({"volume": {"shape": [8, 8]}, "projection": {"type": "helical"}}, "'helical' is unknown"),
        (
            {
                "volume": {"shape": [8, 8, 8]},
                "projection": {"type": "parallel2d", "angles": [0.0], "det_count": 5},
            },
            "needs a 2D volume",
        ),
        (
            {
                "volume": {"shape": [8, 8]},
                "projection": {"type": "parallel2d", "angles": [], "det_count": 5},
            },
            "non-empty list",
        ),
        (
            {
                "volume": {"shape": [8, 8]},
                "projection": {"type": "parallel2d", "angles": [0.0], "det_count": 0},
            },
            "det_count",
        ),
        (
            {
                "volume": {"shape": [8, 8, 8]},
                "projection": {"type": "cone3d_vec", "det_shape": [2, 2]},
            },
            "needs 'vectors'",
        ),
    ],
)
def test_incomplete_geometry_files_name_the_problem(tmp_path, content, message):
    p = tmp_path / "g.json"
    p.write_text(json.dumps(content))
    with pytest.raises(GeometryFileError, match=message) as info:
        read_geometry_file(p)
    assert str(p) in str(info.value)


def test_unreadable_geometry_files(tmp_path):
    with pytest.raises(GeometryFileError, match="not found"):
        read_geometry_file(tmp_path / "nope.toml")
    bad = tmp_path / "g.toml"
    bad.write_text("[volume\nshape = ")
    with pytest.raises(GeometryFileError, match="not valid TOML"):
        read_geometry_file(bad)
    other = tmp_path / "g.yaml"
    other.write_text("volume: 1")
    with pytest.raises(GeometryFileError, match="use .json or .toml"):
        read_geometry_file(other)


# ------------------------------------------------------------------------------ reconstruct
def _scan(tmp_path, suffix=".npy"):
    vol = VolumeGeometry(shape=(16, 16))
    geom = Parallel2D.default(vol, n_angles=10)
    y = RayTransform(vol, geom)(shepp_logan_2d((16, 16))).numpy()
    gpath = write_geometry_file(tmp_path / "geom.toml", vol, geom)
    spath = tmp_path / f"sino{suffix}"
    if suffix == ".npy":
        np.save(spath, y)
    elif suffix == ".h5":
        import h5py

        with h5py.File(spath, "w") as f:
            f["data"] = y
    elif suffix == ".tif":
        import tifffile

        tifffile.imwrite(spath, y)
    elif suffix == ".npz":
        np.savez(spath, sino=y)
    return spath, gpath, y


@pytest.mark.parametrize("suffix", [".npy", ".h5", ".tif", ".npz"])
def test_reconstruct_writes_outputs(tmp_path, suffix, capsys):
    spath, gpath, _ = _scan(tmp_path, suffix)
    out = tmp_path / "out"
    rc = main(
        [
            "reconstruct",
            str(spath),
            "--geometry",
            str(gpath),
            "--out",
            str(out),
            "--iterations",
            "5",
            "--lr",
            "1e-3",
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    rec = np.load(out / "reconstruction.npy")
    assert rec.shape == (16, 16) and np.isfinite(rec).all()
    import tifffile

    assert np.array_equal(tifffile.imread(out / "reconstruction.tif"), rec)
    assert (out / "preview.png").stat().st_size > 0
    summary = json.loads((out / "reconstruction.json").read_text())
    assert summary["iterations_run"] == 5 and 0 <= summary["best_iteration"] < 5
    # resuming the finished run reproduces it
    rc = main(
        [
            "reconstruct",
            str(spath),
            "--geometry",
            str(gpath),
            "--out",
            str(out),
            "--iterations",
            "5",
            "--lr",
            "1e-3",
            "--no-progress",
            "--resume",
        ]
    )
    assert rc == 0 and np.array_equal(np.load(out / "reconstruction.npy"), rec)


def test_reconstruct_3d_writes_nifti(tmp_path, capsys):
    pytest.importorskip("nibabel")
    vol = VolumeGeometry(shape=(8, 8, 8))
    geom = ConeBeam3D.default(vol, n_angles=4)
    y = RayTransform(vol, geom)(torch.ones(8, 8, 8)).numpy()
    np.save(tmp_path / "s.npy", y)
    write_geometry_file(tmp_path / "g.json", vol, geom)
    rc = main(
        [
            "reconstruct",
            str(tmp_path / "s.npy"),
            "-g",
            str(tmp_path / "g.json"),
            "-o",
            str(tmp_path / "o"),
            "--iterations",
            "2",
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    from dip_uq.io import read_array

    assert np.allclose(
        read_array(tmp_path / "o" / "reconstruction.nii.gz"),
        np.load(tmp_path / "o" / "reconstruction.npy"),
    )


def _run_err(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    return err


def test_reconstruct_bad_input_names_the_problem(tmp_path, capsys):
    spath, gpath, y = _scan(tmp_path)
    base = ["--geometry", str(gpath), "--out", str(tmp_path / "o"), "--no-progress"]
    np.save(tmp_path / "short.npy", y[:, :-1])
    err = _run_err(capsys, ["reconstruct", str(tmp_path / "short.npy"), *base])
    assert "sinogram shape (10, 22) does not match" in err and "(10, 23)" in err
    bad = y.copy()
    bad[0, 0] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    assert "NaN" in _run_err(capsys, ["reconstruct", str(tmp_path / "nan.npy"), *base])
    (tmp_path / "junk.npy").write_bytes(b"this is not numpy")
    assert "junk.npy" in _run_err(capsys, ["reconstruct", str(tmp_path / "junk.npy"), *base])
    assert "not found" in _run_err(capsys, ["reconstruct", str(tmp_path / "none.npy"), *base])
    err = _run_err(capsys, ["reconstruct", str(spath), *base, "--tv-weight", "-1"])
    assert "--tv-weight must be a finite number >= 0, got -1" in err
    err = _run_err(capsys, ["reconstruct", str(spath), *base, "--iterations", "0"])
    assert "iterations must be a positive integer" in err
    if not torch.cuda.is_available():
        assert "CUDA is not available" in _run_err(
            capsys, ["reconstruct", str(spath), *base, "--device", "cuda"]
        )
    assert "not a torch device" in _run_err(
        capsys, ["reconstruct", str(spath), *base, "--device", "toaster"]
    )
    (tmp_path / "g.json").write_text(json.dumps({"volume": {"shape": [16, 16]}}))
    err = _run_err(
        capsys,
        ["reconstruct", str(spath), "-g", str(tmp_path / "g.json"), "-o", str(tmp_path / "o")],
    )
    assert "'projection'" in err
    assert not (tmp_path / "o" / "reconstruction.npy").exists()


def test_demo_quick(tmp_path, capsys):
    rc = main(["demo", "--out", str(tmp_path), "--quick", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "PSNR FBP" in out and "PSNR DIP" in out
    assert (tmp_path / "demo.png").stat().st_size > 0
    r = json.loads((tmp_path / "demo.json").read_text())
    assert r["image_shape"] == [32, 32] and math.isfinite(r["psnr_dip"])
    assert "held-out views" in out and r["uq_metrics"]["heldout"]["scales"]["weights"] > 0


def test_reconstruct_with_edip_pretraining(tmp_path, capsys):
    spath, gpath, _ = _scan(tmp_path)
    out = tmp_path / "o"
    rc = main(
        [
            "reconstruct",
            str(spath),
            "-g",
            str(gpath),
            "-o",
            str(out),
            "--iterations",
            "3",
            "--edip-iterations",
            "4",
            "--edip-images",
            "3",
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    from dip_uq.dip.pretrain import load_pretrained

    assert load_pretrained(out / "edip.pt").config.channels == (32, 32, 32)
    # the saved file is reusable as --net
    rc = main(
        [
            "reconstruct",
            str(spath),
            "-g",
            str(gpath),
            "-o",
            str(tmp_path / "o2"),
            "--iterations",
            "2",
            "--net",
            str(out / "edip.pt"),
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    err = _run_err(
        capsys,
        [
            "reconstruct",
            str(spath),
            "-g",
            str(gpath),
            "-o",
            str(out),
            "--net",
            str(out / "edip.pt"),
            "--edip-iterations",
            "2",
        ],
    )
    assert "either --net" in err


def test_reconstruct_linear_output(tmp_path, capsys):
    """--linear-output trains the preset without its output sigmoid."""
    spath, gpath, _ = _scan(tmp_path)
    out = tmp_path / "lin"
    argv = ["reconstruct", str(spath), "-g", str(gpath), "-o", str(out), "--iterations", "2"]
    rc = main([*argv, "--linear-output", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    ck = torch.load(out / "checkpoints" / "dip_checkpoint.pt", weights_only=False)
    assert ck["net_config"]["use_sigmoid"] is False
    assert ck["net_config"]["channels"] == [32, 32, 32]
    pt = tmp_path / "fake.pt"
    pt.write_bytes(b"")
    assert "keeps its own" in _run_err(capsys, [*argv, "--net", str(pt), "--linear-output"])
    assert "choose a preset" in _run_err(capsys, [*argv, "--net", "medium"])

"""Array readers and atomic volume writers with spacing metadata."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
import tifffile
import torch

from dip_uq.io import DataFormatError, read_array, read_origin, read_spacing, write_volume
from dip_uq.io import arrays as io

VOL = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)  # (z, y, x), all different
SPACING, ORIGIN = (2.0, 0.5, 0.25), (-1.0, 3.0, 7.5)


@pytest.mark.parametrize("suffix", [".npz", ".tif", ".tiff", ".h5", ".hdf5", ".nii", ".nii.gz"])
def test_roundtrip_with_spacing(tmp_path, suffix):
    if suffix.startswith(".nii"):
        pytest.importorskip("nibabel")
    path = write_volume(
        tmp_path / f"v{suffix}", torch.from_numpy(VOL), spacing=SPACING, origin=ORIGIN
    )
    np.testing.assert_array_equal(read_array(path), VOL)
    assert read_spacing(path) == pytest.approx(SPACING)
    assert read_origin(path) == pytest.approx(ORIGIN)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp files left


def test_npy_has_no_metadata_and_2d_maps(tmp_path):
    path = write_volume(tmp_path / "v.npy", VOL[0])
    np.testing.assert_array_equal(read_array(path), VOL[0])
    assert read_spacing(path) is None
    std = np.random.default_rng(0).random((6, 7))
    p2 = write_volume(tmp_path / "std.npz", std, spacing=0.66)
    np.testing.assert_array_equal(read_array(p2), std)
    assert read_spacing(p2) == (0.66, 0.66)


def test_nifti_axes_and_affine(tmp_path):
    nib = pytest.importorskip("nibabel")
    path = write_volume(tmp_path / "v.nii.gz", VOL, spacing=SPACING, origin=ORIGIN)
    img = nib.load(str(path))
    data = np.asarray(img.dataobj)
    assert data.shape == (5, 4, 3)  # NIfTI (i, j, k) = (x, y, z)
    assert data[4, 1, 2] == VOL[2, 1, 4]
    # Voxel (i, j, k) = (x, y, z) index -> world: diag(spacing_xyz), origin translation.
    np.testing.assert_allclose(
        img.affine @ [4, 1, 2, 1], [7.5 + 4 * 0.25, 3.0 + 0.5, -1.0 + 4.0, 1]
    )


def test_tiff_stack_and_imagej_spacing(tmp_path):
    tifffile.imwrite(
        tmp_path / "ij.tif",
        VOL,
        imagej=True,
        resolution=(1 / 0.25, 1 / 0.5),
        metadata={"spacing": 2.0, "unit": "mm", "axes": "ZYX"},
    )
    np.testing.assert_array_equal(read_array(tmp_path / "ij.tif"), VOL)
    assert read_spacing(tmp_path / "ij.tif") == pytest.approx((2.0, 0.5, 0.25))
    tifffile.imwrite(tmp_path / "plain.tif", VOL[0])
    assert read_spacing(tmp_path / "plain.tif") is None


def test_keys_in_npz_and_hdf5(tmp_path):
    np.savez(tmp_path / "two.npz", a=VOL, b=VOL[0])
    with pytest.raises(DataFormatError, match=r"two.npz: holds several arrays \['a', 'b'\]"):
        read_array(tmp_path / "two.npz")
    np.testing.assert_array_equal(read_array(tmp_path / "two.npz", key="b"), VOL[0])
    with pytest.raises(KeyError, match="no array 'c'"):
        read_array(tmp_path / "two.npz", key="c")
    with h5py.File(tmp_path / "g.h5", "w") as f:
        f["grp/x"] = VOL
        f["y"] = VOL[1]
    with pytest.raises(DataFormatError, match="several datasets"):
        read_array(tmp_path / "g.h5")
    np.testing.assert_array_equal(read_array(tmp_path / "g.h5", key="grp/x"), VOL)
    with h5py.File(tmp_path / "one.h5", "w") as f:
        f["only"] = VOL[2]
    np.testing.assert_array_equal(read_array(tmp_path / "one.h5"), VOL[2])


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = write_volume(tmp_path / "v.npy", VOL)

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(io.np, "save", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        write_volume(path, VOL * 0)
    monkeypatch.undo()
    np.testing.assert_array_equal(np.load(path), VOL)
    assert os.listdir(tmp_path) == ["v.npy"]


def test_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npy: file not found"):
        read_array(tmp_path / "missing.npy")
    (tmp_path / "x.xyz").write_text("?")
    with pytest.raises(DataFormatError, match="x.xyz: unknown suffix '.xyz'"):
        read_array(tmp_path / "x.xyz")
    with pytest.raises(DataFormatError, match="cannot write suffix '.png'"):
        write_volume(tmp_path / "x.png", VOL)
    with pytest.raises(ValueError, match="spacing must have one entry per array axis \\(3"):
        write_volume(tmp_path / "x.npz", VOL, spacing=(1.0, 2.0))
    write_volume(tmp_path / "t.tif", VOL)
    data = (tmp_path / "t.tif").read_bytes()
    (tmp_path / "t.tif").write_bytes(data[: len(data) // 3])
    with pytest.raises(DataFormatError, match="t.tif: cannot read TIFF"):
        read_array(tmp_path / "t.tif")
    (tmp_path / "bad.h5").write_bytes(b"nope")
    with pytest.raises(DataFormatError, match="bad.h5: cannot open HDF5"):
        read_array(tmp_path / "bad.h5")
    with pytest.raises(DataFormatError, match="bad.h5: cannot open HDF5"):
        read_spacing(tmp_path / "bad.h5")
    (tmp_path / "bad.npy").write_bytes(b"nope")
    with pytest.raises(DataFormatError, match="bad.npy"):
        read_array(tmp_path / "bad.npy")


def test_nifti_missing_gives_clear_message(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "nibabel":
            raise ImportError("no nibabel")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="pip install nibabel"):
        write_volume(tmp_path / "v.nii", VOL)


def test_home_directory_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write_volume("~/sub/v.npz", VOL, spacing=1.5)
    assert (tmp_path / "sub" / "v.npz").is_file()
    np.testing.assert_array_equal(read_array("~/sub/v.npz"), VOL)
    assert read_spacing("~/sub/v.npz") == (1.5, 1.5, 1.5)


def test_docs_examples_that_need_no_download_run(tmp_path, monkeypatch):
    """The examples in docs/datasets.md that use no downloaded data run as written."""
    pytest.importorskip("nibabel")
    import re
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "datasets.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "~/data" not in b]
    assert len(blocks) >= 2  # the DICOM and the dip_uq.io examples
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code, "docs/datasets.md", "exec"), {})


def test_written_files_get_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_volume(tmp_path / "v.npy", VOL)
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o644

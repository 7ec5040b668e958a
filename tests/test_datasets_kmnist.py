"""KMNIST idx/npz readers and generic image folders."""

from __future__ import annotations

import gzip
import math
import struct

import matplotlib.image as mpimg
import numpy as np
import pytest
import tifffile
import torch

from dip_uq.io import DataFormatError
from dip_uq.io.datasets.kmnist import kmnist_operator, load_images, read_idx


def write_idx(path, arr: np.ndarray, type_code: int = 0x08, *, gz: bool = False) -> None:
    """Hand-rolled idx writer: magic 00 00 type ndim, big-endian uint32 dims, data."""
    head = bytes([0, 0, type_code, arr.ndim]) + b"".join(struct.pack(">I", s) for s in arr.shape)
    payload = head + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    (gzip.open if gz else open)(path, "wb").write(payload)


def test_idx_plain_and_gzip(tmp_path):
    arr = (np.arange(3 * 28 * 28) % 256).astype(np.uint8).reshape(3, 28, 28)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", arr)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", arr, gz=True)
    np.testing.assert_array_equal(read_idx(tmp_path / "t10k-images-idx3-ubyte"), arr)
    imgs = load_images(tmp_path / "t10k-images-idx3-ubyte.gz", n=2)
    assert imgs.shape == (2, 28, 28) and imgs.dtype == torch.float32
    assert float(imgs[0, 0, 5]) == pytest.approx(5 / 255)  # hand-computed: byte 5 -> 5/255
    assert float(imgs[1, 9, 3]) == pytest.approx(((784 + 9 * 28 + 3) % 256) / 255)
    # Other idx element types keep their values (big-endian float32 here).
    f = np.array([[1.5, -2.0]], dtype=np.float32)
    write_idx(tmp_path / "f-idx2", f, 0x0D)
    np.testing.assert_array_equal(read_idx(tmp_path / "f-idx2"), f)


def test_npz_and_npy(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "kmnist-test-imgs.npz", arr_0=arr)
    out = load_images(tmp_path / "kmnist-test-imgs.npz")
    np.testing.assert_allclose(out.numpy(), arr / 255.0, rtol=1e-6)
    np.save(tmp_path / "stack.npy", arr.astype(np.float32) / 255)
    assert load_images(tmp_path / "stack.npy", n=1).shape == (1, 28, 28)
    np.save(tmp_path / "wide.npy", arr.astype(np.float32))
    with pytest.raises(DataFormatError, match="outside \\[0, 1\\]"):
        load_images(tmp_path / "wide.npy")
    mm = load_images(tmp_path / "wide.npy", normalize="minmax")
    assert float(mm[0].min()) == 0.0 and float(mm[0].max()) == 1.0


def test_image_folder_png_tiff_npy(tmp_path):
    a = np.linspace(0, 1, 6 * 5).reshape(6, 5)
    mpimg.imsave(tmp_path / "a.png", a, cmap="gray", vmin=0, vmax=1)  # RGBA on disk
    tifffile.imwrite(tmp_path / "b.tif", (a * 65535).astype(np.uint16))
    np.save(tmp_path / "c.npy", a[::-1].copy())
    (tmp_path / "notes.txt").write_text("ignored")
    imgs = load_images(tmp_path)
    assert imgs.shape == (3, 6, 5)
    np.testing.assert_allclose(imgs[0].numpy(), a, atol=2.5 / 255)  # 256-entry colormap, 8 bit
    np.testing.assert_allclose(imgs[1].numpy(), a, atol=1e-4)
    np.testing.assert_allclose(imgs[2].numpy(), a[::-1], atol=1e-7)
    np.save(tmp_path / "d.npy", np.zeros((4, 4)))
    with pytest.raises(DataFormatError, match="d.npy: image shape \\(4, 4\\) differs"):
        load_images(tmp_path)


def test_bad_idx_files(tmp_path):
    arr = np.zeros((2, 4, 4), np.uint8)
    write_idx(tmp_path / "x-idx3-ubyte", arr)
    p = tmp_path / "x-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-3])
    with pytest.raises(DataFormatError, match="x-idx3-ubyte: idx header says shape \\(2, 4, 4\\)"):
        read_idx(p)
    (tmp_path / "y-idx").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataFormatError, match="y-idx: not an idx file"):
        read_idx(tmp_path / "y-idx")
    with pytest.raises(FileNotFoundError, match="nothing-idx"):
        load_images(tmp_path / "nothing-idx")


def test_protocol_operator():
    op = kmnist_operator(5)
    assert op.domain_shape == (28, 28) and op.range_shape == (5, 41)
    assert op.geometry.angles[0] == 0.0 and op.geometry.angles[1] == pytest.approx(math.pi / 5)
    assert op.geometry.det_spacing * 41 / 2 == pytest.approx(14 * math.sqrt(2))
    # Line integrals: a ones image seen at angle 0 across its centre has length 28.
    y = op(torch.ones(28, 28, dtype=torch.float64))
    assert float(y[0, 20]) == pytest.approx(28.0, rel=1e-6)

"""DICOM series written with pydicom: sorting, HU rescale, spacing, attenuation."""

from __future__ import annotations

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid  # noqa: E402

from dip_uq.io import DataFormatError, read_array, read_spacing  # noqa: E402
from dip_uq.io.dicom import hu_to_attenuation, read_dicom_series, read_dicom_slice  # noqa: E402


def write_slice(
    path,
    pixels: np.ndarray,
    z: float,
    *,
    series: str,
    slope=2.0,
    intercept=-1024.0,
    spacing=(0.5, 0.7),
    instance: int = 1,
) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series
    ds.InstanceNumber = instance
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = list(spacing)
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-10.0, -20.0, z]
    ds.SliceThickness = 1.25
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def make_series(folder, series="1.2.3.4"):
    """Three slices at z = 5, 2.5, 3.75 written in that (unsorted) order with file names that
    sort differently again; raw pixel value of slice at height z: 100*z + 10*row + col."""
    folder.mkdir(exist_ok=True)
    raws = {}
    for name, z in (("b.dcm", 5.0), ("a.dcm", 2.5), ("IMG0003", 3.75)):
        r, c = np.meshgrid(np.arange(4), np.arange(3), indexing="ij")
        raws[z] = (100 * z + 10 * r + c).astype(np.uint16)
        write_slice(folder / name, raws[z], z, series=series, instance=int(z))
    return raws


def test_series_sorted_by_position_in_hu(tmp_path):
    raws = make_series(tmp_path / "ct")
    (tmp_path / "ct" / "README.txt").write_text("not dicom")
    vol, spacing, meta = read_dicom_series(tmp_path / "ct")
    assert vol.shape == (3, 4, 3) and vol.dtype == np.float32
    for k, z in enumerate((2.5, 3.75, 5.0)):  # increasing z, whatever the file order
        np.testing.assert_array_equal(vol[k], 2.0 * raws[z] - 1024.0)
    # Hand check: slice z=3.75, row 2, col 1: raw 375 + 20 + 1 = 396 -> 2*396 - 1024 = -232 HU.
    assert vol[1, 2, 1] == -232.0
    assert spacing == (1.25, 0.5, 0.7)  # (z from positions, rows, columns) in mm
    assert meta["origin_xyz"] == (-10.0, -20.0, 2.5)
    assert [p.name for p in meta["files"]] == ["a.dcm", "IMG0003", "b.dcm"]
    np.testing.assert_array_equal(read_array(tmp_path / "ct"), vol)
    assert read_spacing(tmp_path / "ct") == (1.25, 0.5, 0.7)


def test_single_file_and_pydicom_test_data():
    path = pydicom.data.get_testdata_file("CT_small.dcm")
    hu, spacing, meta = read_dicom_slice(path)
    ds = pydicom.dcmread(path)
    assert hu.shape == (128, 128)
    np.testing.assert_allclose(
        hu, ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    )
    assert spacing == pytest.approx((0.661468, 0.661468), rel=1e-5)
    assert meta["modality"] == "CT"
    np.testing.assert_array_equal(read_array(path), hu)


def test_hu_to_attenuation():
    hu = np.array([-1000.0, 0.0, 1000.0, -3024.0])
    mu = hu_to_attenuation(hu)
    np.testing.assert_allclose(mu, [0.0, 0.0192, 0.0384, 0.0])  # air, water, 2x water, clipped
    mu_raw = hu_to_attenuation(hu, clip=False, mu_water=0.2, mu_air=0.01)
    np.testing.assert_allclose(mu_raw[:3], [0.2 - 0.19, 0.2, 0.2 + 0.19])
    torch = pytest.importorskip("torch")
    t = hu_to_attenuation(torch.tensor([500.0]))
    assert torch.is_tensor(t) and float(t) == pytest.approx(0.0192 * 1.5)


def test_bad_series(tmp_path):
    with pytest.raises(FileNotFoundError, match="DICOM folder not found"):
        read_dicom_series(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.txt").write_text("hi")
    with pytest.raises(DataFormatError, match="no DICOM image files"):
        read_dicom_series(tmp_path / "empty")
    make_series(tmp_path / "two")
    write_slice(tmp_path / "two" / "other.dcm", np.zeros((4, 3)), 9.0, series="9.9")
    with pytest.raises(DataFormatError, match="holds 2 series"):
        read_dicom_series(tmp_path / "two")
    vol, _, _ = read_dicom_series(tmp_path / "two", series_uid="9.9")
    assert vol.shape == (1, 4, 3)
    make_series(tmp_path / "shape")
    write_slice(tmp_path / "shape" / "z.dcm", np.zeros((5, 3)), 7.0, series="1.2.3.4")
    with pytest.raises(DataFormatError, match=r"z.dcm: slice shape \(5, 3\) differs"):
        read_dicom_series(tmp_path / "shape")
    make_series(tmp_path / "dup")
    write_slice(tmp_path / "dup" / "c.dcm", np.zeros((4, 3)), 5.0, series="1.2.3.4")
    with pytest.raises(DataFormatError, match="same position"):
        read_dicom_series(tmp_path / "dup")
    make_series(tmp_path / "broken")
    p = tmp_path / "broken" / "b.dcm"
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(DataFormatError, match="b.dcm"):
        read_dicom_series(tmp_path / "broken")

"""Real anatomy that ships inside installed dependencies: CT and MR slices from pydicom's test
files and matplotlib's sample data, for demos and calibration suites that must run offline.

Every slice is returned as a float32 ``(H, W)`` image in array order (row 0 = first stored
row), scaled to roughly ``[0, 1]``: CT slices as ``mu / (2 mu_water)`` (air 0, water 0.5,
dense bone about 1 and above), MR slices divided by their 99.5th percentile (MR intensities
are not attenuations; they serve as realistic texture). ``size`` resamples by area averaging
(after the listed crop, which removes empty borders).

=============  ====================================  ========  ==============================
name           file                                  modality  content
=============  ====================================  ========  ==============================
``ct_small``   pydicom ``CT_small.dcm``              CT        thoracic spine, 128², 0.66 mm
``ct_head``    pydicom ``693_J2KI.dcm``              CT        head, 512², 0.48 mm
``ct_skull``   pydicom ``J2K_pixelrep_mismatch.dcm`` CT        skull base, 512², 0.43 mm
``mr_small``   pydicom ``MR_small.dcm``              MR        64², 0.31 mm
``mr_abdomen`` pydicom ``examples_overlay.dcm``      MR        abdomen, 300 × 484, 0.72 mm
``mr_head``    matplotlib ``s1045.ima.gz``           MR        sagittal head, 256², 16 bit raw
=============  ====================================  ========  ==============================
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

__all__ = ["SAMPLE_SLICES", "sample_slice"]

#: name -> (source, file, modality, crop (row0, row1, col0, col1) or None)
SAMPLE_SLICES: dict[str, tuple[str, str, str, tuple[int, int, int, int] | None]] = {
    "ct_small": ("pydicom", "CT_small.dcm", "CT", None),
    "ct_head": ("pydicom", "693_J2KI.dcm", "CT", (96, 432, 88, 424)),
    "ct_skull": ("pydicom", "J2K_pixelrep_mismatch.dcm", "CT", (60, 460, 40, 480)),
    "mr_small": ("pydicom", "MR_small.dcm", "MR", None),
    "mr_abdomen": ("pydicom", "examples_overlay.dcm", "MR", (0, 300, 92, 392)),
    "mr_head": ("matplotlib", "s1045.ima.gz", "MR", None),
}


def _raw(source: str, name: str) -> np.ndarray:
    if source == "pydicom":
        from pydicom.data import get_testdata_file

        from ..dicom import read_dicom_slice

        path = get_testdata_file(name)
        if path is None:
            raise FileNotFoundError(f"pydicom's test file {name} is not installed")
        hu, _, _ = read_dicom_slice(path)
        return np.asarray(hu, dtype=np.float64)
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "sample_data" / name
    raw = gzip.open(path).read()
    return np.frombuffer(raw, dtype=np.uint16).astype(np.float64).reshape(256, 256)


def sample_slice(name: str, *, size: int | None = None) -> torch.Tensor:
    """The slice ``name`` (:data:`SAMPLE_SLICES`) as a float32 ``(H, W)`` image in ~[0, 1];
    ``size`` resamples it (area average) to ``size × size``."""
    if name not in SAMPLE_SLICES:
        raise ValueError(f"unknown sample slice {name!r}; choose one of {sorted(SAMPLE_SLICES)}")
    source, fname, modality, crop = SAMPLE_SLICES[name]
    a = _raw(source, fname)
    if crop is not None:
        r0, r1, c0, c1 = crop
        a = a[r0:r1, c0:c1]
    if modality == "CT":  # HU -> mu / (2 mu_water); padding below -1024 HU is air
        a = np.clip(1.0 + np.maximum(a, -1024.0) / 1000.0, 0.0, None) / 2.0
    else:
        a = np.clip(a, 0.0, None) / max(float(np.percentile(a, 99.5)), 1e-12)
    x = torch.as_tensor(a, dtype=torch.float32)
    if size is not None and (size, size) != tuple(x.shape):
        x = torch.nn.functional.interpolate(x[None, None], size=(size, size), mode="area")[0, 0]
    return x.contiguous()

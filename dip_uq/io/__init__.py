"""Files in and out: arrays and volumes with their spacing (:mod:`.arrays`), DICOM
(:mod:`.dicom`), geometry files (:mod:`.geometry_file`), public data sets and offline samples
(:mod:`.datasets`), and the atomic writer every one of them uses (:mod:`.atomic`)."""

from ..errors import DataFormatError, GeometryFileError
from .arrays import read_array, read_origin, read_spacing, read_tiff, write_volume
from .atomic import atomic_write, atomic_write_bytes, atomic_write_text
from .dicom import hu_to_attenuation, read_dicom_series, read_dicom_slice
from .geometry_file import (
    geometry_to_dict,
    parse_geometry,
    read_geometry_file,
    write_geometry_file,
)

__all__ = [
    "DataFormatError",
    "GeometryFileError",
    "read_array",
    "read_origin",
    "read_spacing",
    "read_tiff",
    "write_volume",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "hu_to_attenuation",
    "read_dicom_series",
    "read_dicom_slice",
    "geometry_to_dict",
    "parse_geometry",
    "read_geometry_file",
    "write_geometry_file",
]

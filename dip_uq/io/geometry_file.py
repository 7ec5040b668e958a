"""Geometry description files (JSON or TOML) -> ``(VolumeGeometry, ProjectionGeometry)``.

The schema is documented in ``docs/geometry_file.md``. In short (TOML)::

    [volume]
    shape = [128, 128]          # (H, W) or (D, H, W), array order
    voxel_size = 1.0            # scalar or per axis, array order, physical units
    center = 0.0                # optional

    [projection]
    type = "fanbeam2d"          # parallel2d | fanbeam2d | parallel3d | conebeam3d
                                # | parallel3d_vec | cone3d_vec
    angles = {n = 60, start = 0.0, stop = 6.283185307179586}   # or a list (radians)
    det_count = 183             # 2D; 3D uses det_shape = [rows, cols]
    det_spacing = 1.0           # 3D: scalar or [row height, col width]
    src_origin = 256.0          # fan / cone only
    origin_det = 128.0          # fan / cone only

Every missing or malformed entry raises :class:`GeometryFileError` naming the file and the
key. ``write_geometry_file`` writes the same schema (JSON or TOML by suffix).
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from operators import (
    ConeBeam3D,
    ConeVec3D,
    FanBeam2D,
    Parallel2D,
    Parallel3D,
    ParallelVec3D,
    ProjectionGeometry,
    VolumeGeometry,
    uniform_angles,
)
from operators.errors import GeometryError
from operators.geometry_check import check_geometry_fits

from ..errors import GeometryFileError

__all__ = ["GeometryFileError", "read_geometry_file", "parse_geometry", "write_geometry_file"]

_TYPES = ("parallel2d", "fanbeam2d", "parallel3d", "conebeam3d", "parallel3d_vec", "cone3d_vec")


def read_geometry_file(path: str | os.PathLike) -> tuple[VolumeGeometry, ProjectionGeometry]:
    """Read a ``.json`` or ``.toml`` geometry file (schema: ``docs/geometry_file.md``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise GeometryFileError(f"{path}: geometry file not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(path.read_text())
        elif suffix == ".toml":
            data = tomllib.loads(path.read_text())
        else:
            raise GeometryFileError(
                f"{path}: unknown geometry file suffix {suffix!r}; use .json or .toml"
            )
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise GeometryFileError(f"{path}: not valid {suffix[1:].upper()}: {err}") from err
    return parse_geometry(data, where=str(path), base_dir=path.parent)


def _need(section: dict, key: str, where: str, sec: str) -> Any:
    if key not in section:
        raise GeometryFileError(f"{where}: [{sec}] is missing the required key {key!r}")
    return section[key]


def _number(value: Any, key: str, where: str, sec: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise GeometryFileError(f"{where}: [{sec}].{key} must be a finite number, got {value!r}")
    return float(value)


def _integer(value: Any, key: str, where: str, sec: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise GeometryFileError(f"{where}: [{sec}].{key} must be a positive integer, got {value!r}")
    return value


def _int_pair(value: Any, key: str, where: str, sec: str) -> tuple[int, int]:
    if not isinstance(value, list) or len(value) != 2:
        raise GeometryFileError(
            f"{where}: [{sec}].{key} must be a list [rows, cols] of two positive integers, "
            f"got {value!r}"
        )
    return (
        _integer(value[0], f"{key}[0]", where, sec),
        _integer(value[1], f"{key}[1]", where, sec),
    )


def _numbers(value: Any, key: str, where: str, sec: str) -> float | tuple[float, ...]:
    if isinstance(value, list):
        return tuple(_number(v, key, where, sec) for v in value)
    return _number(value, key, where, sec)


def _angles(p: dict, where: str) -> tuple[float, ...]:
    a = _need(p, "angles", where, "projection")
    if isinstance(a, dict):
        n = _need(a, "n", where, "projection.angles")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise GeometryFileError(
                f"{where}: [projection.angles].n must be a positive integer, got {n!r}"
            )
        start = _number(a.get("start", 0.0), "start", where, "projection.angles")
        stop = _number(a.get("stop", math.pi), "stop", where, "projection.angles")
        return uniform_angles(n, start=start, stop=stop)
    if isinstance(a, list) and a:
        return tuple(_number(v, "angles", where, "projection") for v in a)
    raise GeometryFileError(
        f"{where}: [projection].angles must be a non-empty list (radians) or a table "
        f"{{n = ..., start = ..., stop = ...}}, got {a!r}"
    )


def _vectors(p: dict, where: str, base_dir: Path | None) -> np.ndarray:
    if "vectors" in p:
        try:
            vec = np.asarray(p["vectors"], dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise GeometryFileError(
                f"{where}: [projection].vectors must be a list of rows of 12 numbers: {err}"
            ) from err
    elif "vectors_file" in p:
        if not isinstance(p["vectors_file"], str):
            raise GeometryFileError(
                f"{where}: [projection].vectors_file must be a file name (a string), "
                f"got {p['vectors_file']!r}"
            )
        vf = Path(p["vectors_file"]).expanduser()
        if not vf.is_absolute() and base_dir is not None:
            vf = base_dir / vf
        try:
            vec = np.load(vf) if vf.suffix == ".npy" else np.loadtxt(vf)
        except (OSError, ValueError) as err:
            raise GeometryFileError(f"{where}: cannot read vectors_file {vf}: {err}") from err
    else:
        raise GeometryFileError(
            f"{where}: [projection] of a vector geometry needs 'vectors' (n x 12) "
            "or 'vectors_file' (.npy or text)"
        )
    vec = np.atleast_2d(vec)
    if vec.ndim != 2 or vec.shape[1] != 12:
        raise GeometryFileError(f"{where}: vectors must have shape (n_views, 12), got {vec.shape}")
    return vec


def parse_geometry(
    data: dict, *, where: str = "<geometry>", base_dir: Path | None = None
) -> tuple[VolumeGeometry, ProjectionGeometry]:
    """Build the geometries from an already-parsed mapping (the file's content)."""
    if not isinstance(data, dict):
        raise GeometryFileError(f"{where}: expected a table/object at the top level")
    v = _need(data, "volume", where, "top level")
    p = _need(data, "projection", where, "top level")
    if not isinstance(v, dict) or not isinstance(p, dict):
        raise GeometryFileError(f"{where}: 'volume' and 'projection' must be tables/objects")
    shape = _need(v, "shape", where, "volume")
    if not isinstance(shape, list) or not all(
        isinstance(s, int) and not isinstance(s, bool) for s in shape
    ):
        raise GeometryFileError(
            f"{where}: [volume].shape must be a list of integers, got {shape!r}"
        )
    kind = _need(p, "type", where, "projection")
    if not isinstance(kind, str) or kind.lower() not in _TYPES:
        raise GeometryFileError(
            f"{where}: [projection].type {kind!r} is unknown; choose one of {', '.join(_TYPES)}"
        )
    kind = kind.lower()
    try:
        volume = VolumeGeometry(
            shape=tuple(shape),
            voxel_size=_numbers(v.get("voxel_size", 1.0), "voxel_size", where, "volume"),
            center=_numbers(v.get("center", 0.0), "center", where, "volume"),
        )
        geom = _projection(kind, p, where, base_dir)
        if volume.ndim != geom.ndim:
            raise GeometryFileError(
                f"{where}: a {geom.ndim}D projection type {kind!r} needs a {geom.ndim}D volume, "
                f"got shape {volume.shape}"
            )
        check_geometry_fits(volume, geom)  # no source inside the volume, detector beyond it
    except GeometryError as err:
        raise GeometryFileError(f"{where}: {err}") from err
    return volume, geom


def _projection(kind: str, p: dict, where: str, base_dir: Path | None) -> ProjectionGeometry:
    sec = "projection"
    if kind.endswith("_vec"):
        vec = _vectors(p, where, base_dir)
        det_shape = _int_pair(_need(p, "det_shape", where, sec), "det_shape", where, sec)
        cls = ParallelVec3D if kind == "parallel3d_vec" else ConeVec3D
        return cls(vectors=vec, det_shape=det_shape)
    angles = _angles(p, where)
    spacing = _numbers(p.get("det_spacing", 1.0), "det_spacing", where, sec)
    if kind in ("parallel2d", "fanbeam2d"):
        count = _integer(_need(p, "det_count", where, sec), "det_count", where, sec)
        offset = _number(p.get("det_offset", 0.0), "det_offset", where, sec)
        if kind == "parallel2d":
            return Parallel2D(
                angles=angles, det_count=count, det_spacing=spacing, det_offset=offset
            )
        return FanBeam2D(
            angles=angles,
            det_count=count,
            det_spacing=spacing,
            det_offset=offset,
            src_origin=_number(_need(p, "src_origin", where, sec), "src_origin", where, sec),
            origin_det=_number(_need(p, "origin_det", where, sec), "origin_det", where, sec),
        )
    det_shape = _int_pair(_need(p, "det_shape", where, sec), "det_shape", where, sec)
    if kind == "parallel3d":
        return Parallel3D(angles=angles, det_shape=det_shape, det_spacing=spacing)
    return ConeBeam3D(
        angles=angles,
        det_shape=det_shape,
        det_spacing=spacing,
        src_origin=_number(_need(p, "src_origin", where, sec), "src_origin", where, sec),
        origin_det=_number(_need(p, "origin_det", where, sec), "origin_det", where, sec),
    )


def geometry_to_dict(volume: VolumeGeometry, geometry: ProjectionGeometry) -> dict:
    """The schema's mapping for a pair of geometries (angles written out in full)."""
    vol = {
        "shape": list(volume.shape),
        "voxel_size": list(volume.voxel_size),
        "center": list(volume.center),
    }
    g = geometry
    if isinstance(g, ParallelVec3D | ConeVec3D):
        proj: dict[str, Any] = {
            "type": "parallel3d_vec" if isinstance(g, ParallelVec3D) else "cone3d_vec",
            "vectors": g.to_vec().tolist(),
            "det_shape": list(g.det_shape),
        }
    else:
        names = {
            Parallel2D: "parallel2d",
            FanBeam2D: "fanbeam2d",
            Parallel3D: "parallel3d",
            ConeBeam3D: "conebeam3d",
        }
        if type(g) not in names:
            raise TypeError(f"cannot describe a {type(g).__name__} in a geometry file")
        proj = {"type": names[type(g)], "angles": list(g.angles)}
        if g.ndim == 2:
            proj.update(det_count=g.det_count, det_spacing=g.det_spacing, det_offset=g.det_offset)
        else:
            proj.update(det_shape=list(g.det_shape), det_spacing=list(g.det_spacing))
        if g.is_cone:
            proj.update(src_origin=g.src_origin, origin_det=g.origin_det)
    return {"volume": vol, "projection": proj}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def write_geometry_file(
    path: str | os.PathLike, volume: VolumeGeometry, geometry: ProjectionGeometry
) -> Path:
    """Write the geometries as ``.json`` or ``.toml`` (atomically); reads back equal."""
    from .atomic import atomic_write_text

    path = Path(path).expanduser()
    d = geometry_to_dict(volume, geometry)
    if path.suffix.lower() == ".json":
        text = json.dumps(d, indent=2)
    elif path.suffix.lower() == ".toml":
        lines = []
        for sec in ("volume", "projection"):
            lines.append(f"[{sec}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in d[sec].items()]
            lines.append("")
        text = "\n".join(lines)
    else:
        raise GeometryFileError(f"{path}: geometry files must end in .json or .toml")
    return atomic_write_text(text, path)

"""Atomic file writing, the one helper every writer in the package uses.

A file is written to a temporary name in its target directory (``.<name>.<token>.tmp`` plus
the file's own suffix, so format-sniffing writers see it), flushed to disk, then moved over the
final name with ``os.replace`` (atomic on POSIX and Windows). A crash or interrupt while writing
leaves the previous file intact; the temporary file is removed on any exception, and one left
by a killed process is removed by :func:`remove_stale_temporaries` on the next run.
:func:`writable_directory` checks an output or checkpoint directory before any work.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_torch_save",
    "remove_stale_temporaries",
    "writable_directory",
]


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix


def _temporary(path: Path) -> Path:
    return path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp{_suffix(path)}"


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a temporary path next to ``path`` (the writer creates the file),
    fsync it and move it over ``path``. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        umask = os.umask(0)  # the permissions a plain open() would give
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(text.encode("utf-8"), path)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove temporary files a killed writer left beside ``path`` (``.<name>.*.tmp*``);
    returns what was removed. Call it before resuming from ``path``."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    gone = []
    for tmp in path.parent.glob(f".{path.name}.*.tmp*"):
        tmp.unlink(missing_ok=True)
        gone.append(tmp)
    return gone


def writable_directory(path: str | os.PathLike) -> Path:
    """Make sure files can be written in the directory ``path`` before any work is done:
    create it (and its parents) when missing and write and remove a probe file. Raises an
    ``OSError`` naming the path and the problem (``NotADirectoryError`` when it is a file)."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".dip-uq-write-test.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise type(err)(f"{path}: cannot write there ({err.strerror or err})") from err
    return path

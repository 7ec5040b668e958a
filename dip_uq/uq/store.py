"""Stage checkpoints keyed on fingerprints: one helper for every stage of the pipeline.

A stage's checkpoint holds its result and a *key*: the stage's own settings and the digest of
everything it consumed (the data, and the results of the stages before it). On resume a
checkpoint is reused only when the key matches, so no stage is ever reused after its settings
or anything upstream changed. Other settings raise :class:`~dip_uq.errors.CheckpointError`
naming them (rerun with those settings, or ``resume=False`` to recompute and overwrite);
other inputs (say, a DIP trained further) make the stage run again (``recomputed`` lists it). Files are written atomically
and temporary files a killed run left behind are removed when the store opens.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..dip.checkpoint import atomic_save, load_checkpoint
from ..errors import CheckpointError
from ..io.atomic import remove_stale_temporaries, writable_directory

__all__ = ["StageStore", "digest"]


def digest(*parts: Any) -> str:
    """A short SHA-256 over tensors (their dtype, shape and bytes), numbers, strings and
    nested lists/tuples/dicts of them: equal inputs give equal digests on any run."""
    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, dict):
            h.update(b"{")
            for k in sorted(x, key=str):
                feed(str(k))
                feed(x[k])
            h.update(b"}")
        elif isinstance(x, list | tuple):
            h.update(b"[")
            for v in x:
                feed(v)
            h.update(b"]")
        else:
            h.update(repr(x).encode())

    for p in parts:
        feed(p)
    return h.hexdigest()[:16]


def _jsonable(settings: dict) -> dict:
    return json.loads(json.dumps(settings, default=str))


class StageStore:
    """Checkpoints of the pipeline's stages in ``directory`` (``None``: nothing is saved).

    ``load(name, settings, upstream)`` returns the saved payload when the checkpoint's
    settings and upstream digest equal these; ``None`` when there is none, ``resume`` is off
    or its inputs changed (the stage is then in ``recomputed``); it raises ``CheckpointError``
    when the checkpoint was written under other settings. ``save(name, settings, upstream,
    payload)`` writes it.
    """

    def __init__(self, directory: str | os.PathLike | None, *, resume: bool = True) -> None:
        self.directory = Path(directory).expanduser() if directory is not None else None
        self.resume = bool(resume)
        self.recomputed: list[str] = []
        if self.directory is not None:  # a file or a read-only place fails now, not after the DIP
            try:
                writable_directory(self.directory)
            except OSError as err:
                raise CheckpointError(f"checkpoint_dir {err}") from err
            for f in list(self.directory.glob("*.pt")):
                remove_stale_temporaries(f)
            for f in self.directory.glob(".*.tmp*"):  # orphans of files never completed
                f.unlink(missing_ok=True)

    def path(self, name: str) -> Path | None:
        return None if self.directory is None else self.directory / f"{name}.pt"

    def load(self, name: str, settings: dict, upstream: str = "") -> dict | None:
        path = self.path(name)
        if path is None or not self.resume or not path.exists():
            return None
        st = load_checkpoint(path)
        saved = st.get("key")
        now = {"settings": _jsonable(settings), "upstream": upstream}
        if saved is None:
            raise CheckpointError(f"{path}: not a stage checkpoint of this pipeline (no key)")
        diff = {
            k: (saved["settings"].get(k), v)
            for k, v in now["settings"].items()
            if saved["settings"].get(k) != v
        }
        if diff:
            shown = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise CheckpointError(
                f"{path} was written with other settings ({shown}); rerun with those settings, "
                "resume=False, or another checkpoint_dir"
            )
        if saved.get("upstream") != upstream:  # stale: an earlier stage's result changed
            self.recomputed.append(name)
            return None
        return st["payload"]

    def save(self, name: str, settings: dict, upstream: str, payload: dict) -> None:
        path = self.path(name)
        if path is None:
            return
        key = {"settings": _jsonable(settings), "upstream": upstream}
        atomic_save({"key": key, "payload": payload}, path)

    def remove(self, name: str) -> None:
        path = self.path(name)
        if path is not None:
            path.unlink(missing_ok=True)

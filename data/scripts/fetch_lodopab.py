#!/usr/bin/env python3
"""Download and unpack LoDoPaB-CT (Leuschner et al., Sci. Data 8:109, 2021; CC-BY 4.0) from
Zenodo record 3384092. Standard library only.

    python data/scripts/fetch_lodopab.py --part test --out ~/data/lodopab

leaves ``ground_truth_test_000.hdf5 ...`` and ``observation_test_000.hdf5 ...`` in one
folder, the layout ``dip_uq.io.datasets.LoDoPaB`` reads. The training part is large (tens of
GB). This script is a recipe for users with internet access; dip-uq never runs it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import urllib.request
import zipfile
from pathlib import Path

RECORD = 3384092


def zenodo_files(record: int) -> dict[str, tuple[str, str | None]]:
    """name -> (download URL, md5 or None) for every file of a Zenodo record."""
    with urllib.request.urlopen(f"https://zenodo.org/api/records/{record}", timeout=60) as r:
        meta = json.load(r)
    out = {}
    for f in meta.get("files", []):
        md5 = f.get("checksum", "")
        out[f["key"]] = (f["links"]["self"], md5[4:] if md5.startswith("md5:") else None)
    return out


def download(url: str, dest: Path, md5: str | None) -> None:
    """Stream to ``dest.part``, check the md5, then rename (never a half file under dest)."""
    if dest.exists():
        print(f"{dest} exists, skipping download")
        return
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.md5()
    with urllib.request.urlopen(url, timeout=60) as r, open(part, "wb") as fh:
        total = int(r.headers.get("Content-Length", 0))
        done = 0
        while chunk := r.read(1 << 22):
            fh.write(chunk)
            digest.update(chunk)
            done += len(chunk)
            if total:
                print(f"\r{dest.name}: {done / total:6.1%}", end="", file=sys.stderr)
    print(file=sys.stderr)
    if md5 and digest.hexdigest() != md5:
        part.unlink()
        raise SystemExit(f"{dest.name}: md5 mismatch, download removed; try again")
    os.replace(part, dest)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["train", "validation", "test"], nargs="+", default=["test"])
    ap.add_argument("--out", type=Path, default=Path("lodopab"))
    ap.add_argument("--keep-zip", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    files = zenodo_files(RECORD)
    for part in args.part:
        for kind in ("ground_truth", "observation"):
            name = f"{kind}_{part}.zip"
            if name not in files:
                raise SystemExit(f"record {RECORD} has no {name}; found {sorted(files)}")
            zpath = args.out / name
            url, md5 = files[name]
            download(url, zpath, md5)
            with zipfile.ZipFile(zpath) as z:
                z.extractall(args.out)
            if not args.keep_zip:
                zpath.unlink()
    print(f"LoDoPaB {', '.join(args.part)} ready under {args.out}")


if __name__ == "__main__":
    main()

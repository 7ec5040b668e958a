#!/usr/bin/env python3
"""Download and unpack walnuts of the CWI cone-beam CT collection (Der Sarkissian et al.,
Sci. Data 6:215, 2019; CC-BY 4.0) from Zenodo. Standard library only.

    python data/scripts/fetch_walnut.py --walnut 1 --out ~/data

leaves ``~/data/Walnut1/Projections/...`` and ``~/data/Walnut1/Reconstructions/...``, the
layout ``dip_uq.io.datasets.load_walnut_projections`` reads. About 5 GB per walnut. This script
is a recipe for users with internet access; dip-uq never runs it.
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

# Zenodo record per range of walnuts (see the paper's data records section).
RECORDS = {
    range(1, 9): 2686726,
    range(9, 17): 2686970,
    range(17, 25): 2687386,
    range(25, 33): 2687634,
    range(33, 38): 2687896,
    range(38, 43): 2688111,
}


def record_for(walnut: int) -> int:
    for walnuts, record in RECORDS.items():
        if walnut in walnuts:
            return record
    raise SystemExit(f"walnut must be 1..42, got {walnut}")


def zenodo_file(record: int, name: str) -> tuple[str, str | None]:
    """(download URL, md5 or None) of one file of a Zenodo record, from the records API."""
    with urllib.request.urlopen(f"https://zenodo.org/api/records/{record}", timeout=60) as r:
        meta = json.load(r)
    for f in meta.get("files", []):
        if f.get("key") == name:
            md5 = f.get("checksum", "")
            return f["links"]["self"], md5[4:] if md5.startswith("md5:") else None
    raise SystemExit(f"record {record} has no file {name!r}")


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
    ap.add_argument("--walnut", type=int, nargs="+", default=[1])
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--keep-zip", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for w in args.walnut:
        name = f"Walnut{w}.zip"
        url, md5 = zenodo_file(record_for(w), name)
        zpath = args.out / name
        download(url, zpath, md5)
        with zipfile.ZipFile(zpath) as z:
            z.extractall(args.out)
        if not args.keep_zip:
            zpath.unlink()
        print(f"Walnut {w} ready under {args.out}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Download the KMNIST test images (Clanuwat et al., 2018; CC BY-SA 4.0), the files linked
from github.com/rois-codh/kmnist. Standard library only.

    python data/scripts/fetch_kmnist.py --out ~/data/kmnist

leaves ``t10k-images-idx3-ubyte.gz`` and ``kmnist-test-imgs.npz``, which
``dip_uq.io.datasets.load_images`` reads. This script is a recipe for users with internet
access; dip-uq never runs it.
"""

from __future__ import annotations

import argparse
import os
import urllib.request
from pathlib import Path

BASE = "http://codh.rois.ac.jp/kmnist/dataset/kmnist/"
FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "kmnist-test-imgs.npz")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("kmnist"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        dest = args.out / name
        if dest.exists():
            print(f"{dest} exists, skipping")
            continue
        part = dest.with_name(name + ".part")
        with urllib.request.urlopen(BASE + name, timeout=60) as r, open(part, "wb") as fh:
            while chunk := r.read(1 << 20):
                fh.write(chunk)
        os.replace(part, dest)  # no half-written file under the final name
        print(f"{dest}: {dest.stat().st_size} bytes")


if __name__ == "__main__":
    main()

"""Smoke test of benchmarks/uq_3d.py at a toy size (both stages in their own processes),
so the 3D timing script does not rot."""

from __future__ import annotations

import json
import math

from _benchmarks import load_benchmark


def test_uq_3d_toy_run(tmp_path):
    bench = load_benchmark("uq_3d")
    out = tmp_path / "u"
    argv = ["--size", "8", "--views", "6", "--dip-iterations", "5", "--channels", "4",
            "--em-cycles", "1", "--em-samples", "2", "--samples", "2", "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    dip, uq = res["dip"], res["uq"]
    assert res["args"]["tv"] == 1e-6  # the volume-sized TV default (docs/dip.md)
    assert dip["data_misfit"] > 0 and math.isfinite(dip["psnr"])
    assert dip["peak_mib"] > 0 and uq["peak_mib"] > 0
    assert math.isfinite(res["uq_over_dip"]) and uq["noise_var"] > 0
    assert "× the noise" in (out / "table.md").read_text()

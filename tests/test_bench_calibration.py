"""Smoke tests of the calibration benchmarks at toy sizes, so the scripts do not rot."""

from __future__ import annotations

import json
import math

import pytest
from _benchmarks import load_benchmark

pytestmark = pytest.mark.usefixtures("one_thread")


def test_calibration_suite_toy_run(tmp_path):
    cal = load_benchmark("calibration")
    assert {c[4] for c in cal.CASES.values()} == {"tune", "test", "3d"}
    assert cal.main(["--cases", "mr_small-64-40-3", "--quick", "--out", str(tmp_path)]) == 0
    row = json.loads((tmp_path / "mr_small-64-40-3.json").read_text())
    assert set(row["modes"]) == set(cal.MODES)
    for m in row["modes"].values():
        assert 0 <= m["image"]["coverage"]["0.9"] <= 1 and math.isfinite(m["image"]["test_ll"])
    assert row["modes"]["none"]["scales"] == {"weights": 1.0, "noise": 1.0}
    assert "| mr_small-64-40-3 | tune |" in (tmp_path / "table.md").read_text()


def test_protocol_calibration_toy_run(tmp_path):
    pc = load_benchmark("protocol_calibration")
    digits = pc.digit_images(2)
    assert digits.shape == (2, 28, 28) and float(digits.max()) <= 1 and float(digits.min()) >= 0
    argv = ["--settings", "10:0.10", "--kinds", "digits", "--n-images", "1", "--iter-scale",
            "0.01", "--channels", "4", "--out", str(tmp_path)]  # fmt: skip
    assert pc.main(argv) == 0
    row = json.loads((tmp_path / "10a-10pc-digits-0.json").read_text())
    for k in ("ours", "sigma2=1", "mcdo"):
        assert math.isfinite(row[k]["test_ll"])
    assert row["heldout"]["views"] and row["scales"]["weights"] > 0

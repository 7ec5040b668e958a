"""Smoke test of benchmarks/uq_protocol.py at a toy size, so the script does not rot."""

from __future__ import annotations

import json
import math

import pytest
from _benchmarks import load_benchmark


@pytest.fixture(scope="module")
def proto():
    return load_benchmark("uq_protocol")


def test_net_overrides_reach_both_dips(proto):
    args = proto.argparse.Namespace(channels=8, output="linear")
    assert proto.net_overrides(args) == {"channels": (8, 8, 8), "use_sigmoid": False}
    assert proto.net_overrides(proto.argparse.Namespace(channels=0, output="sigmoid")) == {}


def test_protocol_toy_run(proto, tmp_path):
    out = tmp_path / "p"
    argv = [
        "--angles", "5", "--noise", "0.1", "--n-images", "1", "--iter-scale", "0.01",
        "--lr", "1e-2", "--channels", "4", "--solver", "exact", "--em-cycles", "1",
        "--em-samples", "4", "--n-samples", "4", "--out", str(out),
        "--methods", "lin-DIP EM", "DIP sigma2=1", "DIP-MCDO",
    ]  # fmt: skip
    assert proto.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["args"]["output"] == "sigmoid"  # the small preset, with the saturation barrier
    s = res["summary"]["5 angles, 10% noise"]
    for m in ("lin-DIP EM", "DIP sigma2=1", "DIP-MCDO"):
        assert math.isfinite(s[m]["test_ll"][0]) and math.isfinite(s[m]["psnr"][0])
    assert "| 5 angles, 10% noise | lin-DIP EM |" in (out / "table.md").read_text()

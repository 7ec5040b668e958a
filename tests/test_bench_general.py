"""Smoke test of benchmarks/general.py (our side) at toy sizes, so the script does not rot."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from _benchmarks import load_benchmark


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)  # the workers set their own


@pytest.fixture(scope="module")
def bench():
    path = list(sys.path)
    mod = load_benchmark("general")
    sys.path[:] = path  # the script edits sys.path for its own process
    return mod


@pytest.mark.parametrize(
    "task,curvature", [("digits-ml", "mode"), ("digits", "network"), ("diabetes", "network")]
)
def test_worker_scores(bench, tmp_path, task, curvature):
    torch.manual_seed(0)
    net = bench._make(task)
    weights = tmp_path / "w.pt"
    torch.save(net.state_dict(), weights)
    cfg = {"task": task, "weights": str(weights), "k": 2, "em": 1, "n_train": 40}
    out = bench.worker_ours({**cfg, "curvature": curvature})
    assert out["nll"] > 0 and math.isfinite(out["nll"]) and out["wall_s"] > 0
    if task == "diabetes":
        assert out["rmse"] > 0 and 0 <= out["cov90"] <= 1
    else:
        assert 0 <= out["ece"] <= 1 and 0 <= out["acc"] <= 1
    assert len(out["prior_precision"]) == 1


def test_worker_scaling_toy(bench):
    cfg = {"task": "resnet", "n": 8, "classes": 3, "width": 2, "k": 1, "em": 1,
           "cg_iter": 1, "batch": 4}  # fmt: skip
    out = bench.worker_ours(cfg)
    assert out["d"] > 0 and out["em_cycle_s"] > 0 and out["peak_rss_mb"] > 0
    assert bench._round({"a": [1.234567, 2]}) == {"a": [1.2346, 2]}


def test_worker_seed_is_honoured(bench, tmp_path):
    """``--seeds`` averages over the sample generator: another seed, other draws."""
    torch.manual_seed(0)
    weights = tmp_path / "w.pt"
    torch.save(bench._make("digits").state_dict(), weights)
    cfg = {"task": "digits", "weights": str(weights), "k": 2, "em": 1, "n_train": 40}
    a, b = (bench.worker_ours({**cfg, "seed": s})["nll"] for s in (0, 1))
    assert a != b


@pytest.mark.slow
def test_gamma_spread_runs(bench):
    out = bench.gamma_spread("digits", k=4)
    assert out["exact"] > 0 and out["function"][1] > 0 and out["paired"][1] > 0

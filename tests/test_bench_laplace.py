"""Smoke test of benchmarks/laplace.py at a toy size, so the script does not rot."""

from __future__ import annotations

import math

import pytest
from _benchmarks import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("laplace")


def test_run_case_toy(bench, tmp_path):
    case = bench.Case(
        "toy",
        8,
        5,
        {"channels": (4, 4), "skip_channels": (0, 1)},
        samples=4,
        dip_iterations=3,
        max_iterations=100,
        sample_batch=3,
    )
    res = bench.run_case(case, tmp_path, subprocesses=False, log=lambda *_: None)
    dip = res["dip"]
    assert dip["n_obs"] > 0 and dip["weights"] > 0
    assert math.isclose(dip["dip_fit_s"], dip["dip_step_s"] * bench.REF_ITERS)
    rows = {r["solver"]: r for r in res["solvers"]}
    assert set(rows) == {"exact", "cg", "sgd", "sgd-lowrank", "sdd"}
    # the reference is exact with the same noise: exact reproduces it, cg converges to it
    assert rows["exact"]["final_err"] < 1e-6
    for name in ("cg", "sgd", "sgd-lowrank", "sdd"):
        r = rows[name]
        assert r["reached"], (name, r["trail"])
        assert r["final_err"] <= bench.TARGET
        assert r["time_ratio"] > 0 and math.isfinite(r["time_ratio"])
        assert r["em_cycle_s"] > 0 and r["peak_mb"] >= 0
    # the production configuration (draws in batches of 3, one preconditioner) reproduces
    # the one-batch map: the draws are independent
    for name in ("cg", "sgd-lowrank"):
        b = rows[name]["batched"]
        assert b["err"] == pytest.approx(rows[name]["final_err"], abs=1e-4), name
        assert b["time_s"] > 0 and b["peak_mb"] >= 0
    table = bench.markdown([res], threads=1)
    assert table.startswith("## Linearised Laplace: `laplace.py`")
    assert table.count("\n| toy |") == 7


def test_readme_section_replaces_only_its_own(bench, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\n## DIP\n\nlead's text\n\n## Operators\n\nmore\n")
    bench.write_readme_section(readme, "## Linearised Laplace: `laplace.py`\n\nv1\n")
    bench.write_readme_section(readme, "## Linearised Laplace: `laplace.py`\n\nv2\n")
    text = readme.read_text()
    assert "v1" not in text and text.count("v2") == 1
    assert "lead's text" in text and "## Operators\n\nmore" in text
    bench.write_readme_section(tmp_path / "new.md", "## Linearised Laplace: `laplace.py`\n\nx\n")
    assert (tmp_path / "new.md").read_text().startswith("# Benchmarks\n")


def test_run_case_cg_reference_gives_the_cg_row(bench, tmp_path):
    """The 128² protocol: a long cg run is the reference and its own iterates the cg row."""
    case = bench.Case(
        "toy",
        8,
        5,
        {"channels": (4, 4), "skip_channels": (0, 1)},
        samples=3,
        dip_iterations=2,
        max_iterations=60,
        solvers=("cg", "sdd"),
        reference="cg",
        ref_tol=1e-6,
        em_solvers=("cg",),
        check_every=2,
        chunk_size=2,
    )
    res = bench.run_case(case, tmp_path, subprocesses=False, log=lambda *_: None)
    assert res["reference"]["reference"].startswith("cg to residual")
    assert res["reference"]["ref_residual"] < 1e-6
    rows = {r["solver"]: r for r in res["solvers"]}
    cg = rows["cg"]
    # the cg row: the first of the reference run's own iterates within the target
    assert cg["reached"] and cg["final_err"] <= bench.TARGET and cg["em_cycle_s"] > 0
    assert all(e > bench.TARGET for *_, e in cg["trail"][:-1])
    assert rows["sdd"]["reached"] and "em_cycle_s" not in rows["sdd"]
    assert all(r["load"] for r in rows.values())
    assert res["dip"]["dip_step_end_s"] > 0

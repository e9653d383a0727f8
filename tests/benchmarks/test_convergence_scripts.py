"""The convergence study scripts: the aggregation on hand-made curves, and the GPU script's CPU smoke run."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _convergence():
    spec = importlib.util.spec_from_file_location("convergence", REPO / "benchmarks" / "convergence.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _curve(*rows):
    return [{"step": s, "pq": pq, "pq_things": th, "pq_stuff": st} for s, pq, th, st in rows]


def test_aggregate_means_first_step_and_table():
    conv = _convergence()
    runs = {"remax": {0: _curve((100, 20.0, 0.0, 50.0), (200, 42.0, 10.0, 80.0)),
                      1: _curve((100, 41.0, 5.0, 82.0), (200, 44.0, 14.0, 84.0))},
            "kmax": {0: _curve((100, 10.0, 0.0, 25.0), (200, 30.0, 2.0, 70.0))}}
    probes = {"remax": {0: {"thing_recall": 10.0, "winning_queries": 4.0},
                        1: {"thing_recall": 20.0, "winning_queries": 6.0}}}
    agg = conv.aggregate(runs, reach=40.0, probes=probes)
    assert agg["remax"]["probe"]["thing_recall"][0] == pytest.approx(15.0) and agg["kmax"]["probe"] is None
    r = agg["remax"]
    assert r["final"]["pq"][0] == pytest.approx(43.0) and r["final"]["pq"][1] == pytest.approx(2 ** 0.5)
    assert r["final"]["pq_things"][0] == pytest.approx(12.0)
    assert r["reach"]["steps"] == [200, 100] and r["reach"]["mean"] == pytest.approx(150.0)
    assert agg["kmax"]["reach"]["n_reached"] == 0 and agg["kmax"]["reach"]["mean"] is None
    assert [p["pq_stuff"] for p in r["points"]] == [pytest.approx(66.0), pytest.approx(82.0)]
    table = conv.markdown_table(agg)
    assert "| `remax` |" in table and "150 (2/2 seeds)" in table and "never" in table
    assert "43.0 ± 1.4" in table and "12.0 ± 2.8" in table and "15.0 ± 7.1" in table and "5.0 ± 1.4" in table
    assert conv.first_step_reaching(runs["remax"][0], 42.0) == 200


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_convergence_script_smoke_on_cpu(tmp_path: Path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable, SEEDS="0", STEPS="2", EVAL_EVERY="1",
               OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_convergence.sh"), "--smoke"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = tmp_path / "out"
    results = json.loads((out / "runs" / "results.json").read_text())
    assert set(results["aggregate"]) == {"remax", "kmax"}
    for variant in ("remax", "kmax"):
        curve = results["runs"][variant]["0"]
        assert [p["step"] for p in curve] == [1, 2]
        assert all(0.0 <= p[m] <= 100.0 for p in curve for m in ("pq", "pq_things", "pq_stuff"))
    for variant in ("remax", "kmax"):  # the class-agnostic probe of each final checkpoint
        probe = results["probes"][variant]["0"]
        assert 0.0 <= probe["thing_recall"] <= 100.0 and probe["winning_queries"] >= 1.0
    assert "| `remax` |" in (out / "runs" / "table.md").read_text()
    assert (out / "runs" / "pq_vs_step.png").stat().st_size > 1000
    assert "convergence:begin" in (out / "convergence.md").read_text()
    log = (out / "log.txt").read_text()
    assert "smoke=1 device=cpu" in log and "# total" in log
    bad = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_convergence.sh"), "--bogus"], env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument" in bad.stderr

"""benchmarks/gpu_suite.sh: the GPU suite's pipeline, run on the CPU at a tiny size (--smoke)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_suite_smoke_on_cpu(tmp_path: Path):
    env = dict(os.environ, OUT=str(tmp_path / "suite"), PRESETS="remax_t", TRAIN_PRESETS="remax_t")
    res = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--smoke"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    data = json.loads((tmp_path / "suite" / "suite.json").read_text())
    assert not data["skipped"], data["skipped"]
    rows = {(r["subject"], r["stage"]) for d in data["done"] for r in d["rows"]}
    assert rows == {("remax_t", "model"), ("remax_t", "end_to_end"), ("mask2former-r50", "model"),
                    ("mask2former-r50", "end_to_end"), ("remax_t", "train_step")}
    e2e = [r for d in data["done"] for r in d["rows"] if r["subject"] == "remax_t" and r["stage"] == "end_to_end"]
    assert e2e[0]["segments"] > 0  # the trained-shape merge load makes the merge keep segments
    table = (tmp_path / "suite" / "suite.md").read_text()
    assert "| remax_t | end_to_end | no | 1 |" in table and "330: " in table
    assert "gpu_suite.sh" in (tmp_path / "suite" / "log.txt").read_text()

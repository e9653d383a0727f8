"""Shared set-up for the engine tests that run the real stack: tiny data, tiny inputs, one thread."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# nano at a 65×65 input on 64×64 synthetic images: a step takes a fraction of a second on one core.
TINY = [
    "--set", "model.input_size=[65,65]", "--set", "data.crop_size=[65,65]", "--set", "data.resize_longer_side=64",
    "--set", "data.num_workers=0", "--set", "train.batch_size=2", "--set", "train.base_batch_size=2",
    "--set", "train.warmup_steps=2", "--set", "train.log_every=1", "--set", "train.eval_every=0",
    "--set", "train.num_val_images=1", "--set", "train.deterministic=true",
    "--set", "loss.instance_discrimination_sample_k=64", "--set", "loss.semantic_sample_k=64",
]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + e.get("PYTHONPATH", ""))
    return e


def make_synthetic(root: Path, num_train: int = 4, num_val: int = 1, size: int = 64) -> Path:
    from remax.data.synthetic import write_synthetic_dataset

    if not (root / "annotations").exists():
        write_synthetic_dataset(root, num_train, num_val, size=size, seed=0)
    return root


def remax_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "remax", *args]


def run_remax(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(remax_cmd(*args), cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)

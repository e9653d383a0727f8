"""Run records: ``metrics.jsonl`` (one JSON object per line), optional TensorBoard, and the PNG curves."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class MetricsWriter:
    """Appends records to ``metrics.jsonl`` (and TensorBoard when asked and installed). Rank 0 only."""

    def __init__(self, run_dir: Path, tensorboard: bool = False, resume_step: int | None = None,
                 drop_eval_at: int | None = None) -> None:
        """``resume_step``: the step the run starts from (0 for a fresh run); rows after it belong to a run that
        stopped before saving them and would be repeated, so they are dropped. ``drop_eval_at``: also drop the
        ``eval`` rows of that step (a finished run that is resumed redoes its final evaluation)."""
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            records = read_metrics(self.path)
            kept = [r for r in records if int(r.get("step", 0)) <= resume_step
                    and not (r.get("kind") == "eval" and drop_eval_at is not None
                             and int(r.get("step", 0)) == drop_eval_at)]
            if len(kept) != len(records):
                log.info("%s: dropped %d row(s) not covered by the checkpoint at step %d", self.path,
                         len(records) - len(kept), resume_step)
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
            except ImportError:
                log.warning("train.tensorboard is on but tensorboard is not installed; writing metrics.jsonl only")

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: (float(v) if isinstance(v, float) and math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean, allow_nan=True) + "\n")
        if self._tb is not None:
            step = int(record.get("step", 0))
            prefix = record.get("kind", "train")
            for k, v in record.items():
                if k not in ("step", "kind") and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def group_loss_terms(record: dict[str, Any]) -> dict[str, float]:
    """Sum per-output loss terms (``loss/loss_pq_dice/aux0``, ``loss/loss_pq_dice/final``, …) by term name."""
    groups: dict[str, float] = {}
    for key, value in record.items():
        if not key.startswith("loss/") or not isinstance(value, (int, float)):
            continue
        term = key.removeprefix("loss/").split("/")[0].removeprefix("loss_")
        if term == "total":
            continue
        groups[term] = groups.get(term, 0.0) + float(value)
    return groups


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` (a torn last line, from a killed run, is skipped)."""
    records = []
    p = Path(path)
    if not p.exists():
        return records
    for line in p.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("skipping a malformed line in %s", p)
    return records


def plot_curves(run_dir: str | Path) -> list[Path]:
    """Write ``loss.png`` (total and main terms) and ``pq.png`` (validation PQ) from ``metrics.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    written: list[Path] = []
    train = [r for r in records if r.get("kind") == "train"]
    if train:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        steps = [r["step"] for r in train]
        ax.plot(steps, [r["loss"] for r in train], label="total", color="black", linewidth=1.8)
        grouped = [group_loss_terms(r) for r in train]
        for term in sorted({t for g in grouped for t in g}):
            ax.plot(steps, [g.get(term, float("nan")) for g in grouped], label=term, linewidth=1.0)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.set_title("training loss")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(run_dir / "loss.png", dpi=100)
        plt.close(fig)
        written.append(run_dir / "loss.png")
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in (("pq", "PQ"), ("pq_things", "PQ things"), ("pq_stuff", "PQ stuff")):
        pts = [(r["step"], r[key]) for r in evals if key in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("PQ (%)")
    ax.set_title("validation panoptic quality")
    ax.grid(True, alpha=0.3)
    if evals:
        ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "pq.png", dpi=100)
    plt.close(fig)
    written.append(run_dir / "pq.png")
    return written

"""ReMaX vs. the kMaX-DeepLab baseline at equal steps, with the ReMaX ablations (issue 7, SPEC §4.1).

Every variant trains the same preset on the same data for the same number of steps from the same seeds; the
validation PQ is measured at regular points of training. The script writes, under ``--out``:

- ``results.json``: every run's PQ curve and the per-variant aggregates,
- ``pq_vs_step.png``: mean PQ ± std against the training step, one line per variant,
- ``table.md``: final PQ (mean ± std over seeds) and PQ at each evaluation point,

and, with ``--doc docs/convergence.md``, replaces the generated block of that page with the new table.

Bounded CPU run (the default; nano on the synthetic data)::

    python benchmarks/convergence.py --out runs/convergence --steps 600 --eval-every 150 --seeds 0 1 2

Larger presets on a GPU: ``--preset remax_t --data /data/coco --device cuda --steps 50000 --eval-every 5000``.

Finished runs are reused, so the work can be split over processes sharing ``--out`` (one seed or variant each);
a last call with ``--no-train`` aggregates whatever has finished and writes the page.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from remax.config import Config, apply_kmax_baseline, get_config

log = logging.getLogger("convergence")

# name -> (description, config overrides). "kmax" and "kmax_step" additionally switch to the baseline recipe.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "remax": ("ReMaX, library defaults", []),
    "kmax": ("kMaX-DeepLab baseline (no ReMask/ReClass, softmax mask-ID)", []),
    "kmax_step": ("kMaX-DeepLab objective with ReMaX's step schedule (objective vs. schedule)", []),
    "eta_0": ("ReClass eta = 0", ["remax.reclass_eta=0.0"]),
    "eta_0.2": ("ReClass eta = 0.2", ["remax.reclass_eta=0.2"]),
    "stages_0": ("ReMask on 0 stages", ["remax.remask_stages=0"]),
    "stages_2": ("ReMask on the first 2 stages", ["remax.remask_stages=2"]),
    "no_stop_grad": ("no stop-gradient into the semantic heads", ["remax.remask_stop_gradient=false"]),
    "sigmoid": ("sigmoid in Eq. 1 and sigmoid mask-ID loss (the paper's Table 2 choice)",
                ["remax.remask_activation=sigmoid", "remax.mask_id_activation=sigmoid"]),
    "gt_semantic": ("ground-truth semantic mask instead of m_sem (Table 7 control)", ["remax.remask_use_gt=true"]),
}
DEFAULT_VARIANTS = list(VARIANTS)


def variant_config(base: Config, variant: str, seed: int, steps: int, eval_every: int) -> Config:
    cfg = base.override(VARIANTS[variant][1])
    if variant in ("kmax", "kmax_step"):
        apply_kmax_baseline(cfg)
        # Same learning rate as ReMaX so that only the objective (and for "kmax" the schedule) differs.
        cfg.train.lr = base.train.lr
        cfg.train.weight_decay = base.train.weight_decay
        if variant == "kmax_step":
            cfg.train.schedule = base.train.schedule
    cfg.train.seed = seed
    cfg.train.max_steps = steps
    cfg.train.eval_every = eval_every
    cfg.train.checkpoint_every = 0
    cfg.train.keep_checkpoints = 0
    cfg.train.warmup_steps = min(cfg.train.warmup_steps, max(1, steps // 10))
    return cfg


def read_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, PQ in percent) of every evaluation recorded in a run's ``metrics.jsonl``."""
    curve = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "eval" and "pq" in rec:
            curve.append((int(rec["step"]), float(rec["pq"])))
    return curve


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(runs: dict[str, dict[int, list[tuple[int, float]]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for variant, by_seed in runs.items():
        steps = sorted({s for curve in by_seed.values() for s, _ in curve})
        points = []
        for step in steps:
            vals = [pq for curve in by_seed.values() for s, pq in curve if s == step]
            m, sd = mean_std(vals)
            points.append({"step": step, "mean": m, "std": sd, "n": len(vals)})
        finals = [curve[-1][1] for curve in by_seed.values() if curve]
        m, sd = mean_std(finals)
        out[variant] = {"points": points, "final_mean": m, "final_std": sd, "finals": finals,
                        "description": VARIANTS[variant][0]}
    return out


def _cell(mean: float, std: float, n: int, digits: int) -> str:
    """``mean ± std``; one seed has no spread to show."""
    return f"{mean:.{digits}f}" if n < 2 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(agg: dict[str, Any]) -> str:
    steps = sorted({p["step"] for a in agg.values() for p in a["points"]})
    head = "| variant | what | final PQ (mean ± std) | " + " | ".join(f"PQ @ {s}" for s in steps) + " |"
    sep = "|---|---|---|" + "---|" * len(steps)
    rows = [head, sep]
    for name, a in agg.items():
        by_step = {p["step"]: p for p in a["points"]}
        cells = [_cell(by_step[s]["mean"], by_step[s]["std"], by_step[s]["n"], 1) if s in by_step else ""
                 for s in steps]
        final = _cell(a["final_mean"], a["final_std"], len(a["finals"]), 2)
        rows.append(f"| `{name}` | {a['description']} | **{final}** (n={len(a['finals'])}) | "
                    + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(agg: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, a in agg.items():
        xs = [p["step"] for p in a["points"]]
        ms = [p["mean"] for p in a["points"]]
        sds = [p["std"] for p in a["points"]]
        style = "-" if name in ("remax", "kmax") else "--"
        width = 2.5 if name in ("remax", "kmax") else 1.2
        ax.plot(xs, ms, style, lw=width, marker="o", ms=3, label=name)
        ax.fill_between(xs, [m - s for m, s in zip(ms, sds)], [m + s for m, s in zip(ms, sds)], alpha=0.12)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation PQ (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def update_doc(doc: Path, block: str) -> None:
    begin, end = "<!-- convergence:begin -->", "<!-- convergence:end -->"
    text = doc.read_text() if doc.exists() else f"# Convergence study\n\n{begin}\n{end}\n"
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{begin}\n{block}\n{end}{tail}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="nano")
    p.add_argument("--data", default=None, help="COCO-panoptic root (default: the synthetic data set)")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--eval-every", type=int, default=150)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/convergence")
    p.add_argument("--doc", default=None, help="Markdown page whose generated block is replaced")
    p.add_argument("--no-train", action="store_true",
                   help="train nothing: aggregate the finished runs under --out (missing seeds are left out)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="applied to every variant (e.g. train.batch_size=4)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)

    from remax.engine import train

    base = get_config(args.preset, data="custom" if args.data else None)
    if args.data:
        base.data.root = args.data
    base.train.device = args.device
    base = base.override(args.overrides)
    out = Path(args.out)
    runs: dict[str, dict[int, list[tuple[int, float]]]] = {}
    t0 = time.perf_counter()
    for variant in args.variants:
        for seed in args.seeds:
            run_dir = out / variant / f"seed{seed}"
            curve = read_curve(run_dir) if (run_dir / "metrics.jsonl").exists() else []
            if curve and curve[-1][0] >= args.steps:
                log.info("%s seed %d: reusing %s", variant, seed, run_dir)
            elif args.no_train:
                log.info("%s seed %d: no finished run at %s, left out", variant, seed, run_dir)
                continue
            else:
                cfg = variant_config(base, variant, seed, args.steps, args.eval_every)
                log.info("%s seed %d: training %d steps", variant, seed, args.steps)
                train(cfg, run_dir, progress=False)
                curve = read_curve(run_dir)
            runs.setdefault(variant, {})[seed] = curve
    agg = aggregate(runs)
    out.mkdir(parents=True, exist_ok=True)
    protocol = {"preset": args.preset, "data": args.data or "synthetic", "steps": args.steps,
                "eval_every": args.eval_every, "seeds": args.seeds, "device": args.device,
                "threads": args.threads, "overrides": args.overrides, "torch": torch.__version__,
                "wall_time_s": round(time.perf_counter() - t0, 1)}
    (out / "results.json").write_text(json.dumps({"protocol": protocol, "runs": {
        v: {str(s): c for s, c in r.items()} for v, r in runs.items()}, "aggregate": agg}, indent=2))
    seeds = sorted({len(a["finals"]) for a in agg.values()})
    plot(agg, out / "pq_vs_step.png",
         f"{args.preset}: validation PQ vs. step ({'/'.join(map(str, seeds))} seeds per variant)")
    table = markdown_table(agg)
    (out / "table.md").write_text(table + "\n")
    print(table)
    if args.doc:
        doc = Path(args.doc)
        png = doc.parent / "convergence_pq_vs_step.png"
        png.write_bytes((out / "pq_vs_step.png").read_bytes())
        cmd = "python benchmarks/convergence.py " + " ".join(argv if argv is not None else sys.argv[1:])
        update_doc(doc, f"Generated by `{cmd}` (this call: {protocol['wall_time_s']} s; "
                        f"torch {torch.__version__}).\n\n"
                        f"![PQ vs step]({png.name})\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

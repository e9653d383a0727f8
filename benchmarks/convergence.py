"""ReMaX vs. the kMaX-DeepLab baseline at equal steps and schedules, with the ReMaX ablations (SPEC §4.1).

Every variant trains the same preset on the same data for the same number of steps from the same seeds; the
validation PQ is measured at regular points of training. The script writes, under ``--out``:

- ``results.json``: every run's curves (PQ, thing PQ, stuff PQ) and the per-variant aggregates,
- ``pq_vs_step.png``: mean ± std of PQ, thing PQ and stuff PQ against the training step, one line per variant,
- ``table.md``: final PQ, thing PQ and stuff PQ (mean ± std over seeds), the first evaluated step at which PQ
  reaches ``--reach`` (the paper's "faster convergence" is a statement about that), and PQ / thing PQ at each
  evaluation point,

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

# name -> (description, config overrides). "kmax" additionally switches to the baseline objective; every variant
# keeps the same learning rate, weight decay and schedule (the first edition's kMaX runs kept the baseline's poly
# schedule, which turned out to explain their whole gap).
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "remax": ("ReMaX, library defaults", []),
    "kmax": ("kMaX-DeepLab objective (no ReMask/ReClass, softmax mask-ID), same schedule", []),
    "remask_in_loss": ("ReMask in the stages' losses only (the decoder runs on raw masks)",
                       ["remax.remask_in_decoder=false"]),
    "sigmoid_sum": ("sigmoid in Eq. 1 and the mask-ID loss, BCE summed over queries",
                    ["remax.remask_activation=sigmoid", "remax.mask_id_activation=sigmoid",
                     "loss.mask_id_sigmoid_reduction=sum"]),
    "sigmoid_mean": ("sigmoid in Eq. 1 and the mask-ID loss, BCE averaged over queries",
                     ["remax.remask_activation=sigmoid", "remax.mask_id_activation=sigmoid",
                      "loss.mask_id_sigmoid_reduction=mean"]),
    "sigmoid_matched": ("sigmoid in Eq. 1 and the mask-ID loss, Mask2Former-style BCE of matched queries",
                        ["remax.remask_activation=sigmoid", "remax.mask_id_activation=sigmoid",
                         "loss.mask_id_sigmoid_reduction=matched"]),
    "eta_0": ("ReClass eta = 0", ["remax.reclass_eta=0.0"]),
    "eta_0.2": ("ReClass eta = 0.2", ["remax.reclass_eta=0.2"]),
    "stages_0": ("ReMask on 0 stages", ["remax.remask_stages=0"]),
    "stages_2": ("ReMask on the first 2 stages", ["remax.remask_stages=2"]),
    "no_stop_grad": ("no stop-gradient into the semantic heads", ["remax.remask_stop_gradient=false"]),
    "gt_semantic": ("ground-truth semantic mask instead of m_sem (Table 7 control)", ["remax.remask_use_gt=true"]),
}
DEFAULT_VARIANTS = list(VARIANTS)
METRICS = ("pq", "pq_things", "pq_stuff")
PROBES = ("thing_recall", "winning_queries")


def variant_config(base: Config, variant: str, seed: int, steps: int, eval_every: int) -> Config:
    cfg = base.override(VARIANTS[variant][1])
    if variant == "kmax":
        apply_kmax_baseline(cfg)
        cfg.train.lr = base.train.lr
        cfg.train.weight_decay = base.train.weight_decay
        cfg.train.schedule = base.train.schedule
    cfg.train.seed = seed
    cfg.train.max_steps = steps
    cfg.train.eval_every = eval_every
    cfg.train.checkpoint_every = 0
    cfg.train.keep_checkpoints = 0  # only checkpoints/last.pt, which --probe reads
    cfg.train.warmup_steps = min(cfg.train.warmup_steps, max(1, steps // 10))
    return cfg


Curve = list[dict[str, float]]


def read_curve(run_dir: Path) -> Curve:
    """Every evaluation recorded in a run's ``metrics.jsonl``: step, PQ, thing PQ and stuff PQ in percent."""
    curve = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "eval" and "pq" in rec:
            curve.append({"step": int(rec["step"]), **{m: float(rec.get(m, math.nan)) for m in METRICS}})
    return curve


def probe_final(run_dir: Path, max_images: int = 50) -> dict[str, float] | None:
    """Class-agnostic probes of a run's final checkpoint (``diagnose_things.probe_queries``): queries winning
    pixels per image and the share of thing instances some query's region covers at IoU > 0.5, which move long
    before thing PQ does. Cached in ``probe.json`` beside the run."""
    cache = run_dir / "probe.json"
    if cache.exists():
        return json.loads(cache.read_text())
    last = run_dir / "checkpoints" / "last.pt"
    if not last.exists():
        return None
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from diagnose_things import probe_queries

    from remax.checkpoint import checkpoint_categories, checkpoint_config, load_checkpoint
    from remax.data.coco_panoptic import COCOPanopticDataset, paths_from_config
    from remax.inference.predictor import Predictor, load_model_from_state

    state = load_checkpoint(last)
    cfg = checkpoint_config(state)
    predictor = Predictor(load_model_from_state(state, cfg), cfg, checkpoint_categories(state), semantic=False,
                          instances=False)
    val = COCOPanopticDataset.from_paths(paths_from_config(cfg.data, cfg.data.val_split))
    probe = probe_queries(predictor, val, max_images)
    out = {"winning_queries": probe["winning_queries_per_image"], "thing_recall": 100 * probe["recall_iou50"],
           "found_class_correct": 100 * probe["found_class_correct"]}
    cache.write_text(json.dumps(out))
    return out


def first_step_reaching(curve: Curve, threshold: float) -> int | None:
    """The first evaluated step whose PQ is at least ``threshold`` (None if the run never gets there)."""
    return next((int(p["step"]) for p in curve if p["pq"] >= threshold), None)


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(runs: dict[str, dict[int, Curve]], reach: float,
              probes: dict[str, dict[int, dict[str, float]]] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for variant, by_seed in runs.items():
        steps = sorted({p["step"] for curve in by_seed.values() for p in curve})
        points = []
        for step in steps:
            row: dict[str, Any] = {"step": step}
            for m in METRICS:
                vals = [p[m] for curve in by_seed.values() for p in curve if p["step"] == step]
                row[m], row[f"{m}_std"] = mean_std(vals)
                row["n"] = len(vals)
            points.append(row)
        finals = {m: [curve[-1][m] for curve in by_seed.values() if curve] for m in METRICS}
        reached = [first_step_reaching(curve, reach) for curve in by_seed.values() if curve]
        hit = [r for r in reached if r is not None]
        found = [p for p in ((probes or {}).get(variant) or {}).values() if p]
        out[variant] = {"points": points, "finals": finals, "description": VARIANTS[variant][0],
                        "final": {m: mean_std(v) for m, v in finals.items()},
                        "probe": {k: mean_std([p[k] for p in found]) for k in PROBES} if found else None,
                        "reach": {"threshold": reach, "steps": reached, "mean": mean_std(hit)[0] if hit else None,
                                  "n_reached": len(hit)}}
    return out


def _cell(mean: float, std: float, n: int, digits: int) -> str:
    """``mean ± std``; one seed has no spread to show."""
    return f"{mean:.{digits}f}" if n < 2 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(agg: dict[str, Any]) -> str:
    steps = sorted({p["step"] for a in agg.values() for p in a["points"]})
    reach = next(iter(agg.values()))["reach"]["threshold"] if agg else 0
    head = ("| variant | what | final PQ | final thing PQ | final stuff PQ | things found (class-agnostic, %) | "
            f"winning queries | first step with PQ ≥ {reach:g} | "
            + " | ".join(f"PQ / things @ {s}" for s in steps) + " |")
    sep = "|---|---|---|---|---|---|---|---|" + "---|" * len(steps)
    rows = [head, sep]
    for name, a in agg.items():
        n = len(a["finals"]["pq"])
        by_step = {p["step"]: p for p in a["points"]}
        cells = [f"{by_step[s]['pq']:.1f} / {by_step[s]['pq_things']:.1f}" if s in by_step else "" for s in steps]
        finals = [_cell(*a["final"][m], n, 1) for m in METRICS]
        r = a["reach"]
        reached = "never" if not r["n_reached"] else f"{r['mean']:.0f} ({r['n_reached']}/{n} seeds)"
        probe = a.get("probe")
        found = [_cell(*probe[k], n, 1) for k in PROBES] if probe else ["", ""]
        rows.append(f"| `{name}` | {a['description']} (n={n}) | **{finals[0]}** | {finals[1]} | {finals[2]} | "
                    f"{found[0]} | {found[1]} | {reached} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(agg: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    for ax, metric, label in zip(axes, METRICS, ("PQ", "thing PQ", "stuff PQ")):
        for name, a in agg.items():
            xs = [p["step"] for p in a["points"]]
            ms = [p[metric] for p in a["points"]]
            sds = [p[f"{metric}_std"] for p in a["points"]]
            main = name in ("remax", "kmax")
            ax.plot(xs, ms, "-" if main else "--", lw=2.5 if main else 1.2, marker="o", ms=3, label=name)
            ax.fill_between(xs, [m - s for m, s in zip(ms, sds)], [m + s for m, s in zip(ms, sds)], alpha=0.1)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"validation {label} (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_doc(doc: Path, block: str, name: str = "convergence") -> None:
    """Replace the text between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` (appended if absent)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
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
    p.add_argument("--dataset", default=None,
                   help="data preset (synthetic, coco, ...; default: synthetic for nano, custom with --data)")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--eval-every", type=int, default=150)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/convergence")
    p.add_argument("--doc", default=None, help="Markdown page whose generated block is replaced")
    p.add_argument("--doc-block", default="convergence",
                   help="name of that block (<!-- NAME:begin --> ... <!-- NAME:end -->); "
                        "the plot is written as NAME_pq_vs_step.png")
    p.add_argument("--reach", type=float, default=40.0,
                   help="report the first evaluated step at which each run's PQ reaches this value")
    p.add_argument("--probe", action="store_true",
                   help="also probe each run's final checkpoint: things found by some query (class-agnostic, IoU > "
                        "0.5) and queries winning pixels (benchmarks/diagnose_things.py)")
    p.add_argument("--no-train", action="store_true",
                   help="train nothing: aggregate the finished runs under --out (missing seeds are left out)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="applied to every variant (e.g. train.batch_size=4)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)

    from remax.engine import train

    base = get_config(args.preset, data=args.dataset or ("custom" if args.data else None))
    if args.data:
        base.data.root = args.data
    base.train.device = args.device
    base = base.override(args.overrides)
    out = Path(args.out)
    runs: dict[str, dict[int, Curve]] = {}
    probes: dict[str, dict[int, dict[str, float]]] = {}
    t0 = time.perf_counter()
    for variant in args.variants:
        for seed in args.seeds:
            run_dir = out / variant / f"seed{seed}"
            curve = read_curve(run_dir) if (run_dir / "metrics.jsonl").exists() else []
            if curve and curve[-1]["step"] >= args.steps:
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
            if args.probe:
                probes.setdefault(variant, {})[seed] = probe_final(run_dir)
    agg = aggregate(runs, args.reach, probes)
    out.mkdir(parents=True, exist_ok=True)
    protocol = {"preset": args.preset, "data": args.data or "synthetic", "steps": args.steps,
                "eval_every": args.eval_every, "seeds": args.seeds, "device": args.device,
                "threads": args.threads, "overrides": args.overrides, "torch": torch.__version__,
                "wall_time_s": round(time.perf_counter() - t0, 1)}
    (out / "results.json").write_text(json.dumps({"protocol": protocol, "runs": {
        v: {str(s): c for s, c in r.items()} for v, r in runs.items()}, "probes": {
        v: {str(s): pr for s, pr in r.items()} for v, r in probes.items()}, "aggregate": agg}, indent=2))
    seeds = sorted({len(a["finals"]["pq"]) for a in agg.values()})
    plot(agg, out / "pq_vs_step.png",
         f"{args.preset}: validation PQ, thing PQ and stuff PQ vs. step "
         f"({'/'.join(map(str, seeds))} seeds per variant, mean ± std)")
    table = markdown_table(agg)
    (out / "table.md").write_text(table + "\n")
    print(table)
    if args.doc:
        doc = Path(args.doc)
        png = doc.parent / f"{args.doc_block}_pq_vs_step.png"
        png.write_bytes((out / "pq_vs_step.png").read_bytes())
        cmd = "python benchmarks/convergence.py " + " ".join(argv if argv is not None else sys.argv[1:])
        update_doc(doc, f"Generated by `{cmd}` (this call: {protocol['wall_time_s']} s; "
                        f"torch {torch.__version__}).\n\n"
                        f"![PQ vs step]({png.name})\n\n{table}\n", args.doc_block)
    return 0


if __name__ == "__main__":
    sys.exit(main())

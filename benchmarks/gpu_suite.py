"""The GPU speed suite (SPEC §8): every ReMaX preset and kmax_r50 at batch 1 in bf16, eager and torch.compile,
network alone and end to end with a trained-shape merge load, the Mask2Former-R50 peer under the same protocol,
and training images/s + peak memory for remax_t and remax_m. Writes ``suite.json`` and ``suite.md`` to ``--out``.

Run through ``benchmarks/gpu_suite.sh`` (which sets the defaults); ``--smoke`` runs the same code on the CPU at a
tiny size so that CI checks the pipeline. A time budget stops the suite between measurements: what did not run is
listed as skipped in the table, never silently dropped.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch

from remax.engine.benchmark import BenchError, BenchSettings, format_protocol, run_benchmark

# SPEC §8 end-to-end goals on one H100 (images/s, batch 1, bf16).
GOALS = {"remax_t": 330.0, "remax_m": 155.0, "remax_b": 50.0}


def plan(presets: list[str], compile_modes: list[bool], train_presets: list[str], peer: bool) -> list[dict]:
    """The measurements in the order they run: cheap eager rows first, compiled rows (minutes each) last."""
    jobs = [{"kind": "infer", "preset": p, "compile": False} for p in presets]
    if peer:
        jobs.append({"kind": "peer", "preset": presets[0], "compile": False})
    jobs += [{"kind": "train", "preset": p, "compile": False} for p in train_presets]
    if True in compile_modes:
        jobs += [{"kind": "infer", "preset": p, "compile": True} for p in presets]
        if peer:
            jobs.append({"kind": "peer", "preset": presets[0], "compile": True})
    return jobs


def run_job(job: dict, base: BenchSettings) -> dict:
    s = replace(base, preset=job["preset"], compile=job["compile"])
    if job["kind"] == "infer":
        s = replace(s, merge_load="trained")
    elif job["kind"] == "peer":
        s = replace(s, merge_load="trained", peer="mask2former-r50")
    else:
        s = replace(s, train=True)  # base carries the training batch
    t0 = time.perf_counter()
    result = run_benchmark(s)
    rows = []
    for m in result.measurements:
        if job["kind"] == "peer" and m.subject == s.preset:
            continue  # the peer job re-measures remax only to share its process; its remax rows are the infer job's
        if job["kind"] == "train" and m.stage != "train_step":
            continue
        rows.append({"subject": m.subject, "stage": m.stage, "compile": s.compile, "batch": m.batch,
                     "median_ms": m.median_ms, "p90_ms": m.p90_ms, "images_per_s": m.images_per_s,
                     "peak_mb": m.peak_memory_total_mb, "peak_delta_mb": m.peak_memory_mb,
                     "first_call_s": m.first_call_s, "segments": m.segments_per_image})
    return {"job": job, "rows": rows, "seconds": time.perf_counter() - t0,
            "protocol": format_protocol(result.protocol)}


def table(done: list[dict], skipped: list[dict]) -> str:
    head = ("| subject | stage | compile | batch | median ms | p90 ms | images/s | peak MiB | first call s | segs "
            "| goal |")
    lines = [head, "|" + "---|" * 11]
    for d in done:
        for r in d["rows"]:
            goal = GOALS.get(r["subject"]) if r["stage"] == "end_to_end" else None
            verdict = "" if goal is None else f"{goal:.0f}: {'met' if r['images_per_s'] >= goal else 'not met'}"
            segs = "" if r["segments"] is None else f"{r['segments']:.1f}"
            lines.append(f"| {r['subject']} | {r['stage']} | {'yes' if r['compile'] else 'no'} | {r['batch']} | "
                         f"{r['median_ms']:.2f} | {r['p90_ms']:.2f} | {r['images_per_s']:.1f} | {r['peak_mb']:.0f} | "
                         f"{r['first_call_s']:.1f} | {segs} | {verdict} |")
    for job in skipped:
        lines.append(f"| {job['preset'] if job['kind'] != 'peer' else 'mask2former-r50'} | {job['kind']} | "
                     f"{'yes' if job['compile'] else 'no'} | | skipped: {job.get('why', 'time budget')} | | | | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--presets", default="remax_t,remax_s,remax_m,remax_b,kmax_r50")
    ap.add_argument("--train-presets", default="remax_t,remax_m")
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--compile", default="off,on", help="off, on or off,on")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--size", type=int, default=None, help="image side (default: each preset's input size)")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--budget-s", type=float, default=450.0, help="stop starting new measurements after this")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    base = BenchSettings(device=args.device, precision=args.precision, batch=1, size=args.size, iters=args.iters,
                         warmup=args.warmup, threads=args.threads)
    train_base = replace(base, batch=args.train_batch)
    compile_modes = [m.strip() == "on" for m in args.compile.split(",")]
    jobs = plan([p for p in args.presets.split(",") if p], compile_modes,
                [p for p in args.train_presets.split(",") if p], not args.no_peer)
    start = time.perf_counter()
    done, skipped = [], []
    for job in jobs:
        if time.perf_counter() - start > args.budget_s:
            skipped.append(job)
            continue
        logging.info("suite: %s %s compile=%s", job["kind"], job["preset"], job["compile"])
        try:
            done.append(run_job(job, train_base if job["kind"] == "train" else base))
        except (BenchError, RuntimeError) as exc:  # e.g. out of memory, a compile failure: record and go on
            skipped.append(dict(job, why=str(exc).splitlines()[0][:120]))
            if args.device == "cuda":
                torch.cuda.empty_cache()
        (out / "suite.json").write_text(json.dumps({"done": done, "skipped": skipped}, indent=1))
    text = ["# remax GPU suite", "", f"total {time.perf_counter() - start:.0f} s; CUDA graphs: not offered "
            "(torch.compile default mode)", "", "```", done[0]["protocol"] if done else "(nothing ran)", "```", "",
            table(done, skipped), ""]
    (out / "suite.md").write_text("\n".join(text))
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

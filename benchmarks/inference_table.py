"""Run ``remax bench`` for several presets, each in a fresh process, and print a Markdown table.

A fresh process per row keeps one row's memory peak, thread pool and compile cache out of the next. Every row
records the exact command, so a reader can re-run it. Usage (the CPU table in docs/benchmarks.md)::

    python benchmarks/inference_table.py --threads 2 --machine ci-cpu \\
        --row "remax_t" --row "remax_t --compile" --row "remax_b --iters 3" --row "remax_t --peer mask2former-r50"

Each ``--row`` is the flags after ``remax bench --device cpu --threads T``; the preset's paper input size is the
default ``--size``. The JSON results are kept in ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path


def run_row(flags: str, threads: int, out_dir: Path, index: int, warmup: int, iters: int) -> tuple[str, dict]:
    """Run one ``remax bench`` command; returns the command as typed and its JSON result."""
    args = shlex.split(flags)
    if not args or args[0].startswith("-"):
        raise SystemExit(f"row {flags!r}: start with a preset name")
    preset, rest = args[0], args[1:]
    json_path = out_dir / f"{index:02d}_{preset}.json"
    cmd = ["remax", "bench", "--preset", preset, "--device", "cpu", "--threads", str(threads)]
    if "--warmup" not in rest:
        cmd += ["--warmup", str(warmup)]
    if "--iters" not in rest:
        cmd += ["--iters", str(iters)]
    cmd += rest
    shown = " ".join(shlex.quote(c) for c in cmd)
    print(f"$ {shown}", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "remax", *cmd[1:], "--json", str(json_path)], check=True,
                   stdout=sys.stderr)
    return shown, json.loads(json_path.read_text())


def markdown_rows(command: str, result: dict, machine: str, date: str) -> list[str]:
    """One table row per subject (remax preset, then peer if measured)."""
    proto = result["protocol"]
    by_key = {(m["subject"], m["stage"]): m for m in result["measurements"]}
    subjects = [result["preset"]] + ([result["peer"]] if result.get("peer") else [])
    rows = []
    for subject in subjects:
        model, e2e = by_key.get((subject, "model")), by_key.get((subject, "end_to_end"))
        compiled = model["compiled"] if model else False
        first = f"{model['first_call_s']:.0f} s" if compiled and model else "–"
        ratio = ""
        if subject == result["preset"] and result.get("ratios"):
            ratio = f"{result['ratios'].get('end_to_end', float('nan')):.2f}×"
        cells = [
            f"`{command}`",
            subject,
            f"{proto['image_size'][0]}²",
            "compiled" if compiled else "eager",
            f"{model['median_ms']:.0f} / {model['p90_ms']:.0f}" if model else "–",
            f"{e2e['median_ms']:.0f} / {e2e['p90_ms']:.0f}" if e2e else "–",
            f"{e2e['images_per_s']:.2f}" if e2e else "–",
            f"{e2e['peak_memory_mb']:.0f}" if e2e else "–",
            first,
            ratio,
            str(proto["iters"]),
            machine,
            date,
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


HEADER = ("| command | model | input | mode | model ms (median / p90) | end-to-end ms (median / p90) | "
          "end-to-end images/s | peak +MiB (e2e) | compile (first call) | ÷ peer (e2e) | iters | machine | date |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row", action="append", required=True, help="preset and extra flags, e.g. 'remax_t --compile'")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--machine", default="ci-cpu")
    parser.add_argument("--date", default=datetime.date.today().isoformat())
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "remax_bench"),
                        help="folder for the JSON results (default: remax_bench in the system temp folder)")
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(HEADER)
    for i, flags in enumerate(args.row):
        command, result = run_row(flags, args.threads, out_dir, i, args.warmup, args.iters)
        for row in markdown_rows(command, result, args.machine, args.date):
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

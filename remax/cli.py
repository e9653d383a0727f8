"""The ``remax`` command: a thin layer over the Python API.

Each sub-command parses its flags, calls one library function, and formats the result. Every handler imports its
library code lazily so that ``remax --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import signal
import sys
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("remax")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _add_set_option(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    """``--set KEY=VALUE`` (repeatable) into ``args.overrides``: config assignments ``section.field=value``."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt inside the block, so it unwinds (and cleans up) as Ctrl-C does."""
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class CLIError(Exception):
    """An error to show the user as one line, without a traceback."""


def _error_line(exc: BaseException) -> str:
    """One line for an expected failure.

    An error raised in a DataLoader worker arrives with the worker's whole traceback in its message; its last line
    is the original error (which names the file). Otherwise the first line; a ``KeyError`` keeps its type, since
    its message alone is only a quoted key.
    """
    text = str(exc).strip()
    if "Original Traceback" in text:
        last = [ln for ln in text.splitlines() if ln.strip()][-1].strip()
        match = re.match(r"^[\w.]*(?:Error|Exception|Interrupted): (.*)$", last)
        return match.group(1) if match else last
    if isinstance(exc, KeyError):
        return f"KeyError: {exc}"
    lines = text.splitlines()
    return lines[0] if lines else type(exc).__name__


def _os_error_line(exc: OSError) -> str:
    """``cannot write FILE: reason`` for a failed write (full disk, permissions, a file where a folder should be)."""
    if exc.filename:
        return f"cannot write {exc.filename}: {exc.strerror or exc}"
    return _error_line(exc)


def _writable_dir(path: "str | Path", what: str) -> "Path":
    """Create ``path`` and prove it writable now, before minutes of work end in a write error."""
    from remax.engine.run_folder import RunFolderError, check_writable_dir

    try:
        return check_writable_dir(path, what)
    except RunFolderError as exc:
        raise CLIError(str(exc)) from None


def _writable_file(path: "str | Path", what: str) -> "Path":
    """Check that ``path`` can be written (its folder exists or can be made, it is not a folder, not read-only)."""
    import os
    from pathlib import Path

    path = Path(path)
    if path.is_dir():
        raise CLIError(f"{what} {path} is a folder, not a file")
    _writable_dir(path.parent, f"folder of {what}")
    if path.exists() and not os.access(path, os.W_OK):
        raise CLIError(f"cannot write {what} {path}: permission denied")
    return path


# ----------------------------------------------------------------------------------------------------------------
# remax models / remax config
# ----------------------------------------------------------------------------------------------------------------


def _add_models_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the model presets with measured parameters and MACs")
    p.add_argument("presets", nargs="*", metavar="PRESET", help="only these presets (default: all)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.add_argument("--preset", action="append", default=[], help="only these presets (repeatable)")
    p.add_argument("--no-macs", action="store_true", help="skip the MAC count (faster)")
    p.set_defaults(func=_cmd_models)


def _cmd_models(args: argparse.Namespace) -> int:
    from remax.models.summary import format_model_table, summarize_presets

    try:
        rows = summarize_presets([*args.presets, *args.preset] or None, count_macs=not args.no_macs)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_model_table(rows))
    return 0


def _add_config_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="print or save a preset's full configuration")
    csub = p.add_subparsers(dest="config_cmd", required=True)
    show = csub.add_parser("show", help="print the resolved config of a preset as YAML")
    show.add_argument("preset", help="model preset, e.g. nano, remax_t, kmax_r50")
    show.add_argument("--data", default=None, help="data preset: synthetic, coco, cityscapes, ade20k, custom")
    show.add_argument("--baseline", action="store_true", help="the kMaX-DeepLab baseline recipe (ReMaX off)")
    _add_set_option(show)
    show.set_defaults(func=_cmd_config_show)


def _cmd_config_show(args: argparse.Namespace) -> int:
    from remax.config import get_config

    try:
        cfg = get_config(args.preset, data=args.data, baseline=args.baseline).override(args.overrides)
    except (ValueError, KeyError) as exc:  # unknown preset, data preset or field
        raise CLIError(_error_line(exc)) from None
    print(cfg.to_yaml(), end="")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# remax data ...
# ----------------------------------------------------------------------------------------------------------------


def _add_data_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="data set tools: synth, check, convert")
    dsub = p.add_subparsers(dest="data_cmd", required=True)
    # Owned by the data package (remax/data); see _cmd_data_* below.
    _add_data_subparsers(dsub)


def _add_data_subparsers(dsub: argparse._SubParsersAction) -> None:
    synth = dsub.add_parser("synth", help="write the built-in synthetic data set in COCO-panoptic format")
    synth.add_argument("--out", required=True, help="data set root to create (ROOT/annotations, ROOT/train, ...)")
    synth.add_argument("--train", type=int, default=400, help="training images (default 400)")
    synth.add_argument("--val", type=int, default=50, help="validation images (default 50)")
    synth.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    synth.add_argument("--seed", type=int, default=0, help="random seed; equal seeds give byte-identical files")
    synth.add_argument("--format", choices=("jpg", "png"), default="jpg", help="image format (default jpg)")
    synth.set_defaults(func=_cmd_data_synth)

    check = dsub.add_parser("check", help="report every problem of a COCO-panoptic data set (exit 1 if any)")
    check.add_argument("root", nargs="?", default=None,
                       help="data set root in COCO layout (ROOT/annotations/panoptic_{split}.json, ...)")
    check.add_argument("--split", default=None, help="only this split (default: every annotations/panoptic_*.json)")
    check.add_argument("--json-file", default=None, help="explicit annotation JSON (other layouts)")
    check.add_argument("--png-dir", default=None, help="explicit panoptic PNG folder (default: JSON path minus .json)")
    check.add_argument("--image-dir", default=None, help="explicit image folder")
    check.add_argument("--json", dest="report", default=None, metavar="FILE",
                       help="also write the problems as a JSON list of {file, message} to FILE")
    check.add_argument("--headers-only", action="store_true",
                       help="read image headers only (faster; misses truncated image data)")
    check.set_defaults(func=_cmd_data_check)

    conv = dsub.add_parser("convert", help="convert Cityscapes or ADE20K to COCO-panoptic format")
    csub = conv.add_subparsers(dest="dataset", required=True)
    cs = csub.add_parser("cityscapes", help="from gtFine/*_instanceIds.png (official panoptic rules)")
    cs.add_argument("src", help="Cityscapes root holding gtFine/ and leftImg8bit/")
    cs.add_argument("--out", required=True, help="output data set root")
    cs.add_argument("--splits", nargs="+", default=["train", "val"], help="splits (default: train val)")
    cs.add_argument("--use-train-id", action="store_true", help="category ids = trainIds (default: labelIds)")
    cs.add_argument("--images", choices=("link", "copy", "none"), default="link",
                    help="make OUT/{split} a symlink to leftImg8bit/{split} (default), a copy, or nothing")
    cs.set_defaults(func=_cmd_data_convert)
    ade = csub.add_parser("ade20k", help="from the semantic PNGs + annotations_instance (Mask2Former convention)")
    ade.add_argument("src", help="the ADEChallengeData2016 folder (images/, annotations/)")
    ade.add_argument("--mapping", required=True, help="ade20k_instance_catid_mapping.txt (instance -> 150 classes)")
    ade.add_argument("--instance-dir", default=None,
                     help="annotations_instance folder (default: SRC/annotations_instance or beside SRC)")
    ade.add_argument("--out", required=True, help="output data set root")
    ade.add_argument("--splits", nargs="+", default=["training", "validation"],
                     help="splits (default: training validation)")
    ade.add_argument("--images", choices=("link", "copy", "none"), default="link",
                     help="make OUT/{split} a symlink to images/{split} (default), a copy, or nothing")
    ade.add_argument("--stale-stuff-areas", action="store_true",
                     help="write the reference script's stuff areas (counted before things overwrite stuff)")
    ade.set_defaults(func=_cmd_data_convert)


def _progress_bar(total: int | None, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, disable=None)


def _cmd_data_synth(args: argparse.Namespace) -> int:
    import time

    from remax.data.synthetic import write_synthetic_dataset

    for name in ("train", "val", "size"):
        if getattr(args, name) < (1 if name == "size" else 0):
            raise CLIError(f"--{name} must be {'positive' if name == 'size' else 'non-negative'}")
    start = time.perf_counter()
    with _progress_bar(args.train + args.val, "synth") as bar:
        write_synthetic_dataset(args.out, args.train, args.val, size=args.size, seed=args.seed,
                                image_format=args.format, progress=bar.update)
    seconds = time.perf_counter() - start
    n = args.train + args.val
    print(f"wrote {n} images to {args.out} in {seconds:.1f} s ({n / max(seconds, 1e-9):.1f} images/s)")
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from pathlib import Path

    from remax.data.coco_panoptic import DatasetError, dataset_paths, require_split
    from remax.data.io import load_json
    from remax.data.validate import check_dataset, find_splits

    explicit = args.json_file or args.png_dir or args.image_dir
    if args.root is None and not args.json_file:
        raise CLIError("give a data set ROOT or --json-file (with --image-dir)")
    try:
        if args.split and not explicit:
            targets = [require_split(args.root, args.split)]
        elif explicit or args.split:
            targets = [dataset_paths(args.root, args.split or "", json_file=args.json_file, png_dir=args.png_dir,
                                     image_dir=args.image_dir)]
        else:
            splits = find_splits(args.root)
            if not splits:
                raise CLIError(f"{Path(args.root) / 'annotations'}: no panoptic_<split>.json found")
            targets = [dataset_paths(args.root, s) for s in splits]
    except DatasetError as exc:
        raise CLIError(str(exc)) from exc
    problems = []
    for p in targets:
        try:
            total = len(load_json(p.json_file).get("annotations", []))
        except Exception:  # the checker reports the unreadable JSON itself
            total = None
        with _progress_bar(total, f"check {p.json_file.name}") as bar:
            found = check_dataset(p.json_file, p.png_dir, p.image_dir, progress=bar.update,
                                  check_images=not args.headers_only)
        problems += found
        print(f"{p.json_file}: {total if total is not None else '?'} images, {len(found)} problem(s)")
    for problem in problems:
        print(f"  {problem}")
    if args.report:
        Path(args.report).write_text(json.dumps([pr.to_dict() for pr in problems], indent=1) + "\n",
                                     encoding="utf-8")
    if problems:
        print(f"{len(problems)} problem(s) found", file=sys.stderr)
        return 1
    print("no problems found")
    return 0


def _cmd_data_convert(args: argparse.Namespace) -> int:
    from remax.data.coco_panoptic import DatasetError

    with _progress_bar(None, f"convert {args.dataset}") as bar:
        try:
            if args.dataset == "cityscapes":
                from remax.data.cityscapes import convert_cityscapes

                written = convert_cityscapes(args.src, args.out, splits=args.splits, use_train_id=args.use_train_id,
                                             images=args.images, progress=bar.update)
            else:
                from remax.data.ade20k import convert_ade20k

                written = convert_ade20k(args.src, args.out, args.mapping, splits=args.splits,
                                         instance_dir=args.instance_dir, images=args.images,
                                         stale_stuff_areas=args.stale_stuff_areas, progress=bar.update)
        except (DatasetError, FileExistsError) as exc:
            raise CLIError(str(exc)) from exc
    for path in written:
        print(f"wrote {path}")
    print(f"next: remax data check {args.out}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# remax train
# ----------------------------------------------------------------------------------------------------------------


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a model (default: nano on the built-in synthetic data, CPU)",
        description="Train a kMaX-DeepLab / ReMaX model. With no arguments: makes the synthetic data set under "
                    "data/synthetic if absent, trains the nano preset with ReMaX on the CPU, evaluates on the "
                    "validation split and prints the PQ summary. Multi-GPU / multi-node: "
                    "torchrun --nproc_per_node N -m remax train ...")
    p.add_argument("--preset", default=None, help="model preset (see `remax models`); default nano")
    p.add_argument("--data", default=None, metavar="ROOT",
                   help="a COCO-panoptic folder (ROOT/annotations/panoptic_{split}.json, ...); classes are read "
                        "from it. With --dataset, the root of that data preset instead")
    p.add_argument("--dataset", default=None, help="data preset: synthetic, coco, cityscapes, ade20k, custom")
    p.add_argument("--config", default=None, metavar="YAML", help="start from a saved config (e.g. a run's "
                                                                   "config.yaml) instead of a preset")
    p.add_argument("--out", default=None, metavar="DIR", help="run folder (default runs/<preset>-<time>)")
    p.add_argument("--max-steps", type=int, default=None, metavar="N", help="optimiser steps (schedule follows)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out (default: the newest run under runs/) from checkpoints/last.pt")
    p.add_argument("--init-from", default=None, metavar="CKPT",
                   help="start from a checkpoint's weights (fine-tuning; heads of another class count are skipped)")
    p.add_argument("--init-partial", action="store_true",
                   help="accept an --init-from checkpoint that leaves more than half of the model's tensors fresh")
    p.add_argument("--baseline", action="store_true", help="the kMaX-DeepLab baseline recipe (ReMaX off)")
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"], help="default: the preset's")
    p.add_argument("--amp", default=None, choices=["none", "bf16", "fp16"], help="mixed precision")
    p.add_argument("--seed", type=int, default=None)
    _add_set_option(p, "override any config field, e.g. --set train.lr=0.001 (repeatable)")
    p.add_argument("--per-class", action="store_true",
                   help="also print the per-class PQ rows at the end (always in RUN/eval.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines instead)")
    p.set_defaults(func=_cmd_train)


def _train_config(args: argparse.Namespace, run_dir: "Path | None"):
    from pathlib import Path

    from remax.config import Config, apply_kmax_baseline, get_config

    if args.resume:
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise CLIError(f"cannot resume: {saved} not found")
        cfg = Config.from_yaml(saved.read_text())
        if args.preset is not None and args.preset != cfg.preset:
            raise CLIError(f"--resume continues {run_dir}, a {cfg.preset} run; --preset {args.preset} would change "
                           f"the model (drop --preset, or start a new run with another --out)")
        if args.config or args.baseline:
            raise CLIError("--resume keeps the run's own config; --config and --baseline apply to new runs only")
    elif args.config:
        path = Path(args.config)
        if not path.is_file():
            raise CLIError(f"config file not found: {path}")
        cfg = Config.from_yaml(path.read_text())
        if args.baseline:
            apply_kmax_baseline(cfg)
    else:
        dataset = args.dataset or ("custom" if args.data else None)
        cfg = get_config(args.preset or "nano", data=dataset, baseline=args.baseline)
        if args.data:
            cfg.data.root = args.data
    if args.max_steps is not None:
        if args.max_steps < 1:
            raise CLIError(f"--max-steps must be at least 1, got {args.max_steps}")
        cfg.train.max_steps = args.max_steps
    if args.device is not None:
        cfg.train.device = args.device
    if args.amp is not None:
        cfg.train.amp = args.amp
    if args.seed is not None:
        cfg.train.seed = args.seed
    model_before = cfg.to_dict()["model"] if args.resume else None
    cfg = cfg.override(args.overrides)
    if model_before is not None:
        changed = sorted(k for k, v in cfg.to_dict()["model"].items() if model_before.get(k) != v)
        if changed:
            raise CLIError(f"--resume cannot change the model of {run_dir} (model.{', model.'.join(changed)}): its "
                           f"checkpoint holds weights for the saved config; start a new run with --init-from "
                           f"{run_dir / 'checkpoints' / 'last.pt'} instead")
    # Stored resolved, so the run's config.yaml still finds its data from another working directory.
    for name in ("root", "train_json", "train_png_dir", "train_image_dir", "val_json", "val_png_dir",
                 "val_image_dir"):
        value = getattr(cfg.data, name, None)
        if isinstance(value, str) and value:
            setattr(cfg.data, name, str(Path(value).expanduser().resolve()))
    return cfg


def _newest_run() -> "Path":
    """The run under ``runs/`` whose ``last.pt`` is newest; refused when another process holds it."""
    from pathlib import Path

    from remax.engine.run_folder import lock_holder

    runs = sorted((p.parent.parent for p in Path("runs").glob("*/checkpoints/last.pt")),
                  key=lambda p: (p / "checkpoints" / "last.pt").stat().st_mtime)
    if not runs:
        raise CLIError("--resume: no run with checkpoints/last.pt under runs/; pass --out DIR")
    holder = lock_holder(runs[-1])
    if holder is not None:
        who = f"PID {holder}" if holder > 0 else "another process"
        raise CLIError(f"--resume: the newest run, {runs[-1]}, is in use by {who}; pass --out DIR to resume "
                       f"another run")
    return runs[-1]


def _cmd_train(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from remax.checkpoint import CheckpointError
    from remax.data.coco_panoptic import DatasetError
    from remax.engine import NonFiniteLossError, train
    from remax.engine.distributed import rank
    from remax.engine.run_folder import RunFolderError

    if args.resume and args.out is None:
        args.out = str(_newest_run())
    if args.out is not None:
        run_dir = Path(args.out)
    else:
        preset = args.preset or "nano"
        run_dir = Path("runs") / f"{preset}{'-baseline' if args.baseline else ''}-{time.strftime('%Y%m%d-%H%M%S')}"
    if run_dir.exists() and not run_dir.is_dir():
        raise CLIError(f"--out {run_dir} is a file, not a folder")
    try:
        cfg = _train_config(args, run_dir)
    except (ValueError, KeyError) as exc:
        raise CLIError(_error_line(exc)) from None
    try:
        result = train(cfg, run_dir, resume=args.resume, init_from=args.init_from, progress=not args.no_progress,
                       init_partial=args.init_partial)
    except (RunFolderError, CheckpointError, NonFiniteLossError, FileExistsError, FileNotFoundError) as exc:
        raise CLIError(str(exc)) from None
    except DatasetError as exc:  # every problem of the data set, one per line
        raise CLIError(str(exc)) from None
    except ValueError as exc:  # bad config values found while building the run
        raise CLIError(_error_line(exc)) from None
    except OSError as exc:  # a write into the run folder failed (disk full, permissions)
        raise CLIError(_os_error_line(exc)) from None
    if rank() != 0:
        return 0
    return _report_training(args, run_dir, result)


def _report_training(args: argparse.Namespace, run_dir: "Path", result: dict) -> int:
    """Print how a run ended; exit 0 whenever the checkpoint is saved, 128 + signal when nothing was."""

    minutes = result["wall_time_s"] / 60
    if result.get("stopped_in") == "setup":
        print(f"stopped by {result['signal']} before training started (during the data check or set-up); "
              f"nothing was trained")
        return 128 + int(signal.Signals[result["signal"]])
    if result["status"] == "interrupted":
        print(f"stopped by {result['signal']} at step {result['step']} after {minutes:.1f} min; checkpoint "
              f"{result['checkpoint']}\ncontinue with: remax train --resume --out {run_dir}")
        return 0
    print(f"trained {result['step'] - result['start_step']} steps (to step {result['step']}) in {minutes:.1f} min; "
          f"run folder {run_dir}")
    if result.get("stopped_in"):
        print(f"stopped by {result['signal']} during the final {result['stopped_in']}; checkpoint "
              f"{result['checkpoint']} is complete"
              + (f"\nevaluate it with: remax eval --checkpoint {result['checkpoint']} --data ROOT"
                 if result["stopped_in"] == "evaluation" else ""))
        return 0
    ev = result.get("eval")
    if ev and ev.get("pq"):
        from remax.engine.evaluate import result_to_json
        from remax.evaluation.panoptic_quality import format_pq_table

        eval_json = run_dir / "eval.json"
        try:
            eval_json.write_text(json.dumps({"step": result["step"], **result_to_json(ev)}, indent=1) + "\n")
        except (OSError, TypeError, ValueError) as exc:
            print(f"remax: warning: could not write {eval_json}: {exc}", file=sys.stderr)
        print(f"validation panoptic quality at step {result['step']} (per class: {eval_json}):")
        print(format_pq_table(ev["pq"], per_class=args.per_class))
        if isinstance(ev.get("miou"), (int, float)):
            print(f"mIoU {100 * ev['miou']:.2f}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# remax eval / remax predict
# ----------------------------------------------------------------------------------------------------------------


def _add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="panoptic quality, mIoU and AP of a checkpoint or of predictions on disk",
        description="Either run a checkpoint on a COCO-panoptic split (--checkpoint C --data ROOT) or score "
                    "COCO-panoptic predictions already on disk (--gt ROOT --pred-json J). Prints PQ/SQ/RQ for All, "
                    "Things, Stuff and per class, plus mIoU and mask AP.")
    p.add_argument("--checkpoint", help="model checkpoint (.pt) to evaluate")
    p.add_argument("--data", help="data set ROOT in COCO layout (ROOT/annotations/panoptic_SPLIT.json, ...)")
    p.add_argument("--gt", help="ground-truth ROOT in COCO layout, to score predictions on disk")
    p.add_argument("--gt-json", help="explicit ground-truth JSON (its PNG folder: the path without .json)")
    p.add_argument("--gt-png-dir", help="folder of the ground-truth PNGs (default: ROOT/annotations/panoptic_SPLIT/ "
                                        "or ROOT/panoptic_SPLIT/, or the --gt-json path without .json)")
    p.add_argument("--split", default=None,
                   help="split name (default: the checkpoint's val split, or 'val'; COCO's val2017 is found for "
                        "val)")
    p.add_argument("--pred-json", help="COCO-panoptic predictions JSON (e.g. from remax predict)")
    p.add_argument("--pred-dir", help="folder of the prediction PNGs (default: the JSON path without .json)")
    p.add_argument("--json", dest="json_out", help="also write the results to this JSON file")
    p.add_argument("--max-images", type=int, default=0, help="evaluate only the first N images (0 = all)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=int, default=None, help="images per forward pass")
    p.add_argument("--no-per-class", action="store_true", help="print only the All/Things/Stuff rows")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--protocol", choices=("remax", "reference"), default=None,
                   help="pre-/post-processing: remax (the checkpoint's eval.protocol, by default remax) or "
                        "reference, as bytedance/kmax-deeplab evaluates (same as --set eval.protocol=reference)")
    _add_set_option(p, "override post-processing settings, e.g. eval.thing_threshold=0.5 (repeatable)")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    from remax.checkpoint import CheckpointError, first_line
    from remax.data.coco_panoptic import DatasetError, require_split
    from remax.engine.evaluate import evaluate_files, evaluate_model, format_result, result_to_json

    if bool(args.checkpoint) == bool(args.pred_json):
        raise CLIError("give either --checkpoint (with --data) or --pred-json (with --gt or --gt-json)")
    if args.json_out:
        _writable_file(args.json_out, "--json")  # before the evaluation, not after it
    try:
        if args.checkpoint:
            if not args.data:
                raise CLIError("--checkpoint needs --data ROOT (the data set to evaluate on)")
            if args.gt_png_dir:
                raise CLIError("--gt-png-dir applies to --pred-json evaluation (with --gt or --gt-json)")
            from remax.data.coco_panoptic import COCOPanopticDataset
            from remax.inference.predictor import Predictor

            overrides = list(args.overrides) + ([f"eval.protocol={args.protocol}"] if args.protocol else [])
            predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, overrides=overrides)
            cfg = predictor.cfg
            paths = require_split(args.data, args.split or cfg.data.val_split)
            # The data set's contiguous ids follow the checkpoint's class order (matched by category id).
            dataset = COCOPanopticDataset.from_paths(paths, category_order=predictor.categories)
            result = evaluate_model(predictor.model, dataset, cfg, predictor.categories, device=predictor.device,
                                    max_images=args.max_images, progress=not args.no_progress,
                                    batch_size=args.batch_size)
        else:
            if args.overrides or args.protocol:
                raise CLIError("--set and --protocol only apply to --checkpoint evaluation")
            if not (args.gt or args.gt_json):
                raise CLIError("--pred-json needs --gt ROOT or --gt-json FILE")
            if args.gt_json:
                gt_json, gt_dir = args.gt_json, args.gt_png_dir
            else:
                paths = require_split(args.gt, args.split or "val")
                gt_json, gt_dir = paths.json_file, args.gt_png_dir or paths.png_dir
            result = evaluate_files(gt_json, args.pred_json, gt_dir, args.pred_dir, progress=not args.no_progress)
    except CheckpointError as exc:
        raise CLIError(first_line(exc)) from None
    except (OSError, ValueError, KeyError, DatasetError) as exc:  # also errors from DataLoader workers
        raise CLIError(_error_line(exc)) from None
    print(format_result(result, per_class=not args.no_per_class))
    if args.json_out:
        from pathlib import Path

        out = Path(args.json_out)
        try:
            out.write_text(json.dumps(result_to_json(result), indent=1))
        except OSError as exc:
            raise CLIError(_os_error_line(exc)) from None
        print(f"results written to {out}")
    return 0


def _add_predict_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="panoptic predictions for an image or a folder",
        description="Writes OUT/predictions.json + OUT/predictions/NAME.png (COCO panoptic) and "
                    "OUT/overlays/NAME.jpg. Files in a folder that are not readable images are reported and skipped.")
    p.add_argument("inputs", nargs="+", metavar="IMAGE|DIR", help="image files and/or folders of images")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="model checkpoint (.pt) or model folder")
    source.add_argument("--onnx", metavar="FILE", help="an ONNX file from `remax export --format onnx`, run by "
                                                        "ONNX Runtime (needs remax[onnx]; no model code)")
    source.add_argument("--program", metavar="FILE", help="a torch.export program (.pt2) from `remax export "
                                                          "--format torch-export`")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (ONNX: the CPU provider)")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward pass")
    p.add_argument("--no-overlay", action="store_true", help="do not write overlay pictures")
    p.add_argument("--semantic", action="store_true", help="also write 16-bit semantic maps (category ids)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_set_option(p, "override post-processing settings, e.g. eval.thing_threshold=0.5 (repeatable)")
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(args: argparse.Namespace) -> int:
    from pathlib import Path

    from remax.checkpoint import CheckpointError, first_line
    from remax.inference.predictor import Predictor, list_images
    from remax.inference.writer import predict_files

    paths: list[Path] = []
    for item in args.inputs:
        path = Path(item)
        if path.is_dir():
            found = list_images(path)
            if not found:
                print(f"remax: warning: folder {path} has no files", file=sys.stderr)
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            raise CLIError(f"input not found: {path}")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be at least 1, got {args.batch_size}")
    out_dir = _writable_dir(args.out, "--out folder")  # before loading the model
    try:
        options = dict(semantic=args.semantic, instances=False, overrides=args.overrides)
        if args.onnx:
            predictor = Predictor.from_onnx(args.onnx, **options)
        elif args.program:
            predictor = Predictor.from_exported(args.program, device=args.device, **options)
        else:
            predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, **options)
    except CheckpointError as exc:
        raise CLIError(first_line(exc)) from None
    except (ValueError, ImportError) as exc:
        raise CLIError(_error_line(exc)) from None

    def report(path: Path, reason: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(f"remax: skipped {path}: {reason}", file=sys.stderr)  # keeps the progress bar intact

    try:
        summary = predict_files(predictor, paths, out_dir, batch_size=args.batch_size,
                                overlays=not args.no_overlay, semantic=args.semantic, progress=not args.no_progress,
                                on_skip=report)
    except OSError as exc:  # a write into --out failed (disk full, permissions)
        raise CLIError(_os_error_line(exc)) from None
    print(f"{len(summary.written)} image(s) predicted, {len(summary.skipped)} skipped; "
          f"results in {summary.json_path}")
    if not summary.written:
        raise CLIError("no image could be read")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# remax demo
# ----------------------------------------------------------------------------------------------------------------


def _add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="a local web page: drop a photo, see its panoptic segmentation (needs remax[demo])",
        description="Serves a Gradio page for a model: upload or pick an example image, see the overlay "
                    "(panoptic / semantic / instance view), the segment table and the effect of the class and "
                    "pixel thresholds. Binds to 127.0.0.1 unless --host says otherwise; Ctrl-C stops it.")
    p.add_argument("--checkpoint", required=True,
                   help="model checkpoint (.pt), model folder, or Hugging Face Hub id org/name (needs remax[hub])")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) of a hub id")
    p.add_argument("--cache-dir", default=None, help="hub cache folder (default: the Hugging Face cache)")
    p.add_argument("--device", default="cpu", help="cpu (default), auto, cuda, cuda:1, ...")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1, this machine only; 0.0.0.0 serves the network)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 picks a free one)")
    p.add_argument("--share", action="store_true", help="also ask Gradio for a temporary public link (online)")
    p.add_argument("--examples", default=None, metavar="DIR",
                   help="folder of example images (default: the COCO and synthetic examples shipped with remax)")
    _add_set_option(p, "override post-processing settings, e.g. eval.thing_threshold=0.5 (repeatable)")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from remax._extras import MissingExtraError
    from remax.checkpoint import CheckpointError, first_line

    if not 0 <= args.port <= 65535:
        raise CLIError(f"--port must be between 0 and 65535, got {args.port}")
    try:
        from remax.demo import default_examples, launch_demo, require_gradio

        require_gradio()  # before minutes of model loading
        from remax.hub import resolve_pretrained
        from remax.inference.predictor import Predictor, list_images

        examples = default_examples()
        if args.examples:
            folder = Path(args.examples)
            if not folder.is_dir():
                raise CLIError(f"--examples folder not found: {folder}")
            examples = list_images(folder)
        path = resolve_pretrained(args.checkpoint, revision=args.revision, cache_dir=args.cache_dir)
        predictor = Predictor.from_checkpoint(path, device=args.device, overrides=args.overrides)
    except MissingExtraError as exc:
        raise CLIError(str(exc)) from None
    except CheckpointError as exc:
        raise CLIError(first_line(exc)) from None
    except ValueError as exc:
        raise CLIError(_error_line(exc)) from None

    def ready(url: str) -> None:
        print(f"remax demo: serving {args.checkpoint} on {url} (Ctrl-C to stop)", flush=True)

    try:
        launch_demo(predictor, examples, source=args.checkpoint, host=args.host, port=args.port,
                    share=args.share, on_ready=ready)
    except OSError as exc:  # port taken, address not available
        raise CLIError(f"cannot serve on {args.host}:{args.port}: {_error_line(exc)}") from None
    return 0


# ----------------------------------------------------------------------------------------------------------------
# remax convert-checkpoint
# ----------------------------------------------------------------------------------------------------------------


def _add_convert_checkpoint_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert-checkpoint", help="turn a released kMaX-DeepLab (detectron2) checkpoint into a remax checkpoint",
        description="Reads SRC (a bytedance/kmax-deeplab checkpoint: {'model': state_dict, ...} or a bare "
                    "state_dict; read with weights_only=True), maps every tensor by name onto PRESET and writes "
                    "DST, a remax checkpoint with config and categories for remax predict / eval / train "
                    "--init-from. See docs/models.md, 'Model zoo'.")
    p.add_argument("src", metavar="SRC", help="reference checkpoint (.pth)")
    p.add_argument("dst", metavar="DST", help="remax checkpoint to write (.pt)")
    p.add_argument("--preset", required=True, help="model preset of the checkpoint, e.g. kmax_r50, kmax_convnext_l")
    p.add_argument("--dataset", default=None, choices=["coco", "cityscapes", "ade20k"],
                   help="data set the checkpoint was trained on (categories and class order; default: the "
                        "preset's, e.g. cityscapes for kmax_cityscapes_r50, coco for kmax_r50)")
    p.add_argument("--drop-training-heads", action="store_true",
                   help="drop the auxiliary semantic head (inference-only file); default: keep it for fine-tuning")
    _add_set_option(p, "override a field of the stored config, e.g. model.input_size=[641,641] (repeatable)")
    p.set_defaults(func=_cmd_convert_checkpoint)


def _cmd_convert_checkpoint(args: argparse.Namespace) -> int:
    from remax.checkpoint import CheckpointError, first_line
    from remax.config import PRESET_DATA
    from remax.convert import convert_reference_checkpoint

    try:
        dataset = args.dataset or PRESET_DATA.get(args.preset, "coco")
        summary = convert_reference_checkpoint(args.src, args.dst, args.preset, dataset,
                                               keep_aux_head=not args.drop_training_heads,
                                               overrides=args.overrides)
    except CheckpointError as exc:
        raise CLIError(first_line(exc)) from None
    except (OSError, ValueError) as exc:  # ReferenceConversionError is a ValueError
        raise CLIError(str(exc)) from None
    aux = "kept (void row dropped)" if summary.aux_head else "dropped"
    print(f"converted {args.src} -> {summary.path}: {summary.preset} on {summary.dataset} "
          f"({summary.num_classes} classes), {summary.mapped} tensors mapped, {len(summary.dropped)} dropped, "
          f"auxiliary semantic head {aux}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# remax export
# ----------------------------------------------------------------------------------------------------------------


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export a checkpoint to ONNX, a torch.export program or a model folder",
        description="onnx / torch-export: the eval-form network (no training heads) at the checkpoint's input "
                    "size; input 'images' = the normalised zero-padded B×3×H×W batch, outputs 'pred_logits' and "
                    "'pred_masks'; config, categories and the pre-processing contract are stored in the file, "
                    "and its outputs are checked against the eager network (see docs/deployment.md). folder: "
                    "model.safetensors + config.json + categories.json for Predictor.from_pretrained.")
    p.add_argument("--checkpoint", required=True, help="remax checkpoint (.pt) or model folder")
    p.add_argument("--format", required=True, choices=["onnx", "torch-export", "folder"])
    p.add_argument("--out", required=True, metavar="PATH", help="file (.onnx / .pt2) or folder to write")
    p.add_argument("--dynamic-batch", action="store_true", help="a batch dimension of any size (default: 1)")
    p.add_argument("--no-check", action="store_true", help="skip the parity check against the eager network")
    _add_set_option(p, "override a field of the stored config, e.g. eval.thing_threshold=0.5 (repeatable)")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from remax.checkpoint import CheckpointError, first_line
    from remax.export import ExportError, export_checkpoint

    try:
        with _sigterm_as_interrupt():  # a killed export stops like Ctrl-C: temporary files removed, nothing written
            report = export_checkpoint(args.checkpoint, args.format, args.out, dynamic_batch=args.dynamic_batch,
                                       check=not args.no_check, overrides=args.overrides)
    except CheckpointError as exc:
        raise CLIError(first_line(exc)) from None
    except (ExportError, OSError, ValueError, ImportError) as exc:
        raise CLIError(_error_line(exc)) from None
    size = "×".join(str(v) for v in report.input_size)
    batch = "dynamic batch" if report.dynamic_batch else "batch 1"
    print(f"exported {args.checkpoint} -> {report.path} ({report.format}, input {size}, {batch}, "
          f"{report.seconds:.1f} s)")
    if report.checked:
        print(f"parity vs eager: {report.parity_line()}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# remax bench
# ----------------------------------------------------------------------------------------------------------------


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="latency, throughput and memory under a stated protocol",
                       description="Median / p90 latency, images/s and peak memory of a preset, for the network "
                                   "alone and end to end (resize + normalise + pad + network + upsample + "
                                   "panoptic post-processing from uint8 images), optionally beside a peer model "
                                   "measured in the same process under the same protocol. Weights are random "
                                   "unless --checkpoint is given.")
    p.add_argument("--preset", default="remax_t", help="model preset (default: remax_t)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast precision")
    p.add_argument("--compile", action="store_true", help="torch.compile the networks (first call timed alone)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=None,
                   help="side of the square uint8 input image (default: the preset's input size, e.g. 641)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls after the first call (default 3)")
    p.add_argument("--iters", type=int, default=10, help="timed calls (default 10)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--peer", default=None, choices=["mask2former-r50"],
                   help="also measure this peer (HF transformers, built offline, random weights) and print the "
                        "remax ÷ peer images/s ratio")
    p.add_argument("--train", action="store_true",
                   help="also measure a training step (forward + loss + backward + optimiser step)")
    p.add_argument("--checkpoint", default=None, help="time these trained weights (checkpoint or model folder) "
                                                       "instead of random ones; --preset names the row")
    p.add_argument("--runtime", default=None, choices=["onnxruntime"],
                   help="also export the network to ONNX and time it in ONNX Runtime (CPU) beside eager")
    p.add_argument("--images", default=None, metavar="DIR",
                   help="use the first --batch pictures of DIR, resized to --size, instead of synthetic blocks")
    _add_set_option(p, "override a config field, e.g. eval.stuff_threshold=0.3 (repeatable; stated in the protocol)")
    p.add_argument("--merge-load", default="none", choices=["none", "trained"],
                   help="random weights only: shape the outputs like a trained model's so the end-to-end stage "
                        "includes a realistic merge (see docs/benchmarks.md)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_path", default=None, metavar="FILE", help="also write the result as JSON")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from remax.engine.benchmark import (BenchError, BenchSettings, Protocol, format_protocol, format_result,
                                        run_benchmark)

    settings = BenchSettings(preset=args.preset, device=args.device, precision=args.precision,
                             compile=args.compile, channels_last=args.channels_last, batch=args.batch,
                             size=args.size, warmup=args.warmup, iters=args.iters, threads=args.threads,
                             peer=args.peer, train=args.train, seed=args.seed, checkpoint=args.checkpoint,
                             runtime=args.runtime, images=args.images, merge_load=args.merge_load,
                             overrides=tuple(args.overrides))

    def show_protocol(protocol: Protocol) -> None:
        print(format_protocol(protocol), flush=True)

    try:
        result = run_benchmark(settings, on_protocol=show_protocol)
    except BenchError as exc:
        raise CLIError(str(exc)) from exc
    print()
    print(format_result(result, with_protocol=False))
    if args.json_path:
        try:
            with open(args.json_path, "w", encoding="utf-8") as f:
                json.dump(result.to_dict(), f, indent=2)
        except OSError as exc:
            raise CLIError(f"cannot write {args.json_path}: {exc}") from exc
        print(f"wrote {args.json_path}")
    return 0


# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="remax", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_parser(sub)
    _add_eval_parser(sub)
    _add_predict_parser(sub)
    _add_demo_parser(sub)
    _add_bench_parser(sub)
    _add_convert_checkpoint_parser(sub)
    _add_export_parser(sub)
    _add_data_parser(sub)
    _add_models_parser(sub)
    _add_config_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except CLIError as exc:
        print(f"remax: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("remax: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

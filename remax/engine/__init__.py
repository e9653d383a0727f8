"""Training engine: ``train(cfg, out_dir)`` builds the model, objective and data of a config and runs the loop.

The loop itself (:class:`~remax.engine.trainer.Trainer`) works on any model and criterion; this module wires in
the remax parts: the COCO-panoptic reader with training augmentation, the kMaX-DeepLab model with its training
heads, the kMaX / ReMaX objective, validation PQ and overlay pictures.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import signal
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from remax.config import Config
from remax.engine import distributed as dist_utils
from remax.engine.trainer import NonFiniteLossError, Trainer, TrainingInterrupted, TrainParts, seed_everything
from remax.structures import CategoryInfo, category_mismatch

__all__ = ["train", "build_parts", "check_train_settings", "Trainer", "TrainParts", "NonFiniteLossError",
           "TrainingInterrupted", "save_val_overlays"]

log = logging.getLogger(__name__)


def _validate_data(cfg: Config) -> None:
    """Refuse a broken data set before the first step, with every problem the validator finds.

    Images are decoded in full for small data sets (synthetic, custom); for the large presets only their headers
    are read, which keeps the pre-flight check to seconds on COCO.
    """
    from remax.data.coco_panoptic import paths_from_config
    from remax.data.validate import validate_config_data

    splits = [cfg.data.train_split]
    if cfg.data.val_split != cfg.data.train_split and paths_from_config(cfg.data, cfg.data.val_split).json_file.exists():
        splits.append(cfg.data.val_split)
    validate_config_data(cfg.data, splits, check_images=cfg.data.name in ("synthetic", "custom"))


def build_parts(cfg: Config, progress: bool = True,
                init_categories: Sequence[CategoryInfo] | None = None) -> TrainParts:
    """The real training parts of ``cfg``; ``cfg.model.num_classes`` is set from the data set's categories.

    ``init_categories`` (the categories of a ``--init-from`` checkpoint): when they are the data set's categories,
    in any order, the data set's contiguous ids follow the checkpoint's order so its class heads fit row for row;
    when the sets differ the data set keeps its own order and the class heads start fresh (see
    :func:`~remax.engine.trainer.load_init_weights`), said in one warning line.
    """
    from remax.data.loader import build_dataset, collate_panoptic
    from remax.data.coco_panoptic import paths_from_config
    from remax.losses.criterion import SetCriterion
    from remax.models import ReMaskOptions, build_model
    from remax.preprocessing import normalize_image

    if cfg.data.name == "synthetic":
        from remax.data.synthetic import ensure_synthetic_dataset

        if dist_utils.is_main():
            ensure_synthetic_dataset(cfg.data)
        dist_utils.barrier()
    _validate_data(cfg)
    train_ds = build_dataset(cfg.data, cfg.data.train_split, train=True)
    if init_categories:
        problem = category_mismatch(init_categories, train_ds.categories, "the --init-from checkpoint",
                                    "the training data")
        if problem:
            log.warning("%s: its class heads are not loaded and start fresh", problem)
        else:
            train_ds.set_category_order(init_categories)
    categories = list(train_ds.categories)
    if cfg.model.num_classes != len(categories):
        log.info("model.num_classes set to %d from the data set's categories (was %d)", len(categories),
                 cfg.model.num_classes)
        cfg.model.num_classes = len(categories)
    seed_everything(cfg.train.seed)  # identical initial weights on every rank and every run
    remask = ReMaskOptions.from_config(cfg.remax)
    model = build_model(cfg.model, with_training_heads=True, remask=remask)
    criterion = SetCriterion(cfg.loss, cfg.remax, cfg.model.num_classes)
    forward_kwargs = None
    if remask.stages and remask.use_gt:  # ReMask's ground-truth control needs the labels inside the decoder
        num_classes = cfg.model.num_classes

        def forward_kwargs(targets: list) -> dict[str, Any]:
            return {"remask_gt_semantic": torch.stack([t.semantic_map(num_classes) for t in targets])}

    val_ds = None
    val_paths = paths_from_config(cfg.data, cfg.data.val_split)
    if val_paths.json_file.exists():
        val_ds = build_dataset(cfg.data, cfg.data.val_split, train=False, category_order=categories)
    else:
        log.warning("no validation split at %s: skipping evaluation", val_paths.json_file)

    evaluate = after = None
    if val_ds is not None:
        def evaluate(model: torch.nn.Module, step: int) -> dict[str, Any]:
            from remax.engine.evaluate import evaluate_model

            device = next(model.parameters()).device
            return evaluate_model(model, val_ds, cfg, categories, device, max_images=cfg.train.num_val_images,
                                  progress=progress)

        def after(model: torch.nn.Module, run_dir: Path) -> None:
            save_val_overlays(model, val_ds, cfg, categories, run_dir / "val_overlays")

    return TrainParts(model=model, criterion=criterion, train_dataset=train_ds,
                      collate_fn=functools.partial(collate_panoptic, input_size=tuple(cfg.model.input_size),
                                                    normalize=normalize_image),
                      categories=categories, evaluate=evaluate, after_training=after,
                      forward_kwargs=forward_kwargs)


def save_val_overlays(model: torch.nn.Module, dataset: Any, cfg: Config, categories: list, out_dir: Path,
                      num_images: int = 6) -> list[Path]:
    """Ground truth | prediction pictures of the first validation images (best effort: never fails a run)."""
    try:
        from PIL import Image

        from remax.inference.predictor import Predictor
        from remax.inference.visualize import overlay_panoptic
    except ImportError as exc:
        log.warning("no overlay pictures: %s", exc)
        return []
    written = []
    try:
        device = next(model.parameters()).device
        predictor = Predictor(model, cfg, categories, device=device, semantic=False, instances=False)
        out_dir.mkdir(parents=True, exist_ok=True)
        for i in range(min(num_images, len(dataset))):
            image = dataset.load_image(i)
            result = predictor.predict_tensors([image])[0]
            gt = overlay_panoptic(image, torch.from_numpy(dataset.load_png_ids(i).astype("int64")),
                                  dataset.segments_info(i), categories)
            pred = overlay_panoptic(image, result.id_map, result.segments_info, categories)
            canvas = Image.new("RGB", (gt.width + pred.width + 8, max(gt.height, pred.height)), (255, 255, 255))
            canvas.paste(gt, (0, 0))
            canvas.paste(pred, (gt.width + 8, 0))
            name = Path(str(dataset.records[i]["file_name"])).stem
            path = out_dir / f"{i:02d}_{name}.png"
            canvas.save(path)
            written.append(path)
    except Exception as exc:  # pictures are a convenience; a finished run must not fail on them
        log.warning("could not draw validation overlays: %s: %s", type(exc).__name__, exc)
    finally:
        model.train()
    return written


def check_train_settings(cfg: Config) -> None:
    """Refuse values that would make a run meaningless or destructive, before any work (``ValueError``)."""
    t = cfg.train
    if t.max_steps < 1:
        raise ValueError(f"train.max_steps (--max-steps) must be at least 1, got {t.max_steps}")
    if t.keep_checkpoints < 0:
        raise ValueError(f"train.keep_checkpoints must be 0 (only last.pt) or more, got {t.keep_checkpoints}")
    for name in ("checkpoint_every", "eval_every", "log_every"):
        if getattr(t, name) < 0:
            raise ValueError(f"train.{name} must be 0 (off) or more, got {getattr(t, name)}")
    if t.batch_size < 1:
        raise ValueError(f"train.batch_size must be at least 1, got {t.batch_size}")
    if not t.lr > 0:  # the value as given, not after scaling to the batch size
        raise ValueError(f"train.lr must be positive, got {t.lr}")


@contextlib.contextmanager
def _stop_on_signal() -> Iterator[None]:
    """SIGTERM / SIGINT during set-up (data check, model building) raise :class:`TrainingInterrupted` at once:
    nothing is saved yet, so there is nothing to finish."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise TrainingInterrupted(signal.Signals(signum).name)

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in previous:
        signal.signal(s, stop)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def train(cfg: Config, out_dir: str | Path, resume: bool = False, init_from: str | Path | None = None,
          progress: bool = True, init_partial: bool = False) -> dict[str, Any]:
    """Train ``cfg`` into ``out_dir`` and return a summary (status, step, final evaluation, paths).

    ``resume=True`` continues from ``out_dir/checkpoints/last.pt`` exactly; ``init_from`` loads the weights of
    another checkpoint for fine-tuning. Its categories are matched to the data set's by id: the same set in
    another order renumbers the data set's classes to the checkpoint's order; a different set leaves the class
    heads at their fresh initialisation (as do tensors whose shapes differ). ``init_partial`` accepts a
    checkpoint that leaves most of the model fresh (see :func:`~remax.engine.trainer.load_init_weights`).

    The run folder is locked (``run.lock``) from before the data check until the end, so a second writer is
    refused (:class:`~remax.engine.run_folder.RunFolderError` naming the holder's PID); a folder this call created
    is removed again if the run fails before writing anything. A signal during set-up returns a summary with
    status ``interrupted`` and ``stopped_in="setup"``.
    Under ``torchrun`` every rank calls this; only rank 0 writes.
    """
    cfg = copy.deepcopy(cfg)
    from remax.engine.run_folder import RunLock, remove_orphan_temporaries
    from remax.engine.trainer import resolve_device

    check_train_settings(cfg)
    dist_utils.init_distributed(resolve_device(cfg.train.device).type)
    out_dir = Path(out_dir)
    lock = None
    try:
        if dist_utils.is_main():
            lock = RunLock(out_dir).acquire()
            last = out_dir / "checkpoints" / "last.pt"
            if not resume and last.exists():
                raise FileExistsError(f"{out_dir} already holds a run; use --resume to continue it or choose "
                                      f"another --out")
            if resume and not last.exists():
                raise FileNotFoundError(f"cannot resume: {last} not found")
            remove_orphan_temporaries(out_dir)
        try:
            with _stop_on_signal():
                init_state = init_categories = None
                if init_from:
                    from remax.checkpoint import checkpoint_categories, load_checkpoint

                    # Read once: its categories order the data set, its weights initialise the model.
                    init_state = load_checkpoint(init_from, map_location="cpu")
                    init_categories = checkpoint_categories(init_state) or None
                parts = build_parts(cfg, progress=progress, init_categories=init_categories)
                trainer = Trainer(cfg, out_dir, parts, resume=resume, init_from=init_from, init_state=init_state,
                                  progress=progress, init_partial=init_partial)
                del init_state  # copied into the model; not kept for the whole run
        except TrainingInterrupted as stop:
            log.warning("stopped by %s before training started; nothing was written", stop)
            return {"status": "interrupted", "signal": str(stop), "stopped_in": "setup", "step": 0,
                    "start_step": 0, "run_dir": str(out_dir), "checkpoint": None, "wall_time_s": 0.0,
                    "last_log": {}, "eval": None}
        result = trainer.run()
        return result
    finally:
        if lock is not None:
            lock.release(remove_if_empty=True)
        dist_utils.cleanup()

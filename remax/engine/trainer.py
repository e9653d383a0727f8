"""The training loop: AMP, gradient accumulation, DDP, exact resume, signals and run records.

:class:`Trainer` takes ready-made parts (model, criterion, data set, collate function, evaluation callback), so it
trains any ``nn.Module`` whose criterion returns ``(loss, breakdown)``. :func:`remax.engine.train` builds the real
parts from a :class:`~remax.config.Config`.

Reproducibility: the data stream is seeded per sample position (:mod:`remax.engine.sampling`) and the model's own
randomness (drop path, loss point sampling) is reseeded per micro-batch from ``(seed, global micro-batch index)``.
A resumed run therefore repeats the uninterrupted one exactly, and a run on ``W`` ranks matches a run on one rank
with ``W`` accumulation steps (up to batch-norm statistics; see ``docs`` of the DDP test).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from remax.checkpoint import (CheckpointError, categories_to_state, checkpoint_categories, load_checkpoint,
                              save_checkpoint)
from remax.config import Config
from remax.engine import distributed as dist_utils
from remax.engine.metrics import MetricsWriter, group_loss_terms, plot_curves
from remax.engine.optim import WarmupSchedule, build_optimizer, scaled_lr
from remax.engine.sampling import SeededDataset, StreamSampler, position_seed
from remax.structures import CategoryInfo

log = logging.getLogger(__name__)

Criterion = Callable[[dict[str, Any], list[Any]], tuple[torch.Tensor, dict[str, float]]]
EvalFn = Callable[[nn.Module, int], dict[str, Any]]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the message names the step and the offending terms."""


class TrainingInterrupted(Exception):
    """SIGTERM / SIGINT in a phase that stops at once (set-up, final evaluation, pictures); ``str()`` is the
    signal's name."""


@dataclass
class TrainParts:
    """Everything :class:`Trainer` needs besides the config."""

    model: nn.Module
    criterion: Criterion
    train_dataset: Any
    collate_fn: Callable[[list[Any]], Any]  # -> (images, targets) or {"images": ..., "targets": ...}
    categories: list[CategoryInfo] = field(default_factory=list)
    evaluate: EvalFn | None = None  # (model, step) -> metrics dict, rank 0 only
    # targets -> extra keyword arguments of the model's forward pass (e.g. ReMask's ground-truth control)
    forward_kwargs: Callable[[list[Any]], dict[str, Any]] | None = None
    after_training: Callable[[nn.Module, Path], None] | None = None  # e.g. overlay pictures, rank 0 only


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; under ``torchrun`` every rank takes its ``LOCAL_RANK`` GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("train.device is 'cuda' but no CUDA device is available; use --device cpu")
        if dist_utils.launched_by_torchrun() and name == "cuda":
            return torch.device("cuda", dist_utils.local_rank())
    elif name != "cpu":
        raise ValueError(f"train.device: unknown device {name!r}; choose auto, cpu or cuda")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.manual_seed(seed)


def set_deterministic(enabled: bool) -> None:
    """Deterministic kernels (needed for bitwise resume checks on GPU; CPU kernels are deterministic already)."""
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def rng_state() -> dict[str, Any]:
    """RNG states in a form that loads with ``weights_only=True`` (tensors, ints, tuples)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


CLASS_TENSOR_MARKERS = (".class_head.", "classifier.")  # parameters with one row per class (void last or not)


def _is_class_tensor(key: str) -> bool:
    """Rows indexed by our classes: the decoder's class heads and the semantic classifiers (not a backbone's)."""
    return not key.startswith("backbone.") and any(marker in f".{key}" for marker in CLASS_TENSOR_MARKERS)


INIT_FRESH_LIMIT = 0.5  # above this share of the model's tensors left fresh, --init-from needs --init-partial


def _groups(keys: Sequence[str]) -> str:
    """``backbone (120), transformer_decoder (14)``: the top-level modules the keys belong to, with counts."""
    counts: dict[str, int] = defaultdict(int)
    for k in keys:
        counts[k.split(" ")[0].split(".")[0]] += 1
    return ", ".join(f"{g} ({n})" for g, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def load_init_weights(model: nn.Module, path: str | Path,
                      categories: Sequence[CategoryInfo] | None = None,
                      allow_partial: bool = False, state: dict[str, Any] | None = None) -> dict[str, list[str]]:
    """Load a checkpoint's weights for fine-tuning; tensors whose shape differs (e.g. a class head for another
    number of classes) are skipped and reported, so the new heads keep their fresh initialisation.

    ``categories`` (the training data's, in contiguous order): when the checkpoint stores categories that are not
    exactly these in this order, its per-class rows (class heads, semantic classifiers) would land on the wrong
    classes, so those tensors are skipped too, even when their shapes fit (``train`` aligns the data set's order
    with the checkpoint's first, so this happens only for a different category set).

    When more than :data:`INIT_FRESH_LIMIT` of the model's tensors would keep their fresh initialisation (most
    often a checkpoint of another architecture), a :class:`~remax.checkpoint.CheckpointError` names the groups
    that do not fit, unless ``allow_partial`` (``--init-partial``) says this is intended. ``state`` is the
    checkpoint already read from ``path``, if the caller has it (``train`` reads it first for its categories).
    """
    if state is None:
        state = load_checkpoint(path)
    source = {k.removeprefix("module."): v for k, v in state["model"].items()}
    own = model.state_dict()
    stored = checkpoint_categories(state)
    other_classes = bool(categories) and bool(stored) and \
        [(c.id, bool(c.isthing)) for c in stored] != [(c.id, bool(c.isthing)) for c in categories]
    loadable, mismatched, reinitialised = {}, [], []
    for k, v in source.items():
        if k in own:
            if tuple(own[k].shape) != tuple(v.shape):
                mismatched.append(f"{k} {tuple(v.shape)} -> {tuple(own[k].shape)}")
            elif other_classes and _is_class_tensor(k):
                reinitialised.append(k)
            else:
                loadable[k] = v
    unexpected = sorted(k for k in source if k not in own)
    missing = sorted(k for k in own if k not in source)
    fresh = [*mismatched, *reinitialised, *missing]
    if own and len(fresh) > INIT_FRESH_LIMIT * len(own) and not allow_partial:
        raise CheckpointError(
            f"--init-from {path}: {len(fresh)} of the model's {len(own)} tensors would stay freshly initialised "
            f"({_groups(fresh)}); is it a checkpoint of another model? Pass --init-partial to fine-tune from it "
            f"anyway")
    model.load_state_dict(loadable, strict=False)
    if fresh:
        log.warning("--init-from %s: %d of %d tensors start fresh, by group: %s", path, len(fresh), len(own),
                    _groups(fresh))
    log.info("initialised from %s: %d tensors loaded, %d skipped for shape, %d class tensors left fresh (other "
             "categories), %d missing, %d unused", path, len(loadable), len(mismatched), len(reinitialised),
             len(missing), len(unexpected))
    for item in mismatched:
        log.info("  skipped (shape): %s", item)
    for k in reinitialised:
        log.info("  skipped (other categories): %s", k)
    for k in missing:
        log.debug("  not in checkpoint: %s", k)
    for k in unexpected:
        log.debug("  unused from checkpoint: %s", k)
    return {"loaded": sorted(loadable), "mismatched": mismatched, "reinitialised": sorted(reinitialised),
            "missing": missing, "unexpected": unexpected}


def _to_device(targets: list[Any], device: torch.device) -> list[Any]:
    return [t.to(device) if hasattr(t, "to") else t for t in targets]


def unpack_batch(batch: Any) -> tuple[torch.Tensor, list[Any]]:
    """``(images, targets)`` from a collated batch: a pair, or a dict with ``images`` and ``targets``."""
    if isinstance(batch, dict):
        return batch["images"], batch["targets"]
    images, targets = batch[0], batch[1]
    return images, targets


class Trainer:
    """Runs one training job into ``run_dir`` (see module docstring)."""

    def __init__(self, cfg: Config, run_dir: str | Path, parts: TrainParts, *, resume: bool = False,
                 init_from: str | Path | None = None, init_state: dict[str, Any] | None = None,
                 progress: bool = True, init_partial: bool = False) -> None:
        self.cfg = cfg
        self.t = cfg.train
        self.run_dir = Path(run_dir)
        self.parts = parts
        self.progress = progress
        self.device = resolve_device(self.t.device)
        dist_utils.init_distributed(self.device.type)
        self.rank = dist_utils.rank()
        self.world = dist_utils.world_size()
        self.is_main = self.rank == 0
        set_deterministic(self.t.deterministic)

        accum = max(1, self.t.grad_accum_steps)
        if self.t.batch_size % (self.world * accum):
            raise ValueError(f"train.batch_size={self.t.batch_size} is the global batch and must be divisible by "
                             f"world size × train.grad_accum_steps = {self.world} × {accum}")
        self.accum = accum
        self.micro_batch = self.t.batch_size // (self.world * accum)
        self.amp_dtype = self._amp_dtype()

        self.model = parts.model
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules())
        # torch's SyncBatchNorm refuses CPU tensors, so gloo runs on the CPU keep per-rank batch statistics.
        self.sync_bn = self.world > 1 and self.t.sync_bn and has_bn and self.device.type == "cuda"
        if self.world > 1 and self.t.sync_bn and has_bn and not self.sync_bn:
            log.warning("train.sync_bn: SyncBatchNorm needs CUDA; on %s every rank normalises with the statistics "
                        "of its own %d images", self.device.type, self.micro_batch)
        if has_bn and self.micro_batch < 2 and not self.sync_bn:
            raise ValueError(f"train.batch_size={self.t.batch_size} gives {self.micro_batch} image per forward pass "
                             f"({self.world} ranks × {accum} accumulation steps); batch norm needs at least 2. "
                             "Raise train.batch_size, lower train.grad_accum_steps, or use train.sync_bn under DDP "
                             "on GPUs")
        if init_from:
            load_init_weights(self.model, init_from, categories=parts.categories, allow_partial=init_partial,
                              state=init_state)
        self.model.to(self.device)
        if self.sync_bn:
            self.model = dist_utils.to_sync_batchnorm(self.model)
        self.optimizer = build_optimizer(self.model, self.t)
        self.schedule = WarmupSchedule(self.optimizer, self.t)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.step = 0
        self.ckpt_dir = self.run_dir / "checkpoints"
        if resume:
            self._resume()
        self.ddp_model: nn.Module = self.model
        if self.world > 1:
            self.ddp_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=False, broadcast_buffers=True)
        self._stop_signal: str | None = None
        self._stop_now = False  # True after the final checkpoint: a signal then raises TrainingInterrupted

    # ---------------------------------------------------------------------------------------------- setup

    def _amp_dtype(self) -> torch.dtype | None:
        amp = self.t.amp
        if amp == "none":
            return None
        if amp == "bf16":
            return torch.bfloat16
        if amp == "fp16":
            if self.device.type != "cuda":
                raise ValueError("train.amp=fp16 needs a GPU (it relies on a gradient scaler); use bf16 on the CPU")
            return torch.float16
        raise ValueError(f"train.amp: unknown value {amp!r}; choose none, bf16 or fp16")

    def _resume(self) -> None:
        path = self.ckpt_dir / "last.pt"
        state = load_checkpoint(path, map_location="cpu")
        try:
            self.model.load_state_dict({k.removeprefix("module."): v for k, v in state["model"].items()})
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()
            detail = next((ln.strip() for ln in first[1:] if ln.strip()), first[0] if first else type(exc).__name__)
            raise CheckpointError(f"cannot resume from {path}: the model of this config differs from the "
                                  f"checkpoint's ({detail}); resume without changing model.* settings") from None
        self.schedule.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        if state.get("rng"):
            set_rng_state(state["rng"])
        data = state.get("data", {})
        if data.get("global_batch", self.t.batch_size) != self.t.batch_size:
            log.warning("resuming with global batch %d instead of %d: the data stream will differ from the "
                        "uninterrupted run", self.t.batch_size, data.get("global_batch"))
        log.info("resumed from %s at step %d", path, self.step)

    def _loader(self) -> DataLoader:
        sampler = StreamSampler(len(self.parts.train_dataset), self.micro_batch, self.accum, self.world, self.rank,
                                seed=self.t.seed, shuffle=True, start_step=self.step)
        workers = self.cfg.data.num_workers
        return DataLoader(SeededDataset(self.parts.train_dataset, self.t.seed), batch_size=self.micro_batch,
                          sampler=sampler, collate_fn=self.parts.collate_fn, num_workers=workers,
                          pin_memory=self.device.type == "cuda", persistent_workers=False,
                          prefetch_factor=2 if workers > 0 else None)

    # ---------------------------------------------------------------------------------------------- checkpoints

    @property
    def unwrapped(self) -> nn.Module:
        return self.model

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.unwrapped.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "step": self.step,
            "rng": rng_state(),
            "data": {"position": self.step * self.t.batch_size, "global_batch": self.t.batch_size,
                     "seed": self.t.seed},
            "world_size": self.world,
            "config": self.cfg.to_dict(),
            "categories": categories_to_state(self.parts.categories),
        }

    def save(self, periodic: bool = False) -> Path | None:
        """Write ``checkpoints/last.pt`` (and ``step_XXXXXX.pt`` when periodic); rank 0 only."""
        if not self.is_main:
            return None
        state = self.state_dict()
        last = save_checkpoint(self.ckpt_dir / "last.pt", state)
        if periodic and self.t.keep_checkpoints > 0:
            save_checkpoint(self.ckpt_dir / f"step_{self.step:06d}.pt", state)
            old = sorted(self.ckpt_dir.glob("step_*.pt"))[: -self.t.keep_checkpoints]
            for p in old:
                p.unlink(missing_ok=True)
        log.debug("checkpoint written at step %d", self.step)
        return last

    # ---------------------------------------------------------------------------------------------- signals

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self._stop_signal is not None and signum == signal.SIGINT and not self._stop_now:
            raise KeyboardInterrupt  # second Ctrl-C: stop at once
        self._stop_signal = name
        if self._stop_now:
            raise TrainingInterrupted(name)
        log.warning("%s received: saving a checkpoint at the end of this step, then stopping", name)

    @contextlib.contextmanager
    def _signal_handlers(self):
        """SIGTERM / SIGINT for the whole run. In the step loop and while a checkpoint is written a signal is only
        noted (the loop saves and stops after the step); in the later phases (final evaluation, pictures,
        curves) it raises :class:`TrainingInterrupted` at once, since the checkpoint is already safe."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in previous:
            signal.signal(s, self._on_signal)
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    # ---------------------------------------------------------------------------------------------- loop

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _micro_step(self, images: torch.Tensor, targets: list[Any], micro: int) -> dict[str, float]:
        # The model's randomness depends only on the global micro-batch index (exact resume, world-size invariance).
        index = (self.step * self.accum + micro) * self.world + self.rank
        torch.manual_seed(position_seed(self.t.seed, index, stream=2))
        sync = self.world > 1 and micro < self.accum - 1
        ctx = self.ddp_model.no_sync() if sync else contextlib.nullcontext()
        with ctx:
            kwargs = self.parts.forward_kwargs(targets) if self.parts.forward_kwargs else {}
            with self._autocast():
                outputs = self.ddp_model(images, **kwargs)
            loss, breakdown = self.parts.criterion(outputs, targets)
            bad = not bool(torch.isfinite(loss.detach()).all())
            if dist_utils.any_rank(bad, self.device):
                terms = {k: v for k, v in breakdown.items() if not math.isfinite(float(v))}
                where = f"rank {self.rank}, " if self.world > 1 else ""
                raise NonFiniteLossError(
                    f"training loss is {float(loss.detach())} at step {self.step + 1} ({where}micro-batch {micro}); "
                    f"non-finite terms: {terms or 'none on this rank'}. Lower train.lr, check the data, or try "
                    f"train.grad_clip / train.amp=none.")
            self.scaler.scale(loss / self.accum).backward()
        out = {"loss": float(loss.detach())}
        out.update({f"loss/{k}": float(v) for k, v in breakdown.items()})
        return out

    def _optimizer_step(self) -> float | None:
        grad_norm = None
        if self.t.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.t.grad_clip))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        self.step += 1
        return grad_norm

    def _evaluate(self, writer: MetricsWriter | None) -> dict[str, Any] | None:
        if self.parts.evaluate is None:
            return None
        result = None
        if self.is_main:
            was_training = self.model.training
            self.model.eval()
            try:
                result = self.parts.evaluate(self.model, self.step)
            finally:
                self.model.train(was_training)
            if writer is not None and result:
                writer.write({"kind": "eval", "step": self.step, **_flat_eval(result)})
        dist_utils.barrier()
        return result

    def run(self) -> dict[str, Any]:
        """Train to ``train.max_steps`` (or until a signal); return a summary dict.

        ``status`` is ``completed`` or ``interrupted`` (stopped in the loop, checkpoint saved); ``stopped_in``
        names a later phase a signal cut short (``evaluation``, ``pictures``, ``curves``), whose results are then
        missing although the checkpoint is complete.
        """
        t = self.t
        start_step = self.step
        writer = None
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(self.cfg.to_yaml())
            # Rows after the checkpoint's step (or any row, on a fresh start into a folder whose earlier run never
            # saved a checkpoint) would be repeated by this run; a finished run's final evaluation is redone.
            writer = MetricsWriter(self.run_dir, tensorboard=t.tensorboard, resume_step=start_step,
                                   drop_eval_at=start_step if start_step >= t.max_steps else None)
            log.info("training %s for %d steps (from %d) on %s x%d: global batch %d = %d ranks x %d accum x %d "
                     "images, peak lr %.3g, run folder %s", self.cfg.preset, t.max_steps, start_step,
                     self.device, self.world, t.batch_size, self.world, self.accum, self.micro_batch,
                     scaled_lr(t), self.run_dir)
        from tqdm.auto import tqdm

        t_start = time.perf_counter()
        last_log: dict[str, float] = {}
        eval_result: dict[str, Any] | None = None
        status = "completed"
        stopped_in: str | None = None
        with self._signal_handlers():
            bar = tqdm(total=t.max_steps, initial=start_step, unit="step", dynamic_ncols=True,
                       disable=not (self.progress and self.is_main), desc="train")
            loader = self._loader()
            data_iter = iter(loader)
            window: dict[str, float] = defaultdict(float)
            window_n = 0
            window_images = 0
            window_t0 = time.perf_counter()
            self.model.train()
            try:
                while self.step < t.max_steps:
                    if dist_utils.any_rank(self._stop_signal is not None, self.device):
                        status = "interrupted"
                        break
                    for micro in range(self.accum):
                        images, targets = unpack_batch(next(data_iter))
                        images = images.to(self.device, non_blocking=True)
                        targets = _to_device(targets, self.device)
                        for k, v in self._micro_step(images, targets, micro).items():
                            window[k] += v
                        window_n += 1
                        window_images += images.shape[0]
                    self._optimizer_step()
                    done = self.step >= t.max_steps
                    if self.step % max(1, t.log_every) == 0 or done:
                        now = time.perf_counter()
                        means = {k: v / window_n for k, v in window.items()}
                        means = dist_utils.all_reduce_mean(means, self.device)
                        ips = window_images * self.world / max(now - window_t0, 1e-9)
                        last_log = {"kind": "train", "step": self.step, "lr": self.optimizer.param_groups[-1]["lr"],
                                    "images_per_s": ips, **means}
                        if writer is not None:
                            writer.write(last_log)
                        bar.set_postfix(loss=f"{means['loss']:.3f}", lr=f"{last_log['lr']:.2e}",
                                        img_s=f"{ips:.1f}", refresh=False)
                        if self.is_main and (not bar.disable and self.step % (10 * max(1, t.log_every)) == 0
                                             or bar.disable or done):
                            terms = ", ".join(f"{k} {v:.3f}" for k, v in group_loss_terms(means).items())
                            log.info("step %d/%d loss %.4f lr %.3g %.1f img/s | %s", self.step, t.max_steps,
                                     means["loss"], last_log["lr"], ips, terms)
                        window.clear()
                        window_n = window_images = 0
                        window_t0 = time.perf_counter()
                    bar.update(1)
                    if t.checkpoint_every > 0 and self.step % t.checkpoint_every == 0 and not done:
                        self.save(periodic=True)
                    if t.eval_every > 0 and self.step % t.eval_every == 0 and not done:
                        self._evaluate(writer)
            finally:
                bar.close()
                del data_iter

            # A signal during this save is noted, as in the loop; the save completes first.
            self.save(periodic=status == "completed" and t.keep_checkpoints > 0 and self.step > start_step)
            if status == "interrupted":
                log.warning("stopped by %s at step %d; checkpoint %s (continue with --resume)", self._stop_signal,
                            self.step, self.ckpt_dir / "last.pt")
            # From here on the checkpoint is safe: a signal stops the current phase at once.
            self._stop_now = True
            phase = "evaluation"
            try:
                if self._stop_signal is not None and status == "completed":
                    raise TrainingInterrupted(self._stop_signal)
                if status == "completed":
                    eval_result = self._evaluate(writer)
                    phase = "pictures"
                    if self.is_main and self.parts.after_training is not None:
                        self.model.eval()
                        self.parts.after_training(self.model, self.run_dir)
                phase = "curves"
                if self.is_main:
                    try:
                        plot_curves(self.run_dir)
                    except TrainingInterrupted:
                        raise
                    except Exception as exc:  # plotting must never lose a finished run
                        log.warning("could not draw the curves: %s", exc)
            except TrainingInterrupted as stop:
                stopped_in = phase
                log.warning("stopped by %s during the final %s; checkpoint %s at step %d is complete%s", stop,
                            phase, self.ckpt_dir / "last.pt", self.step,
                            " (evaluate it with remax eval --checkpoint)" if phase == "evaluation" else "")
            finally:
                if writer is not None:
                    writer.close()
        dist_utils.barrier()
        return {
            "status": status,
            "signal": self._stop_signal,
            "stopped_in": stopped_in,
            "step": self.step,
            "start_step": start_step,
            "run_dir": str(self.run_dir),
            "checkpoint": str(self.ckpt_dir / "last.pt"),
            "wall_time_s": time.perf_counter() - t_start,
            "last_log": last_log,
            "eval": eval_result,
        }


def _flat_eval(result: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of an evaluation result for ``metrics.jsonl``, in percent."""
    flat: dict[str, Any] = {}
    pq = result.get("pq") or {}
    for part, prefix in (("All", "pq"), ("Things", "pq_things"), ("Stuff", "pq_stuff")):
        if part in pq:
            flat[prefix] = 100.0 * float(pq[part]["pq"])
            if part == "All":
                flat["sq"] = 100.0 * float(pq[part]["sq"])
                flat["rq"] = 100.0 * float(pq[part]["rq"])
    miou = result.get("miou")
    if isinstance(miou, dict):
        miou = miou.get("miou", miou.get("mIoU"))
    if isinstance(miou, (int, float)):
        flat["miou"] = 100.0 * float(miou) if miou <= 1.0 else float(miou)
    ap = result.get("ap")
    if isinstance(ap, dict):
        ap = ap.get("AP", ap.get("ap"))
    if isinstance(ap, (int, float)):
        flat["ap"] = 100.0 * float(ap) if ap <= 1.0 else float(ap)
    return flat

"""``remax bench``: latency, throughput and memory of a model under a stated protocol (SPEC §8).

Speed figures for segmentation models are hard to compare because the protocol is rarely stated. Every result of
this module therefore carries its :class:`Protocol` (device, torch version, threads, precision, compilation, memory
format, input size, batch, what the timed region includes and how memory is measured), and a peer model
(HF transformers Mask2Former-R50) can be measured under the same protocol in the same process.

Measured stages, each with a median / p90 latency over ``iters`` timed calls after ``warmup`` untimed calls:

* ``model``: the network alone on a normalised, padded float batch (no resize, no post-processing);
* ``end_to_end``: from ``batch`` uint8 RGB images of the stated size to panoptic id maps: resize, normalise, pad,
  network, upsample, un-pad and the panoptic post-processing (remax: :class:`remax.inference.predictor.Predictor`;
  peer: its image processor and ``post_process_panoptic_segmentation``);
* ``train_step`` (``train=True``): forward with training heads, the full ReMaX loss, backward and an optimiser step.

The first call of every stage is timed on its own (``first_call_s``): with ``compile=True`` it is the compilation.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import logging
import math
import os
import platform
import re
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

log = logging.getLogger(__name__)

PEERS = ("mask2former-r50",)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
STAGES = ("model", "end_to_end", "train_step")
TRAIN_MIN_BATCH = 2
# COCO panoptic: the first 80 contiguous classes are things, the other 53 stuff.
_COCO_THINGS = 80
_TRANSFORMERS_HINT = "pip install transformers"


class BenchError(RuntimeError):
    """A benchmark that cannot run as asked (bad option, missing device or package)."""


@dataclass
class BenchSettings:
    """What to measure and how; mirrors the ``remax bench`` flags."""

    preset: str = "remax_t"
    device: str = "cpu"  # cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast)
    compile: bool = False  # torch.compile the networks (remax and peer)
    channels_last: bool = False
    batch: int = 1
    size: int | None = None  # square uint8 image side; None = the preset's input size
    warmup: int = 3
    iters: int = 10
    threads: int | None = None  # torch.set_num_threads; None = leave as is
    peer: str | None = None  # "mask2former-r50"
    train: bool = False
    seed: int = 0
    checkpoint: str | None = None  # real weights (a remax checkpoint or model folder) instead of random ones
    runtime: str | None = None  # "onnxruntime": also measure the exported network in ONNX Runtime
    images: str | None = None  # a folder of pictures to use (resized to size×size) instead of synthetic blocks
    merge_load: str = "none"  # "trained": random-weight outputs shaped like a trained model's (see below)
    overrides: tuple[str, ...] = ()  # config assignments, e.g. ("eval.stuff_threshold=0.3",)


RUNTIMES = ("onnxruntime",)
MERGE_LOADS = ("none", "trained")
# "trained" merge load (random weights only), so that the end-to-end stage does the post-processing work of a
# trained model on a COCO photo: as many confident queries as the first COCO sample photo has ground-truth segments
# (18; the second has 32), and mask logits with the spread measured on the trained nano fixture over the synthetic
# validation images (std 1.16; docs/benchmarks.md).
TRAINED_CONFIDENT_QUERIES = 18
TRAINED_MASK_LOGIT_STD = 1.2


@dataclass
class Protocol:
    """Everything a reader needs to reproduce or compare a figure."""

    device: str  # "cpu" or "cuda"
    device_name: str
    torch_version: str
    python_version: str
    threads: int
    precision: str
    compile: bool
    channels_last: bool
    image_size: tuple[int, int]  # the uint8 image given to the end-to-end path (H, W)
    model_input_size: tuple[int, int]  # remax network input after padding (k*32+1)
    batch: int
    warmup: int
    iters: int
    model_stage: str  # what the "model" stage includes
    end_to_end_stage: str  # what the "end_to_end" stage includes
    memory_method: str
    date: str
    weights: str = "random initialisation (speed does not depend on the weight values)"
    images: str = "synthetic blocks of colour"
    merge_load: str = "none"


@dataclass
class Measurement:
    """Latencies (ms) of one stage of one subject, with its memory peak."""

    subject: str  # preset name or peer name
    stage: str  # model | end_to_end | train_step
    batch: int
    latencies_ms: list[float]
    first_call_s: float  # the untimed-by-default first call; with compile, the compilation
    peak_memory_mb: float  # peak above the level just before the stage (activations, workspace, caches)
    peak_memory_total_mb: float  # absolute peak (CUDA: allocated by torch; CPU: process RSS)
    compiled: bool = False
    segments_per_image: float | None = None  # end to end: kept panoptic segments (random weights keep few)
    runtime: str = "eager"  # eager | onnxruntime

    @property
    def median_ms(self) -> float:
        return float(statistics.median(self.latencies_ms))

    @property
    def p90_ms(self) -> float:
        return percentile(self.latencies_ms, 90.0)

    @property
    def images_per_s(self) -> float:
        return self.batch / (self.median_ms / 1000.0)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(median_ms=self.median_ms, p90_ms=self.p90_ms, images_per_s=self.images_per_s)
        return out


@dataclass
class BenchResult:
    """The protocol, one :class:`Measurement` per subject and stage, and remax ÷ peer throughput ratios."""

    protocol: Protocol
    preset: str
    measurements: list[Measurement] = field(default_factory=list)
    peer: str | None = None
    ratios: dict[str, float] = field(default_factory=dict)  # stage -> remax images/s ÷ peer images/s
    runtime_ratios: dict[str, float] = field(default_factory=dict)  # stage -> ONNX Runtime ÷ eager images/s
    params_m: dict[str, float] = field(default_factory=dict)  # subject -> parameters (millions), inference nets

    def get(self, subject: str, stage: str) -> Measurement | None:
        for m in self.measurements:
            if m.subject == subject and m.stage == stage:
                return m
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": asdict(self.protocol),
            "preset": self.preset,
            "peer": self.peer,
            "params_m": dict(self.params_m),
            "measurements": [m.to_dict() for m in self.measurements],
            "ratios": dict(self.ratios),
            "runtime_ratios": dict(self.runtime_ratios),
        }


# ----------------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), so p90 >= median for any sample."""
    if not values:
        raise ValueError("percentile of an empty list")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))


def model_input_side(size: int) -> int:
    """The smallest ``k*32 + 1 >= size``: kMaX-DeepLab inputs have odd sides so strided features align."""
    if size < 33:
        raise BenchError(f"--size {size} is too small; use at least 33")
    return int(math.ceil((size - 1) / 32) * 32 + 1)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} logical CPUs, {platform.machine()})"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            match = re.search(rf"^{key}:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
        return int(match.group(1)) if match else None
    except OSError:
        return None


def _release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc), so a stage's RSS baseline is not inflated by the previous one."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class MemoryProbe:
    """Peak memory of a region: CUDA allocator peak on GPU, process peak RSS on CPU.

    On Linux the RSS high-water mark (``VmHWM``) is reset by writing ``5`` to ``/proc/self/clear_refs``, so each
    stage gets its own peak. Where that is impossible the probe falls back to the growth of ``ru_maxrss``, a lower
    bound (it only moves when the process reaches a new all-time peak).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.can_reset_rss = self._try_reset_rss()
        self._base = 0.0
        self._base_maxrss = 0.0

    @staticmethod
    def _try_reset_rss() -> bool:
        if _proc_status_kb("VmHWM") is None:
            return False
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")
            return True
        except OSError:
            return False

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return ("CUDA: torch.cuda.max_memory_allocated (peak over the stage, after reset_peak_memory_stats); "
                    "delta = peak minus memory_allocated before the stage")
        if self.can_reset_rss:
            return ("CPU: process peak RSS (VmHWM, reset through /proc/self/clear_refs before each stage); "
                    "delta = peak minus RSS before the stage (after gc + malloc_trim)")
        return "CPU: growth of ru_maxrss over the stage (a lower bound: it moves only at a new process peak)"

    @staticmethod
    def _maxrss_mb() -> float:
        scale = 1.0 if sys.platform == "darwin" else 1024.0  # bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device) / 2**20
            return
        _release_freed_memory()
        if self.can_reset_rss:
            self._try_reset_rss()
            self._base = (_proc_status_kb("VmRSS") or 0) / 1024
        else:
            self._base_maxrss = self._maxrss_mb()

    def stop(self) -> tuple[float, float]:
        """``(delta_mb, total_mb)`` since :meth:`start`."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            total = torch.cuda.max_memory_allocated(self.device) / 2**20
            return max(total - self._base, 0.0), total
        if self.can_reset_rss:
            total = (_proc_status_kb("VmHWM") or 0) / 1024
            return max(total - self._base, 0.0), total
        total = self._maxrss_mb()
        return max(total - self._base_maxrss, 0.0), total


def time_stage(fn: Callable[[], Any], *, subject: str, stage: str, batch: int, warmup: int, iters: int,
               device: torch.device, compiled: bool = False,
               count_segments: Callable[[Any], float] | None = None, runtime: str = "eager") -> Measurement:
    """Time ``fn``: one first call (timed alone), ``warmup`` untimed calls, then ``iters`` timed calls.

    CUDA is synchronised before and after every timed call, so a latency covers all queued kernels. The memory
    peak covers the warm-up and timed calls.
    """
    if iters < 1:
        raise BenchError(f"--iters must be at least 1, got {iters}")
    if warmup < 0:
        raise BenchError(f"--warmup must be >= 0, got {warmup}")
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    first = time.perf_counter() - t0
    segments = count_segments(out) if count_segments is not None else None
    del out
    # The probe starts after the first call so that compilation (Python objects, autotuning) is not counted.
    probe = MemoryProbe(device)
    probe.start()
    for _ in range(warmup):
        fn()
    latencies = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        latencies.append((time.perf_counter() - t0) * 1000.0)
    delta, total = probe.stop()
    m = Measurement(subject=subject, stage=stage, batch=batch, latencies_ms=latencies, first_call_s=first,
                    peak_memory_mb=delta, peak_memory_total_mb=total, compiled=compiled,
                    segments_per_image=segments, runtime=runtime)
    log.info("%s %s: median %.2f ms, p90 %.2f ms, %.2f images/s, peak +%.0f MiB (first call %.2f s)", subject,
             stage, m.median_ms, m.p90_ms, m.images_per_s, m.peak_memory_mb, m.first_call_s)
    return m


def synthetic_images(batch: int, size: int, seed: int) -> list[torch.Tensor]:
    """``batch`` uint8 ``H×W×3`` RGB images with blocky structure (the content does not change the work done)."""
    g = torch.Generator().manual_seed(seed)
    cells = max(size // 32, 1)
    images = []
    for _ in range(batch):
        coarse = torch.randint(0, 256, (3, cells, cells), generator=g, dtype=torch.uint8).float()
        img = nn.functional.interpolate(coarse[None], size=(size, size), mode="nearest")[0]
        img = (img + torch.randint(-8, 9, img.shape, generator=g)).clamp(0, 255).to(torch.uint8)
        images.append(img.permute(1, 2, 0).contiguous())
    return images


def _maybe_compile(model: nn.Module, enabled: bool) -> nn.Module:
    return torch.compile(model) if enabled else model


def _count_params_m(model: nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def _is_thing_mask(num_classes: int) -> torch.Tensor:
    """COCO's split for 133 classes, otherwise the first half are things (only post-processing cost depends on it)."""
    things = _COCO_THINGS if num_classes == 133 else (num_classes + 1) // 2
    return torch.arange(num_classes) < things


# ----------------------------------------------------------------------------------------------------------------
# remax
# ----------------------------------------------------------------------------------------------------------------


def random_panoptic_targets(batch: int, size: tuple[int, int], num_classes: int, seed: int) -> list[Any]:
    """Valid random ground truth: a grid of rectangular segments, things and stuff, a void border strip."""
    from remax.structures import PanopticTarget

    g = torch.Generator().manual_seed(seed)
    height, width = size
    is_thing_cls = _is_thing_mask(num_classes)
    targets = []
    for _ in range(batch):
        rows, cols = 3, 4
        id_map = torch.zeros(height, width, dtype=torch.int64)
        ys = torch.linspace(0, height, rows + 1).long()
        xs = torch.linspace(0, width, cols + 1).long()
        classes = torch.randint(0, num_classes, (rows * cols,), generator=g)
        for r in range(rows):
            for c in range(cols):
                id_map[ys[r]:ys[r + 1], xs[c]:xs[c + 1]] = r * cols + c + 1
        id_map[-max(height // 32, 1):, :] = 0  # void strip, as padding would be
        targets.append(PanopticTarget(id_map=id_map, classes=classes, is_thing=is_thing_cls[classes],
                                      is_crowd=torch.zeros(rows * cols, dtype=torch.bool)))
    return targets


def _build_remax(preset: str, input_side: int, with_training_heads: bool) -> tuple[nn.Module, Any]:
    from remax.config import get_config
    from remax.models import ReMaskOptions, build_model

    cfg = get_config(preset)
    cfg.model.input_size = (input_side, input_side)
    remask = ReMaskOptions.from_config(cfg.remax) if with_training_heads else None  # as `remax train` builds it
    model = build_model(preset, with_training_heads=with_training_heads, input_size=(input_side, input_side),
                        num_classes=cfg.model.num_classes, remask=remask)
    return model, cfg


def _coco_like_categories(num_classes: int) -> list[Any]:
    from remax.structures import CategoryInfo

    is_thing = _is_thing_mask(num_classes)
    return [CategoryInfo(id=i + 1, name=f"class_{i}", isthing=bool(is_thing[i])) for i in range(num_classes)]


def _load_subject(s: BenchSettings, input_side: int) -> tuple[nn.Module, Any, list[Any]]:
    """The inference network, config and categories: from ``s.checkpoint`` (real weights) or the preset."""
    if s.checkpoint is None:
        model, cfg = _build_remax(s.preset, input_side, with_training_heads=False)
        try:
            cfg = cfg.override(list(s.overrides))
        except ValueError as exc:
            raise BenchError(str(exc)) from None
        return model, cfg, _coco_like_categories(cfg.model.num_classes)
    from remax.checkpoint import CheckpointError, first_line
    from remax.export import ExportError, load_for_export

    try:
        # Convolutional weights run at any input size; the benchmark's size replaces the checkpoint's.
        return load_for_export(s.checkpoint, [f"model.input_size=[{input_side},{input_side}]", *s.overrides])
    except (CheckpointError, ExportError, ValueError) as exc:
        raise BenchError(first_line(exc)) from None


def bench_images(s: BenchSettings, image_size: int) -> list[torch.Tensor]:
    """``s.batch`` uint8 ``H×W×3`` images: the first pictures of ``s.images`` resized (PIL bilinear) to the
    stated size, or synthetic blocks of colour."""
    if s.images is None:
        return synthetic_images(s.batch, image_size, s.seed)
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from remax.inference.predictor import list_images, load_image

    folder = Path(s.images)
    if not folder.is_dir():
        raise BenchError(f"--images {folder}: not a folder")
    files = list_images(folder)
    if not files:
        raise BenchError(f"--images {folder}: no files")
    out = []
    for i in range(s.batch):
        img = load_image(files[i % len(files)]).permute(1, 2, 0).numpy()
        pic = Image.fromarray(img).resize((image_size, image_size), Image.BILINEAR)
        out.append(torch.from_numpy(np.asarray(pic).copy()))
    return out


class TrainedShapeOutputs(nn.Module):
    """Random-weight outputs reshaped so post-processing works as hard as after training (``merge_load="trained"``).

    Random class heads are unsure of every class, so no query passes the thresholds and the merge does nothing.
    Here ``TRAINED_CONFIDENT_QUERIES`` queries get a confident class (things and stuff alternately), the mask
    logits are rescaled to ``TRAINED_MASK_LOGIT_STD`` and each confident query is raised by 4 on its own tile of
    a grid, so that it owns a region as a trained query does and the merge pastes that many segments. The
    network itself is unchanged and still timed in full.
    """

    def __init__(self, model: nn.Module, is_thing: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        things = is_thing.nonzero().squeeze(1)
        stuff = (~is_thing).nonzero().squeeze(1)
        pool = [int(things[i // 2 % max(len(things), 1)]) if i % 2 == 0 or len(stuff) == 0
                else int(stuff[i // 2 % len(stuff)]) for i in range(TRAINED_CONFIDENT_QUERIES)]
        self.register_buffer("classes", torch.tensor(pool, dtype=torch.int64), persistent=False)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = dict(self.model(images))
        logits = out["pred_logits"].clone()
        k = min(len(self.classes), logits.shape[1])
        logits[:, :k] = -10.0
        logits[:, torch.arange(k), self.classes[:k]] = 10.0
        masks = out["pred_masks"]
        std = masks.float().std().clamp(min=1e-6)
        masks = masks * (TRAINED_MASK_LOGIT_STD / std).to(masks.dtype)
        h, w = masks.shape[-2:]
        cols = max(1, math.ceil(math.sqrt(k * w / max(h, 1))))
        rows = max(1, math.ceil(k / cols))
        for i in range(k):
            r, c = divmod(i, cols)
            masks[:, i, r * h // rows:(r + 1) * h // rows, c * w // cols:(c + 1) * w // cols] += 4.0
        out["pred_logits"] = logits
        out["pred_masks"] = masks
        return out


def _segments_per_image(predictions: Any) -> float:
    """Panoptic segments kept per image by the remax Predictor (eager or an exported runtime)."""
    return sum(len(p.segments_info) for p in predictions) / max(len(predictions), 1)


def _bench_remax(s: BenchSettings, device: torch.device, image_size: int, input_side: int,
                 result: BenchResult) -> None:
    from remax.inference.predictor import Predictor
    from remax.preprocessing import preprocess

    model, cfg, categories = _load_subject(s, input_side)
    model = model.to(device).eval()
    if s.channels_last:
        model = model.to(memory_format=torch.channels_last)
    result.params_m[s.preset] = _count_params_m(model)
    net = _maybe_compile(model, s.compile)
    if s.merge_load == "trained":
        net = TrainedShapeOutputs(net, torch.tensor([c.isthing for c in categories])).to(device)

    chw = [img.permute(2, 0, 1).contiguous() for img in bench_images(s, image_size)]
    with torch.inference_mode():  # an inference tensor, as the Predictor makes: no recompile under --compile
        x, _ = preprocess(chw, (input_side, input_side))
        x = x.to(device)
        if s.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)

    def model_only() -> Any:
        with torch.inference_mode(), _autocast(device, s.precision):
            return net(x)

    result.measurements.append(time_stage(model_only, subject=s.preset, stage="model", batch=s.batch,
                                          warmup=s.warmup, iters=s.iters, device=device, compiled=s.compile))

    # Panoptic output only, as the peer's post_process_panoptic_segmentation gives.
    predictor = Predictor(net, cfg, categories, device=device, semantic=False, instances=False)

    def end_to_end() -> Any:
        with _autocast(device, s.precision):
            return predictor.predict_tensors(chw)

    result.measurements.append(time_stage(end_to_end, subject=s.preset, stage="end_to_end", batch=s.batch,
                                          warmup=s.warmup, iters=s.iters, device=device, compiled=s.compile,
                                          count_segments=_segments_per_image))
    del predictor, net
    _release_freed_memory()
    if s.runtime == "onnxruntime":
        _bench_onnxruntime(s, model, cfg, categories, chw, x, result)
    del model, x
    _release_freed_memory()

    if s.train:
        result.measurements.append(_bench_remax_train(s, device, input_side))


def _bench_onnxruntime(s: BenchSettings, model: nn.Module, cfg: Any, categories: list[Any],
                       chw: list[torch.Tensor], x: torch.Tensor, result: BenchResult) -> None:
    """The same network exported to ONNX (remax.export, parity-checked) and run by ONNX Runtime on the CPU."""
    import tempfile
    from pathlib import Path

    from remax.export import ExportError, export_onnx
    from remax.inference.predictor import Predictor
    from remax.inference.runtime import OnnxRuntimeModel

    subject = f"{s.preset}[onnxruntime]"
    with tempfile.TemporaryDirectory(prefix="remax-bench-") as tmp:
        path = Path(tmp) / "model.onnx"
        try:
            report = export_onnx(model.cpu(), cfg, categories, path, dynamic_batch=s.batch > 1, check=True,
                                 source=s.checkpoint or "random weights")
        except (ExportError, ImportError) as exc:
            raise BenchError(str(exc)) from None
        log.info("exported to ONNX in %.1f s (parity %s)", report.seconds, report.max_abs_diff)
        runtime = OnnxRuntimeModel(path)
        xc = x.cpu()
        result.measurements.append(time_stage(lambda: runtime(xc), subject=subject, stage="model", batch=s.batch,
                                              warmup=s.warmup, iters=s.iters, device=torch.device("cpu"),
                                              runtime="onnxruntime"))
        predictor = Predictor(runtime, cfg, categories, device="cpu", semantic=False, instances=False)
        result.measurements.append(time_stage(lambda: predictor.predict_tensors(chw), subject=subject,
                                              stage="end_to_end", batch=s.batch, warmup=s.warmup, iters=s.iters,
                                              device=torch.device("cpu"), count_segments=_segments_per_image,
                                              runtime="onnxruntime"))
        del predictor, runtime


def _bench_remax_train(s: BenchSettings, device: torch.device, input_side: int) -> Measurement:
    from remax.losses.criterion import SetCriterion

    model, cfg = _build_remax(s.preset, input_side, with_training_heads=True)
    model = model.to(device).train()
    if s.channels_last:
        model = model.to(memory_format=torch.channels_last)
    try:
        from remax.engine.optim import build_optimizer

        optimizer = build_optimizer(model, cfg.train)
    except ImportError:  # the engine's param groups are optional for a throughput figure
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    criterion = SetCriterion(cfg.loss, cfg.remax, cfg.model.num_classes,
                             generator=torch.Generator(device=device).manual_seed(s.seed))
    net = _maybe_compile(model, s.compile)
    # BatchNorm in training mode needs more than one value per channel: the image-pooling branch of the
    # auxiliary semantic head (ASPP) sees one per image, so a training step needs at least two images.
    batch = max(s.batch, TRAIN_MIN_BATCH)
    if batch != s.batch:
        log.warning("training step measured at batch %d (BatchNorm after global pooling needs >= 2 images)", batch)
    g = torch.Generator().manual_seed(s.seed)
    x = (torch.rand(batch, 3, input_side, input_side, generator=g) * 2 - 1).to(device)
    if s.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    targets = [t.to(device) for t in random_panoptic_targets(batch, (input_side, input_side),
                                                              cfg.model.num_classes, s.seed)]
    scaler = torch.amp.GradScaler(device.type, enabled=(s.precision == "fp16" and device.type == "cuda"))

    def step() -> None:
        with _autocast(device, s.precision):
            outputs = net(x)
        loss, _ = criterion(outputs, targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    m = time_stage(step, subject=s.preset, stage="train_step", batch=batch, warmup=s.warmup, iters=s.iters,
                   device=device, compiled=s.compile)
    del optimizer, net, model
    _release_freed_memory()
    return m


# ----------------------------------------------------------------------------------------------------------------
# Peer: HF transformers Mask2Former-R50
# ----------------------------------------------------------------------------------------------------------------


def build_mask2former_r50(num_labels: int = 133, image_size: int | None = None) -> tuple[nn.Module, Any]:
    """HF Mask2Former with a ResNet-50 backbone, random weights, built offline from config objects.

    The image processor resizes to ``image_size``² (the same input as remax gets) instead of its 800/1333
    default; without ``size_divisor`` padding, so 641 stays 641.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
        from transformers import (Mask2FormerConfig, Mask2FormerForUniversalSegmentation,
                                  Mask2FormerImageProcessor, ResNetConfig)
    except ImportError as exc:
        raise BenchError(f"the mask2former-r50 peer needs HF transformers, which is not importable ({exc}); "
                         f"install it with: {_TRANSFORMERS_HINT}") from exc
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # it warns that a ResNet backbone is "not supported"; it runs
    try:
        backbone = ResNetConfig(out_features=["stage1", "stage2", "stage3", "stage4"])  # defaults = ResNet-50
        model = Mask2FormerForUniversalSegmentation(Mask2FormerConfig(backbone_config=backbone,
                                                                      num_labels=num_labels))
        kwargs: dict[str, Any] = {"size_divisor": 0}
        if image_size is not None:
            kwargs["size"] = {"height": image_size, "width": image_size}
        processor = Mask2FormerImageProcessor(**kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)
    return model.eval(), processor


def _bench_peer(s: BenchSettings, device: torch.device, image_size: int, result: BenchResult) -> None:
    if s.peer not in PEERS:
        raise BenchError(f"unknown peer {s.peer!r}; choose from {', '.join(PEERS)}")
    num_labels = 133
    model, processor = build_mask2former_r50(num_labels, image_size)
    model = model.to(device)
    if s.channels_last:
        model = model.to(memory_format=torch.channels_last)
    result.params_m[s.peer] = _count_params_m(model)
    net = _maybe_compile(model, s.compile)
    stuff_ids = set(range(_COCO_THINGS, num_labels))

    images = bench_images(s, image_size)  # the pictures remax got
    chw = [img.permute(2, 0, 1).contiguous() for img in images]
    with torch.inference_mode():
        pixel_values = processor(images=chw, return_tensors="pt")["pixel_values"].to(device)
        if s.channels_last:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)

    def model_only() -> Any:
        with torch.inference_mode(), _autocast(device, s.precision):
            return net(pixel_values=pixel_values)

    result.measurements.append(time_stage(model_only, subject=s.peer, stage="model", batch=s.batch,
                                          warmup=s.warmup, iters=s.iters, device=device, compiled=s.compile))
    target_sizes = [(image_size, image_size)] * s.batch

    def end_to_end() -> Any:
        with torch.inference_mode():
            inputs = processor(images=chw, return_tensors="pt", device=device)
            with _autocast(device, s.precision):
                outputs = net(pixel_values=inputs["pixel_values"], pixel_mask=inputs["pixel_mask"])
            return processor.post_process_panoptic_segmentation(outputs, target_sizes=target_sizes,
                                                                label_ids_to_fuse=stuff_ids)

    def count(results: Any) -> float:
        return sum(len(r["segments_info"]) for r in results) / max(len(results), 1)

    result.measurements.append(time_stage(end_to_end, subject=s.peer, stage="end_to_end", batch=s.batch,
                                          warmup=s.warmup, iters=s.iters, device=device, compiled=s.compile,
                                          count_segments=count))
    del net, model
    _release_freed_memory()


# ----------------------------------------------------------------------------------------------------------------
# Entry point and formatting
# ----------------------------------------------------------------------------------------------------------------


def _resolve_device(name: str) -> torch.device:
    if name not in ("cpu", "cuda"):
        raise BenchError(f"--device must be cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda was asked for but torch sees no CUDA device")
    return torch.device(name)


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    if n < 1:
        raise BenchError(f"--threads must be at least 1, got {n}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def make_protocol(s: BenchSettings, device: torch.device, image_size: int, input_side: int) -> Protocol:
    return Protocol(
        device=device.type,
        device_name=device_name(device),
        torch_version=torch.__version__,
        python_version=platform.python_version(),
        threads=torch.get_num_threads(),
        precision=s.precision,
        compile=s.compile,
        channels_last=s.channels_last,
        image_size=(image_size, image_size),
        model_input_size=(input_side, input_side),
        batch=s.batch,
        warmup=s.warmup,
        iters=s.iters,
        model_stage="network only, on a normalised zero-padded float batch; no resize, no post-processing",
        end_to_end_stage=("uint8 H×W×3 images -> resize (longer side to the model input) + normalise + pad + "
                          "network + upsample + un-pad + panoptic post-processing (remax: Predictor; peer: "
                          "Mask2FormerImageProcessor + post_process_panoptic_segmentation)"),
        memory_method=MemoryProbe(device).method,
        weights=(f"trained: {s.checkpoint}" if s.checkpoint else
                 "random initialisation (speed does not depend on the weight values)"),
        images=(f"{s.images} (first {s.batch}, resized to {image_size}×{image_size})" if s.images
                else "synthetic blocks of colour"),
        merge_load=("trained-shape outputs: %d confident queries owning a grid tile each, mask logits at std %.1f"
                    % (TRAINED_CONFIDENT_QUERIES, TRAINED_MASK_LOGIT_STD) if s.merge_load == "trained"
                    else "the network's own outputs") + (f"; config {', '.join(s.overrides)}" if s.overrides else ""),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )


def run_benchmark(settings: BenchSettings,
                  on_protocol: Callable[[Protocol], None] | None = None) -> BenchResult:
    """Measure ``settings.preset`` (and the peer, if asked) under one protocol; see the module docstring.

    ``on_protocol`` is called with the protocol before anything is measured (the CLI prints it first).
    """
    s = settings
    if s.precision not in PRECISIONS:
        raise BenchError(f"--precision must be one of {', '.join(PRECISIONS)}, got {s.precision!r}")
    if s.batch < 1:
        raise BenchError(f"--batch must be at least 1, got {s.batch}")
    if s.peer is not None and s.peer not in PEERS:
        raise BenchError(f"unknown peer {s.peer!r}; choose from {', '.join(PEERS)}")
    if s.runtime is not None and s.runtime not in RUNTIMES:
        raise BenchError(f"unknown runtime {s.runtime!r}; choose from {', '.join(RUNTIMES)}")
    if s.runtime == "onnxruntime" and s.device != "cpu":
        raise BenchError("--runtime onnxruntime is measured on the CPU (the CPU build of onnxruntime)")
    if s.runtime == "onnxruntime" and (s.precision != "fp32" or s.compile or s.merge_load != "none"):
        raise BenchError("--runtime onnxruntime measures the fp32 network without --compile or --merge-load")
    if s.merge_load not in MERGE_LOADS:
        raise BenchError(f"--merge-load must be one of {', '.join(MERGE_LOADS)}, got {s.merge_load!r}")
    if s.merge_load == "trained" and s.checkpoint is not None:
        raise BenchError("--merge-load trained is for random weights; a --checkpoint gives the real load")
    from remax.config import model_config

    try:
        preset_side = max(model_config(s.preset).input_size)
    except ValueError as exc:
        raise BenchError(str(exc)) from exc
    device = _resolve_device(s.device)
    image_size = s.size if s.size is not None else preset_side
    input_side = model_input_side(image_size)
    with _threads(s.threads):
        protocol = make_protocol(s, device, image_size, input_side)
        log.debug("bench protocol: %s", protocol)
        if on_protocol is not None:
            on_protocol(protocol)
        result = BenchResult(protocol=protocol, preset=s.preset, peer=s.peer)
        torch.manual_seed(s.seed)
        _bench_remax(s, device, image_size, input_side, result)
        if s.peer is not None:
            _bench_peer(s, device, image_size, result)
            for stage in ("model", "end_to_end"):
                ours, theirs = result.get(s.preset, stage), result.get(s.peer, stage)
                if ours is not None and theirs is not None:
                    result.ratios[stage] = ours.images_per_s / theirs.images_per_s
        for stage in ("model", "end_to_end"):
            eager, ort = result.get(s.preset, stage), result.get(f"{s.preset}[onnxruntime]", stage)
            if eager is not None and ort is not None:
                result.runtime_ratios[stage] = ort.images_per_s / eager.images_per_s
    return result


def format_protocol(p: Protocol) -> str:
    yes = {True: "yes", False: "no"}
    rows = [
        ("device", f"{p.device}: {p.device_name}"),
        ("torch", f"{p.torch_version} (Python {p.python_version})"),
        ("threads", str(p.threads)),
        ("precision", p.precision + ("" if p.precision == "fp32" else " (autocast)")),
        ("compile", yes[p.compile] + (" (torch.compile; first call timed separately)" if p.compile else "")),
        ("channels_last", yes[p.channels_last]),
        ("image size", f"{p.image_size[0]}×{p.image_size[1]} uint8 (remax network input "
                       f"{p.model_input_size[0]}×{p.model_input_size[1]} after padding)"),
        ("batch", str(p.batch)),
        ("warm-up / timed", f"{p.warmup} / {p.iters} calls (+1 first call, timed alone)"),
        ("model stage", p.model_stage),
        ("end-to-end stage", p.end_to_end_stage),
        ("resize included", "end to end: yes; model: no"),
        ("post-processing included", "end to end: yes; model: no"),
        ("peak memory", p.memory_method),
        ("weights", p.weights),
        ("images", p.images),
        ("merge load", p.merge_load),
        ("date", p.date),
    ]
    width = max(len(k) for k, _ in rows)
    return "protocol\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def format_result(r: BenchResult, with_protocol: bool = True) -> str:
    """The protocol block (optional), a table of every measurement, and the remax ÷ peer ratios."""
    header = (f"{'subject':<22} {'stage':<11} {'batch':>5} {'median ms':>10} {'p90 ms':>10} {'images/s':>9} "
              f"{'peak +MiB':>9} {'peak MiB':>9} {'first s':>8} {'segs':>5}")
    lines = [format_protocol(r.protocol), ""] if with_protocol else []
    lines += [header, "-" * len(header)]
    for m in r.measurements:
        segs = "" if m.segments_per_image is None else f"{m.segments_per_image:.1f}"
        lines.append(f"{m.subject:<22} {m.stage:<11} {m.batch:>5} {m.median_ms:>10.2f} {m.p90_ms:>10.2f} "
                     f"{m.images_per_s:>9.2f} {m.peak_memory_mb:>9.0f} {m.peak_memory_total_mb:>9.0f} "
                     f"{m.first_call_s:>8.2f} {segs:>5}")
    lines.append("peak +MiB: above the level before the stage; peak MiB: absolute (see protocol); first s: the "
                 "first call, timed alone; segs: panoptic segments kept per image (random weights keep few unless "
                 "--merge-load trained)")
    if r.params_m:
        lines.append("")
        lines.append("parameters (inference network): " +
                     ", ".join(f"{k} {v:.2f} M" for k, v in r.params_m.items()))
    if r.runtime_ratios:
        lines.append("")
        lines.append(f"ratio {r.preset} ONNX Runtime ÷ eager (images/s): " +
                     ", ".join(f"{stage} {ratio:.2f}×" for stage, ratio in r.runtime_ratios.items()))
    if r.ratios:
        lines.append("")
        lines.append(f"ratio {r.preset} ÷ {r.peer} (images/s): " +
                     ", ".join(f"{stage} {ratio:.2f}×" for stage, ratio in r.ratios.items()))
    return "\n".join(lines)

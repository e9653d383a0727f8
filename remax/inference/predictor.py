"""The :class:`Predictor`: images of any size and mode in, panoptic / semantic / instance outputs out.

Pre-processing follows kmax-reference §4: resize so the image fits the model's fixed input with its longer side
on the input size (aspect kept), normalise, pad bottom/right with zeros, run, upsample the stride-4 mask logits to
the padded size (``align_corners`` for odd sizes), crop the valid region, resize to the original size, then merge.

``cfg.eval.protocol == "reference"`` reproduces how bytedance/kmax-deeplab evaluates instead (its test-time
``ResizeShortestEdge`` with PIL bilinear on uint8, its crop and ``align_corners`` resize back); see
:func:`reference_resized_shape`, :func:`reference_crop` and docs/evaluation.md.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from remax.checkpoint import CheckpointError, load_with_config, model_categories
from remax.config import Config
from remax.preprocessing import (check_protocol, preprocess, reference_crop, reference_resized_shape,  # noqa: F401
                                 resize_uint8_pil, resized_shape)
from remax.structures import CategoryInfo

from .mask_probabilities import CHUNK_QUERIES, BufferedUpsample, lowres_support, pruning_plan, query_probabilities
from .postprocess import (InstancePrediction, class_scores, instance_from_probabilities, panoptic_postprocess_lowres,
                          semantic_from_probabilities)

log = logging.getLogger(__name__)

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]

# Keys of heads that exist only for training; a training checkpoint holds them, an inference model does not.
TRAINING_ONLY_PREFIXES = ("aux_semantic_head.", "remask_heads.")


@dataclass
class PredictionResult:
    """Outputs for one image at its original (EXIF-corrected) size.

    ``segments_info`` entries: ``id`` (value in ``id_map``), ``category_id`` (the data set's category id),
    ``label`` (contiguous training id), ``isthing``, ``score``, ``area``. ``semantic`` holds contiguous ids.
    """

    id_map: torch.Tensor  # int64 [H, W], 0 = void
    segments_info: list[dict]
    semantic: torch.Tensor | None  # int64 [H, W]
    instances: InstancePrediction | None
    instance_category_ids: torch.Tensor | None = None  # data-set category ids of the instances
    height: int = 0
    width: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


def load_image(image: ImageInput) -> torch.Tensor:
    """Any supported image -> uint8 RGB tensor ``3×H×W``.

    Paths and PIL images get their EXIF orientation applied; RGBA is composited on black; grey and palette
    images are expanded to RGB; 16-bit grey is rescaled to 8 bits. Arrays are ``H×W``, ``H×W×{1,3,4}`` (uint8);
    tensors are ``{1,3,4}×H×W`` or ``H×W`` (uint8). Raises ``OSError`` for unreadable files and ``ValueError``
    for unsupported arrays, naming the input.
    """
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            im.load()
            return _pil_to_tensor(im)
    if isinstance(image, Image.Image):
        return _pil_to_tensor(image)
    if isinstance(image, np.ndarray):
        return _array_to_tensor(torch.from_numpy(np.ascontiguousarray(image)), channels_last=True)
    if isinstance(image, torch.Tensor):
        return _array_to_tensor(image.detach().cpu(), channels_last=False)
    raise TypeError(f"unsupported image type {type(image).__name__}; pass a path, PIL image, array or tensor")


def _pil_to_tensor(im: Image.Image) -> torch.Tensor:
    # One full-size copy at a time: a 12000×8000 photo is 288 MB per RGB copy.
    im = ImageOps.exif_transpose(im) if im.getexif().get(0x0112, 1) != 1 else im
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im).astype(np.float64)
        peak = float(arr.max()) if arr.size else 0.0
        if peak > 255:
            arr = arr * (255.0 / peak)
        arr = np.clip(arr, 0, 255).astype(np.uint8)
        return torch.from_numpy(np.ascontiguousarray(arr)).unsqueeze(0).expand(3, -1, -1).contiguous()
    arr = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def _array_to_tensor(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    if t.dtype != torch.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {t.dtype}")
    if t.dim() == 2:
        t = t.unsqueeze(0)
    elif t.dim() == 3 and channels_last:
        t = t.permute(2, 0, 1)
    if t.dim() != 3 or t.shape[0] not in (1, 3, 4):
        layout = "H×W×C" if channels_last else "C×H×W"
        raise ValueError(f"expected an {layout} image with 1, 3 or 4 channels, got shape {tuple(t.shape)}")
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    elif t.shape[0] == 4:  # composite on black, as for PIL RGBA
        alpha = t[3:].float() / 255.0
        t = (t[:3].float() * alpha).round().to(torch.uint8)
    return t.contiguous()


def mask_logits_to_image(mask_logits: torch.Tensor, input_size: tuple[int, int], valid: tuple[int, int],
                         original: tuple[int, int], protocol: str = "remax") -> torch.Tensor:
    """Stride-4 mask logits ``N×h×w`` of one padded input -> ``N×H×W`` at the original image size.

    Both protocols upsample to the padded input (``align_corners`` for odd sizes) and crop ``valid``. The
    resize back to the image then uses ``align_corners=False`` by default (pixel centres of the crop and the
    image coincide) and, under ``protocol="reference"``, the reference's ``align_corners`` for an odd input width.
    """
    first, second = resize_alignment(input_size, protocol)
    x = F.interpolate(mask_logits.unsqueeze(0).float(), size=input_size, mode="bilinear", align_corners=first)
    x = x[:, :, : valid[0], : valid[1]]
    if tuple(valid) != tuple(original):
        x = F.interpolate(x, size=original, mode="bilinear", align_corners=second)
    return x[0]


def resize_alignment(input_size: tuple[int, int], protocol: str = "remax") -> tuple[bool, bool]:
    """``align_corners`` of the two mask resizes of :func:`mask_logits_to_image` (to the padded input, then from
    the crop to the image)."""
    if check_protocol(protocol) == "reference":
        align = input_size[1] % 2 == 1  # the reference looks at the padded width only
        return align, align
    return input_size[0] % 2 == 1 and input_size[1] % 2 == 1, False  # Python constants: traceable


class Predictor:
    """Runs a kMaX-DeepLab model on images and post-processes its outputs.

    ``categories`` (contiguous order) map predicted labels to data-set category ids and tell things from stuff;
    ``cfg.eval`` holds the merge thresholds and ``cfg.model.input_size`` the padded input size.
    """

    def __init__(self, model: torch.nn.Module, cfg: Config, categories: Sequence[CategoryInfo],
                 device: str | torch.device = "cpu", semantic: bool = True, instances: bool = True,
                 instance_topk: int = 100, max_merge_pixels: int | None = None) -> None:
        if len(categories) != cfg.model.num_classes:
            raise ValueError(f"{len(categories)} categories given for a model with {cfg.model.num_classes} classes")
        self.device = resolve_device(device)
        if cfg.eval.keep_remask:
            _keep_remask(model, cfg)
        # An nn.Module, or an exported network (remax.inference.runtime) with the same call and outputs.
        self.model = model.to(self.device).eval()
        self.cfg = cfg
        self.categories = list(categories)
        self.input_size = tuple(int(v) for v in cfg.model.input_size)
        self.is_thing = torch.tensor([c.isthing for c in self.categories], dtype=torch.bool)
        self.category_ids = torch.tensor([c.id for c in self.categories], dtype=torch.int64)
        self.protocol = check_protocol(cfg.eval.protocol)
        self.semantic = semantic
        self.instances = instances
        self.instance_topk = instance_topk
        # The merge holds N float maps at the output size; for images far larger than the model input (phone
        # photos) it runs at the resized size instead and its outputs are upsampled (nearest) to the original.
        self.max_merge_pixels = max_merge_pixels or 4 * self.input_size[0] * self.input_size[1]

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        overrides: Sequence[str] = (), **kwargs: Any) -> "Predictor":
        """Build the model of a checkpoint and load its weights (training-only heads are ignored unless
        ``eval.keep_remask`` keeps ReMask at test time). ``overrides``: ``section.field=value`` assignments
        applied to the checkpoint's config first.

        Raises :class:`~remax.checkpoint.CheckpointError` for missing, unreadable or mismatching checkpoints.
        """
        state, cfg = load_with_config(path, overrides)
        categories = model_categories(state, cfg.model.num_classes, path)
        model = load_model_from_state(state, cfg, where=str(path))
        return cls(model, cfg, categories, device=device, **kwargs)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, device: str | torch.device = "cpu",
                        overrides: Sequence[str] = (), revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, **kwargs: Any) -> "Predictor":
        """A Predictor from a model folder (``remax export --format folder``) or a Hugging Face Hub id
        (``org/name``, downloaded through ``huggingface_hub``; safetensors + JSON, no code is executed)."""
        from remax.hub import resolve_pretrained

        path = resolve_pretrained(name_or_path, revision=revision, cache_dir=cache_dir)
        return cls.from_checkpoint(path, device=device, overrides=overrides, **kwargs)

    @classmethod
    def from_onnx(cls, path: str | os.PathLike, providers: Sequence[str] | None = None,
                  overrides: Sequence[str] = (), **kwargs: Any) -> "Predictor":
        """A Predictor over an ONNX file from ``remax export --format onnx``, run by ONNX Runtime: the same pre-
        and post-processing as the eager model, no model code. ``overrides`` change post-processing settings."""
        from remax.inference.runtime import OnnxRuntimeModel

        runtime = OnnxRuntimeModel(path, providers=providers)
        return cls._from_runtime(runtime, path, overrides, **kwargs)

    @classmethod
    def from_exported(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                      overrides: Sequence[str] = (), **kwargs: Any) -> "Predictor":
        """A Predictor over a ``torch.export`` program from ``remax export --format torch-export``."""
        from remax.inference.runtime import ExportedProgramModel

        runtime = ExportedProgramModel(path, device=resolve_device(device))
        return cls._from_runtime(runtime, path, overrides, device=device, **kwargs)

    @classmethod
    def _from_runtime(cls, runtime: Any, path: str | os.PathLike, overrides: Sequence[str],
                      **kwargs: Any) -> "Predictor":
        from remax.export import parse_metadata

        cfg, categories = parse_metadata(runtime.metadata, str(path))
        cfg = cfg.override(list(overrides))
        if cfg.eval.keep_remask:
            raise ValueError("eval.keep_remask needs the training heads, which an exported network does not have")
        return cls(runtime, cfg, categories, **kwargs)

    # ------------------------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward_batch(self, images: Sequence[torch.Tensor]) -> tuple[dict[str, torch.Tensor], list]:
        """One forward pass over uint8 ``3×H×W`` images; returns the raw outputs and each image's resized size."""
        batch, sizes = preprocess(images, self.input_size, self.protocol)
        outputs = self.model(batch.to(self.device))
        return outputs, sizes

    @torch.inference_mode()
    def predict(self, images: ImageInput | Sequence[ImageInput],
                batch_size: int | None = None) -> PredictionResult | list[PredictionResult]:
        """Predict one image (returns one result) or a list (returns a list; ``batch_size`` images per forward
        pass, all at once by default)."""
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        tensors = [load_image(im) for im in items]
        step = batch_size or max(1, len(tensors))
        results: list[PredictionResult] = []
        for start in range(0, len(tensors), step):
            results.extend(self.predict_tensors(tensors[start:start + step]))
        return results[0] if single else results

    __call__ = predict

    @torch.inference_mode()
    def predict_tensors(self, images: Sequence[torch.Tensor]) -> list[PredictionResult]:
        """Predict already-loaded uint8 ``3×H×W`` images in one forward pass."""
        if not images:
            return []
        outputs, sizes = self.forward_batch(images)
        return self.postprocess_batch(outputs["pred_logits"], outputs["pred_masks"], sizes,
                                      [(int(img.shape[1]), int(img.shape[2])) for img in images])

    def postprocess_batch(self, class_logits: torch.Tensor, mask_logits: torch.Tensor,
                          valid: Sequence[tuple[int, int]],
                          original: Sequence[tuple[int, int]]) -> list[PredictionResult]:
        """Post-process a batch of raw outputs (``B×N×(K+1)``, ``B×N×h×w``) on their device.

        The query pruning of every image is one batched computation over the low-resolution logits (bounded
        over the largest crop of the batch, which only keeps more queries); the merges then run per image.
        """
        lowres = mask_logits.float()
        rows = cols = 0
        for v in valid if self.protocol != "reference" else [reference_crop(o[0], o[1], self.input_size)
                                                              for o in original]:
            r, c = lowres_support(v, self.input_size, tuple(lowres.shape[-2:]))
            rows, cols = max(rows, r), max(cols, c)
        active, gap = pruning_plan(lowres, rows=rows, cols=cols)  # B×N, float
        return [self.postprocess_one(class_logits[i], lowres[i], valid[i], original[i],
                                     active=active[i].nonzero().squeeze(1), shift_gap=gap)
                for i in range(len(valid))]

    def postprocess_one(self, class_logits: torch.Tensor, mask_logits: torch.Tensor, valid: tuple[int, int],
                        original: tuple[int, int], active: torch.Tensor | None = None,
                        shift_gap: float | None = None) -> PredictionResult:
        """Merge one image's stride-4 mask logits at its original size (kmax-reference §4).

        Only the queries that can be kept are upsampled (:func:`panoptic_postprocess_lowres`); the result is that
        of resizing all of them and merging (:func:`panoptic_postprocess`). The reference protocol crops the
        reference's region (:func:`reference_crop`) and always merges at the original size, as the reference
        does, however large the image.
        """
        if self.protocol == "reference":
            valid = reference_crop(original[0], original[1], self.input_size)
            large = False
        else:
            large = (original[0] * original[1] > self.max_merge_pixels
                     and valid[0] * valid[1] < original[0] * original[1])
        merge_size = tuple(valid if large else original)
        lowres = mask_logits.float()
        upsample = BufferedUpsample(self.input_size, tuple(valid), merge_size,
                                    *resize_alignment(self.input_size, self.protocol),
                                    channels=CHUNK_QUERIES, device=lowres.device)
        if active is None or shift_gap is None:
            rows, cols = lowres_support(valid, self.input_size, tuple(lowres.shape[-2:]))
            keep, shift_gap = pruning_plan(lowres[None], rows=rows, cols=cols)
            active = keep[0].nonzero().squeeze(1)
        class_logits = class_logits.float()
        probs = None
        if self.semantic or self.instances:  # they need every active query; the panoptic merge shares them
            passes = class_scores(class_logits, self.is_thing, self.cfg.eval)[3]
            probs = query_probabilities(lowres, upsample, torch.cat([active, passes.nonzero().squeeze(1)]),
                                        active=active, shift_gap=shift_gap)
        pan = panoptic_postprocess_lowres(class_logits, lowres, upsample, merge_size, self.is_thing, self.cfg.eval,
                                          active=active, probs=probs, shift_gap=shift_gap)
        id_map = _resize_nearest(pan.id_map, original).cpu()
        if tuple(merge_size) != tuple(original):
            areas = torch.bincount(id_map.flatten(), minlength=len(pan.segments_info) + 1).tolist()
            for s in pan.segments_info:
                s["area"] = int(areas[s["id"]])
            pan.segments_info = [s for s in pan.segments_info if s["area"] > 0]  # (upsampling keeps them all)
        segments = []
        for s in pan.segments_info:
            label = int(s["category_id"])
            segments.append({"id": s["id"], "category_id": self.categories[label].id, "label": label,
                             "isthing": s["isthing"], "score": s["score"], "area": s["area"]})
        semantic = None
        if self.semantic:
            semantic = _resize_nearest(semantic_from_probabilities(class_logits, probs), original).cpu()
        inst = None
        inst_cats = None
        if self.instances:
            inst = instance_from_probabilities(class_logits, probs, self.is_thing, self.cfg.eval, self.instance_topk)
            inst = InstancePrediction(masks=_resize_nearest(inst.masks, original).cpu(), scores=inst.scores.cpu(),
                                      labels=inst.labels.cpu())
            inst_cats = self.category_ids[inst.labels]
        return PredictionResult(id_map=id_map, segments_info=segments, semantic=semantic, instances=inst,
                                instance_category_ids=inst_cats, height=original[0], width=original[1])


def _resize_nearest(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of an integer/bool ``H×W`` or ``k×H×W`` map (identity when already that size)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    h, w = x.shape[-2:]
    rows = ((torch.arange(size[0], device=x.device) + 0.5) * (h / size[0])).long().clamp(max=h - 1)
    cols = ((torch.arange(size[1], device=x.device) + 0.5) * (w / size[1])).long().clamp(max=w - 1)
    return x[..., rows[:, None], cols[None, :]]  # a gather: no float copy of k full-size masks


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; other names are passed to :class:`torch.device`.

    A CUDA device that this machine lacks is a ``ValueError`` here, in one line, instead of a driver traceback at
    the first tensor copy.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r} ({exc}); use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA device is available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def _keep_remask(model: torch.nn.Module, cfg: Config) -> None:
    """Switch ReMask on for ``eval()`` (``eval.keep_remask``, the paper's Table 5), or say why it cannot be."""
    from remax.models import ReMaskOptions

    options = ReMaskOptions.from_config(cfg.remax, at_test=True)
    if not options.at_test:
        raise ValueError("eval.keep_remask needs a model trained with ReMask in the decoder (remax.enabled, "
                         "remax.remask and remax.remask_in_decoder true, remax.remask_stages > 0)")
    if options.use_gt:
        raise ValueError("eval.keep_remask cannot keep the ground-truth control (remax.remask_use_gt): there is "
                         "no ground truth at test time")
    if getattr(model, "remask_heads", None) is None or not hasattr(model, "set_remask"):
        raise ValueError("eval.keep_remask needs the ReMaX semantic heads, which this model does not have "
                         "(load it from a training checkpoint)")
    model.set_remask(options)


def load_model_from_state(state: dict[str, Any], cfg: Config, where: str = "checkpoint") -> torch.nn.Module:
    """Build the inference model of ``cfg`` and load ``state['model']`` strictly, minus training-only heads
    (kept, with ReMask at test time, when ``cfg.eval.keep_remask``)."""
    from remax.models import build_model

    keep = cfg.eval.keep_remask
    model = build_model(cfg.model, with_training_heads=keep)
    weights = state["model"]
    if not isinstance(weights, dict):
        raise CheckpointError(f"{where}: 'model' is not a state dict")
    weights = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in weights.items()}
    if keep and not any(k.startswith("remask_heads.") for k in weights):
        raise CheckpointError(f"{where}: eval.keep_remask needs the ReMaX semantic heads, which this checkpoint "
                              f"does not hold (an inference-only file, or a run without ReMask)")
    if not keep:
        weights = {k: v for k, v in weights.items() if not k.startswith(TRAINING_ONLY_PREFIXES)}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        own = model.state_dict()
        missing = sorted(set(own) - set(weights))
        unexpected = sorted(set(weights) - set(own))
        shapes = sorted(k for k in set(own) & set(weights) if tuple(own[k].shape) != tuple(weights[k].shape))
        parts = []
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if keys:
                parts.append(f"{len(keys)} {name} (e.g. {', '.join(keys[:3])})")
        raise CheckpointError(f"{where}: weights do not fit the model of its config: {'; '.join(parts) or exc}") \
            from exc
    return model


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Regular, non-hidden files of a folder in sorted order (non-images are found when read, not by name)."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith("."))

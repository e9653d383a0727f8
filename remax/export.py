"""Export the eval-form network to ONNX or to a ``torch.export`` program, with a built-in parity check.

The exported graph is the network only, the part that is worth compiling for a runtime: its input is the
normalised, zero-padded ``B×3×H_in×W_in`` float batch that :func:`remax.preprocessing.preprocess` makes, its outputs
``pred_logits`` (``B×N×(K+1)``, void last) and ``pred_masks`` (``B×N×h×w``, stride 4). Resize / normalise / pad
before it and the mask-wise merge after it are the library's (:mod:`remax.preprocessing`, :mod:`remax.inference`),
so an exported model gives the eager model's id maps. The file carries what a deployment needs besides the graph:
the full config (input size, thresholds), the categories and the pre-processing contract, as ONNX
``metadata_props`` or ``torch.export`` extra files, so :meth:`remax.inference.Predictor.from_onnx` /
:meth:`~remax.inference.Predictor.from_exported` run from the file alone.

ONNX uses opset 18 through the dynamo exporter (``torch.onnx.export(dynamo=True)``): the lowest opset that exporter
emits, where ``Resize`` (the bilinear upsampling in the pixel decoder and mask head), ``ReduceMax``/``ArgMax``
(the k-means assignment of the decoder) and ``Pad``/``Gather`` (the relative-position axial attention) are
standard ONNX ops that ONNX Runtime >= 1.14 runs natively; no custom op or Python fallback is involved.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from remax.checkpoint import (CheckpointError, categories_to_state, checkpoint_categories, first_line,
                              write_atomically)
from remax.config import Config
from remax.structures import CategoryInfo

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torch-export", "folder")
OPSET = 18
INPUT_NAME = "images"
OUTPUT_NAMES = ("pred_logits", "pred_masks")
METADATA_VERSION = 1
# The names export_metadata writes, in order (torch.export.load reads only the extra files asked for by name).
METADATA_KEYS = ("remax.format_version", "remax.version", "remax.config", "remax.categories", "remax.preprocessing",
                 "remax.source")
PREPROCESSING = ("uint8 RGB, resized so the longer side fits the input (remax.preprocessing.resized_shape), "
                 "x / 127.5 - 1, zero-padded bottom/right to input_size")
# Parity tolerances of the built-in check (fp32): ONNX Runtime and torch reorder float sums (convolutions,
# attention); the differences seen on trained weights are under 1e-5. A larger one means a wrongly exported op.
RTOL = 1e-4
ATOL = 1e-4


class ExportError(RuntimeError):
    """An export that failed, or whose parity check did not hold."""


@dataclass
class ExportReport:
    """What was written and how close it is to the eager network."""

    path: Path
    format: str
    input_size: tuple[int, int]
    dynamic_batch: bool
    seconds: float
    max_abs_diff: dict[str, float] = field(default_factory=dict)  # output name -> max |exported - eager|
    checked: bool = False

    def parity_line(self) -> str:
        return ", ".join(f"{k} max |diff| {v:.2e}" for k, v in self.max_abs_diff.items())


def export_metadata(cfg: Config, categories: list[CategoryInfo], source: str) -> dict[str, str]:
    """String metadata stored with an exported graph (ONNX ``metadata_props`` / torch.export extra files)."""
    from remax import __version__

    values = (str(METADATA_VERSION), __version__, json.dumps(cfg.to_dict()),
              json.dumps(categories_to_state(categories)), PREPROCESSING, source)
    return dict(zip(METADATA_KEYS, values, strict=True))


def parse_metadata(meta: dict[str, str], where: str) -> tuple[Config, list[CategoryInfo]]:
    """Config and categories back from :func:`export_metadata`; a one-line :class:`CheckpointError` otherwise."""
    if "remax.config" not in meta:
        raise CheckpointError(f"{where}: not a remax export (no remax.config metadata)")
    try:
        cfg = Config.from_dict(json.loads(meta["remax.config"]))
        categories = checkpoint_categories({"categories": json.loads(meta.get("remax.categories", "[]"))})
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{where}: bad remax metadata ({exc})") from None
    return cfg, categories


def load_for_export(checkpoint: str | os.PathLike,
                    overrides: tuple[str, ...] | list[str] = ()) -> tuple[torch.nn.Module, Config, list[CategoryInfo]]:
    """The eval-form model (training heads dropped), config and categories of a checkpoint or model folder."""
    from remax.checkpoint import load_with_config, model_categories
    from remax.inference.predictor import load_model_from_state

    state, cfg = load_with_config(checkpoint, overrides)
    if cfg.eval.keep_remask:
        raise ExportError("eval.keep_remask cannot be exported: the exported network is the eval form without the "
                          "training heads")
    categories = model_categories(state, cfg.model.num_classes, checkpoint)
    model = load_model_from_state(state, cfg, where=str(checkpoint)).eval()
    return model, cfg, categories


class _Outputs(torch.nn.Module):
    """The network with its dict output as a tuple (the two names of the exported graph)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(images)
        return out["pred_logits"], out["pred_masks"]


def example_batch(input_size: tuple[int, int], batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A deterministic structured input (blocks of colour, resized like a photo) for tracing and the parity check."""
    from remax.preprocessing import preprocess

    g = torch.Generator().manual_seed(seed)
    images = []
    for i in range(batch):
        coarse = torch.randint(0, 256, (1, 3, 12, 16), generator=g).float()
        h, w = (input_size[0] * 3) // 4 + 8 * i, input_size[1] - 1
        img = torch.nn.functional.interpolate(coarse, size=(h, w), mode="nearest")[0]
        img = (img + torch.randint(-10, 11, img.shape, generator=g)).clamp(0, 255).to(torch.uint8)
        images.append(img)
    return preprocess(images, input_size)[0]


def _compare(name: str, exported: torch.Tensor, eager: torch.Tensor) -> float:
    diff = float((exported.float() - eager.float()).abs().max()) if eager.numel() else 0.0
    if not torch.allclose(exported.float(), eager.float(), rtol=RTOL, atol=ATOL):
        raise ExportError(f"parity check failed: {name} differs from the eager network by up to {diff:.3g} "
                          f"(tolerance {ATOL:g} + {RTOL:g}·|eager|)")
    return diff


def _mean_axis_by_axis(self, dim, keepdim=False, dtype=None):
    """ONNX translation of ``aten.mean.dim``: one ``ReduceMean`` per axis, innermost first (the same mean).

    ONNX Runtime's CPU ``ReduceMean`` over H×W at once loses up to ~1e-5 relative on zero-padded feature maps
    (measured on the squeeze-excite means of a padded COCO photo; rounding that does not cancel over a constant
    region), enough to move the final mask logits by 1.4e-4 and flip pixels at the 0.4 threshold. One axis at a
    time stays within float32 rounding of eager (7e-6 on the masks). Eager PyTorch is unchanged.
    """
    from onnxscript import opset18 as op

    rank = len(self.shape)
    if dtype is not None and dtype != -1:
        self = op.Cast(self, to=dtype)
    dims = sorted({d % rank for d in dim}, reverse=True) if dim else list(range(rank - 1, -1, -1))
    y = self
    for d in dims:
        y = op.ReduceMean(y, op.Constant(value_ints=[d]), keepdims=1)
    if not keepdim:
        y = op.Squeeze(y, op.Constant(value_ints=sorted(dims)))
    return y


def _export_inputs(model: torch.nn.Module, cfg: Config, out: str | os.PathLike, dynamic_batch: bool
                   ) -> tuple[tuple[int, int], Path, torch.nn.Module, torch.Tensor, dict | None]:
    """What both exporters trace: the input size, the output path (its folder made), the tuple-output network,
    an example batch (2 images for a dynamic batch, so the batch dimension is not specialised to 1) and the
    dynamic-shape spec."""
    input_size = tuple(int(v) for v in cfg.model.input_size)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    x = example_batch(input_size, batch=2 if dynamic_batch else 1)
    dynamic = {"images": {0: torch.export.Dim("batch", min=1, max=1024)}} if dynamic_batch else None
    return input_size, out, _Outputs(model).eval(), x, dynamic


def export_onnx(model: torch.nn.Module, cfg: Config, categories: list[CategoryInfo], out: str | os.PathLike,
                *, dynamic_batch: bool = False, check: bool = True, source: str = "") -> ExportReport:
    """Write ``model`` (eval form) as an ONNX file at ``cfg.model.input_size`` and check it with ONNX Runtime."""
    try:
        import onnx
    except ImportError as exc:
        raise ExportError(f"ONNX export needs the onnx extra ({exc}); install it with: pip install "
                          f"'remax[onnx]'") from None
    input_size, out, wrapped, x, dynamic = _export_inputs(model, cfg, out, dynamic_batch)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            program = torch.onnx.export(wrapped, (x,), dynamo=True, opset_version=OPSET, input_names=[INPUT_NAME],
                                        output_names=list(OUTPUT_NAMES), dynamic_shapes=dynamic,
                                        external_data=False, verbose=False,
                                        custom_translation_table={torch.ops.aten.mean.dim: _mean_axis_by_axis})
    except Exception as exc:  # the exporter raises many types; the first line names the op
        raise ExportError(f"ONNX export failed: {first_line(exc)}") from exc
    proto = program.model_proto
    for key, value in export_metadata(cfg, categories, source).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    write_atomically(out, lambda f: onnx.save_model(proto, f), "ONNX file")
    report = ExportReport(path=out, format="onnx", input_size=input_size, dynamic_batch=dynamic_batch,
                          seconds=time.perf_counter() - t0)
    if check:
        from remax.inference.runtime import OnnxRuntimeModel

        runtime = OnnxRuntimeModel(out)
        _check(report, runtime, model, x[:1] if not dynamic_batch else x)
    return report


def export_program(model: torch.nn.Module, cfg: Config, categories: list[CategoryInfo], out: str | os.PathLike,
                   *, dynamic_batch: bool = False, check: bool = True, source: str = "") -> ExportReport:
    """Write ``model`` as a ``torch.export`` ExportedProgram (``torch.export.save``) with the remax metadata."""
    input_size, out, wrapped, x, dynamic = _export_inputs(model, cfg, out, dynamic_batch)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            program = torch.export.export(wrapped, (x,), dynamic_shapes=dynamic)
    except Exception as exc:
        raise ExportError(f"torch.export failed: {first_line(exc)}") from exc
    extra = export_metadata(cfg, categories, source)
    write_atomically(out, lambda f: torch.export.save(program, f, extra_files=extra), "exported program")
    report = ExportReport(path=out, format="torch-export", input_size=input_size, dynamic_batch=dynamic_batch,
                          seconds=time.perf_counter() - t0)
    if check:
        from remax.inference.runtime import ExportedProgramModel

        _check(report, ExportedProgramModel(out), model, x)
    return report


def _check(report: ExportReport, runtime: Any, model: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.inference_mode():
        eager = model(x)
        exported = runtime(x)
    for name in OUTPUT_NAMES:
        report.max_abs_diff[name] = _compare(name, exported[name], eager[name])
    report.checked = True
    log.info("parity: %s", report.parity_line())


def export_checkpoint(checkpoint: str | os.PathLike, fmt: str, out: str | os.PathLike, *,
                      dynamic_batch: bool = False, check: bool = True,
                      overrides: tuple[str, ...] | list[str] = ()) -> ExportReport:
    """``remax export``: a checkpoint (or model folder) to ONNX, a torch.export program or a model folder."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    if fmt == "folder":
        from remax.hub import export_folder, read_folder_config

        t0 = time.perf_counter()
        path = export_folder(checkpoint, out, overrides)
        cfg = read_folder_config(path)[1]
        return ExportReport(path=Path(path), format="folder", input_size=tuple(cfg.model.input_size),
                            dynamic_batch=True, seconds=time.perf_counter() - t0)
    model, cfg, categories = load_for_export(checkpoint, overrides)
    export = export_onnx if fmt == "onnx" else export_program
    return export(model, cfg, categories, out, dynamic_batch=dynamic_batch, check=check, source=str(checkpoint))

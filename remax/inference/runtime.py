"""Exported networks as drop-in models for the :class:`~remax.inference.Predictor`: ONNX Runtime sessions and
``torch.export`` programs, each read with the remax metadata stored beside the graph (see :mod:`remax.export`).

Both take the normalised, zero-padded float batch and return ``{"pred_logits", "pred_masks"}`` as torch tensors,
so the Predictor's pre- and post-processing stay the same and a deployment needs no training code path.
"""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from remax.checkpoint import CheckpointError, first_line
from remax.export import METADATA_KEYS, OUTPUT_NAMES

log = logging.getLogger(__name__)


class OnnxRuntimeModel:
    """An ONNX file run by ONNX Runtime. ``providers`` default to CPU; pass e.g. ``["CUDAExecutionProvider",
    "CPUExecutionProvider"]`` for a GPU build of onnxruntime. ``threads`` sets intra-op threads (default:
    torch's current thread count, so eager and ONNX Runtime are compared on the same cores)."""

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None,
                 threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ImportError(f"running an ONNX file needs onnxruntime ({exc}); install it with: pip install "
                              f"'remax[onnx]'") from None
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such ONNX file")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=options,
                                                providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as exc:  # onnxruntime raises its own exception types (InvalidProtobuf, Fail, ...)
            raise CheckpointError(f"{self.path}: not a readable ONNX model ({first_line(exc)})") from None
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        if set(OUTPUT_NAMES) - set(self.output_names):
            raise CheckpointError(f"{self.path}: outputs {self.output_names}, expected {list(OUTPUT_NAMES)}")

    def to(self, device: torch.device | str) -> "OnnxRuntimeModel":
        return self  # the session's providers decide where it runs; outputs come back on the CPU

    def eval(self) -> "OnnxRuntimeModel":
        return self

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feed = {self.input_name: np.ascontiguousarray(images.detach().cpu().float().numpy())}
        outputs = self.session.run(list(OUTPUT_NAMES), feed)
        return {name: torch.from_numpy(value) for name, value in zip(OUTPUT_NAMES, outputs)}


class ExportedProgramModel:
    """A ``torch.export`` program saved by ``remax export --format torch-export`` (``torch.export.load``)."""

    def __init__(self, path: str | os.PathLike, device: torch.device | str = "cpu") -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such exported program")
        extra = {key: "" for key in METADATA_KEYS}
        if not zipfile.is_zipfile(self.path):
            raise CheckpointError(f"{self.path}: not a readable torch.export program (not a .pt2 zip archive)")
        # torch logs its own warning (with a traceback) before raising on a damaged archive; the error below says it
        # in one line. Read through a buffer: torch also warns on a file name that does not end in .pt2.
        export_log = logging.getLogger("torch.export")
        level = export_log.level
        export_log.setLevel(logging.ERROR)
        try:
            with open(self.path, "rb") as f:
                program = torch.export.load(f, extra_files=extra)
        except Exception as exc:  # a zip or pickle error of any kind: one line naming the file
            raise CheckpointError(f"{self.path}: not a readable torch.export program ({first_line(exc)})") from None
        finally:
            export_log.setLevel(level)
        self.metadata = {k: v for k, v in extra.items() if v}
        self.module = program.module().to(device)

    def to(self, device: torch.device | str) -> "ExportedProgramModel":
        self.module = self.module.to(device)
        return self

    def eval(self) -> "ExportedProgramModel":
        return self

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(OUTPUT_NAMES, self.module(images), strict=True))

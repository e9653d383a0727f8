"""Semantic segmentation metrics (mIoU, pixel accuracy) from a confusion matrix, reducible across ranks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def _as_label_map(x: Any, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.dtype == np.bool_ or x.dtype.kind not in "iu":
        raise ValueError(f"{what} label map must have an integer dtype, got {x.dtype}")
    return x.astype(np.int64, copy=False)


class ConfusionMatrix:
    """``num_classes × (num_classes + 1)`` pixel counts: rows are GT classes, columns predicted classes.

    GT pixels equal to ``ignore_index`` are skipped; any other GT value outside ``[0, num_classes)`` is an error.
    A prediction outside ``[0, num_classes)`` (e.g. void for pixels no segment claimed) goes to the extra last
    column: it counts as a miss for the GT class and as no class's false positive.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, class_names: list[str] | None = None) -> None:
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = class_names
        self.matrix = np.zeros((num_classes, num_classes + 1), dtype=np.int64)

    def reset(self) -> None:
        self.matrix[...] = 0

    def update(self, gt: Any, pred: Any) -> None:
        """Add one label map pair (any matching shapes, e.g. ``H×W`` or ``B×H×W``)."""
        g = _as_label_map(gt, "ground-truth")
        p = _as_label_map(pred, "predicted")
        if g.shape != p.shape:
            raise ValueError(f"ground-truth label map has shape {g.shape} but the prediction has {p.shape}")
        keep = g != self.ignore_index
        g, p = g[keep], p[keep]
        if g.size and (g.min() < 0 or g.max() >= self.num_classes):
            bad = np.unique(g[(g < 0) | (g >= self.num_classes)])[:10].tolist()
            raise ValueError(f"ground-truth labels {bad} are outside [0, {self.num_classes}) and are not "
                             f"ignore_index={self.ignore_index}")
        k = self.num_classes
        p = np.where((p >= 0) & (p < k), p, k)
        self.matrix += np.bincount(g * (k + 1) + p, minlength=k * (k + 1)).reshape(k, k + 1)

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        if other.matrix.shape != self.matrix.shape:
            raise ValueError(f"cannot merge confusion matrices of shapes {self.matrix.shape} and "
                             f"{other.matrix.shape}")
        self.matrix += other.matrix
        return self

    def all_reduce(self, group: Any = None) -> "ConfusionMatrix":
        """Sum the matrix over the ranks of ``group`` in place (no-op without torch.distributed)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        device = torch.device("cpu")
        if dist.get_backend(group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        t = torch.from_numpy(self.matrix.copy()).to(device)
        dist.all_reduce(t, group=group)
        self.matrix[...] = t.cpu().numpy()
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"matrix": torch.from_numpy(self.matrix.copy()), "ignore_index": self.ignore_index}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        m = torch.as_tensor(state["matrix"]).numpy()
        if m.shape != self.matrix.shape:
            raise ValueError(f"state has a {m.shape} confusion matrix, this metric {self.matrix.shape}")
        self.matrix[...] = m

    def compute(self) -> dict[str, Any]:
        """``miou`` (mean over classes present in GT or prediction), ``per_class_iou`` (``None`` for a class
        absent from both), ``pixel_accuracy``; all fractions, 0.0 when nothing was counted."""
        k = self.num_classes
        tp = np.diag(self.matrix[:, :k]).astype(np.float64)
        gt_total = self.matrix.sum(axis=1)
        pred_total = self.matrix[:, :k].sum(axis=0)
        union = gt_total + pred_total - tp
        per_class = [float(tp[c] / union[c]) if union[c] > 0 else None for c in range(k)]
        present = [v for v in per_class if v is not None]
        total = int(gt_total.sum())
        out: dict[str, Any] = {
            "miou": float(np.mean(present)) if present else 0.0,
            "per_class_iou": per_class,
            "pixel_accuracy": float(tp.sum() / total) if total else 0.0,
        }
        if self.class_names is not None:
            out["class_names"] = list(self.class_names)
        return out


SemanticMetrics = ConfusionMatrix

"""Evaluation: exact panoptic quality (panopticapi's rules, in memory), mIoU and COCO instance mask AP.

Metrics take id maps plus COCO-panoptic ``segments_info`` dicts with data-set category ids, accumulate over images,
and reduce across DDP ranks with ``all_reduce``.
"""

from remax.evaluation.instance import InstanceAP
from remax.evaluation.io import id2rgb, read_panoptic_png, rgb2id, write_panoptic_png
from remax.evaluation.panoptic_quality import (
    PanopticQuality,
    format_pq_table,
    normalize_categories,
    pq_compute_files,
)
from remax.evaluation.semantic import ConfusionMatrix, SemanticMetrics

__all__ = [
    "ConfusionMatrix",
    "InstanceAP",
    "PanopticQuality",
    "SemanticMetrics",
    "format_pq_table",
    "id2rgb",
    "normalize_categories",
    "pq_compute_files",
    "read_panoptic_png",
    "rgb2id",
    "write_panoptic_png",
]

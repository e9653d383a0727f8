"""Data: the COCO-panoptic reader, training augmentation, the synthetic data set, converters and the checker.

Every data set is read in COCO-panoptic format (JSON + one PNG per image, id = R + 256·G + 256²·B, 0 = void);
Cityscapes and ADE20K are converted into it once (:mod:`remax.data.cityscapes`, :mod:`remax.data.ade20k`).
"""

from remax.data.coco_panoptic import (
    COCOPanopticDataset,
    DatasetError,
    DatasetPaths,
    dataset_paths,
    paths_from_config,
)
from remax.data.io import id2rgb, read_image, read_panoptic_png, rgb2id, segment_stats, write_panoptic_png
from remax.data.loader import build_dataset, build_train_loader, build_val_loader, collate_panoptic
from remax.data.synthetic import ensure_synthetic_dataset, write_synthetic_dataset
from remax.data.transforms import TrainTransform
from remax.data.validate import Problem, check_dataset, check_root, find_splits, validate_config_data

__all__ = [
    "COCOPanopticDataset",
    "DatasetError",
    "DatasetPaths",
    "Problem",
    "TrainTransform",
    "build_dataset",
    "build_train_loader",
    "build_val_loader",
    "check_dataset",
    "check_root",
    "collate_panoptic",
    "dataset_paths",
    "ensure_synthetic_dataset",
    "find_splits",
    "id2rgb",
    "paths_from_config",
    "read_image",
    "read_panoptic_png",
    "rgb2id",
    "segment_stats",
    "validate_config_data",
    "write_panoptic_png",
    "write_synthetic_dataset",
]

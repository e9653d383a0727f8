"""remax.inference: post-processing (mask-wise merge, semantic, instances), the Predictor and overlays.

>>> from remax.inference import Predictor
>>> predictor = Predictor.from_checkpoint("runs/nano/checkpoints/last.pt")
>>> result = predictor.predict("photo.jpg")      # or a list of paths / PIL images / arrays / tensors
>>> result.id_map, result.segments_info, result.semantic, result.instances
"""

from remax.inference.postprocess import (
    InstancePrediction,
    instance_postprocess,
    panoptic_postprocess,
    semantic_postprocess,
)
from remax.inference.predictor import PredictionResult, Predictor, load_image
from remax.inference.visualize import colorize, overlay_panoptic

__all__ = [
    "InstancePrediction",
    "PredictionResult",
    "Predictor",
    "colorize",
    "instance_postprocess",
    "load_image",
    "overlay_panoptic",
    "panoptic_postprocess",
    "semantic_postprocess",
]

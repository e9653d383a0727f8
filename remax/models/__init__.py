"""remax.models: the kMaX-DeepLab / ReMaX model family (backbone, pixel decoder, kMaX decoder, heads)."""

from remax.models.kmax_deeplab import KMaXDeepLab, build_model, normalize_image
from remax.models.layers import resize_bilinear

__all__ = ["KMaXDeepLab", "build_model", "normalize_image", "resize_bilinear"]

"""remax.models: the kMaX-DeepLab / ReMaX model family (backbone, pixel decoder, kMaX decoder, heads)."""

from remax.models.kmax_deeplab import KMaXDeepLab, build_model, normalize_image
from remax.models.layers import resize_bilinear
from remax.models.remask import ReMaskOptions, remask

__all__ = ["KMaXDeepLab", "ReMaskOptions", "build_model", "normalize_image", "remask", "resize_bilinear"]

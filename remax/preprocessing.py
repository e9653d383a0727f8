"""Pre-processing shared by training, inference and export: resize, normalise, pad.

One home for the steps every path needs, so the training collate, the :class:`~remax.inference.Predictor`, the
exported graphs and the benchmarks feed the network the same tensors. It imports neither ``remax.models`` nor
``remax.data``: data does not depend on the network, and a deployment reads only this module and the exported
file.

The contract (kmax-reference §4): resize so the image fits the model's fixed input with its longer side on it
(aspect kept), map 0..255 to [-1, 1], pad bottom/right with zeros *after* normalising (padding is exactly 0).
``protocol="reference"`` resizes as bytedance/kmax-deeplab does at test time (detectron2's ``ResizeShortestEdge``,
PIL bilinear on uint8).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

PROTOCOLS = ("remax", "reference")


def check_protocol(protocol: str) -> str:
    """The evaluation protocol name, refused early (a typo would otherwise silently select the default)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"eval.protocol must be one of {', '.join(PROTOCOLS)}; got {protocol!r}")
    return protocol


def normalize_image(x: torch.Tensor) -> torch.Tensor:
    """Map RGB values in 0..255 to [-1, 1] (``x / 127.5 - 1``); pad *after* this so padding is exactly 0."""
    return x.float() / 127.5 - 1.0


def resized_shape(height: int, width: int, input_size: tuple[int, int]) -> tuple[int, int]:
    """Size after scaling so the image fits ``input_size`` with its longer side on it (aspect kept).

    A ``k·32+1`` input side is filled up to ``k·32`` and padded by one pixel: the stride-4 mask grid then falls on
    every 4th image pixel exactly, at the scale the training transform uses (``data.resize_longer_side``).
    Stretching to ``k·32+1`` instead would shift the grid against the pixels by up to one pixel across the image.
    """
    fit = tuple(s - 1 if s % 2 == 1 and s > 1 else s for s in input_size)
    scale = min(fit[0] / height, fit[1] / width)
    h = min(fit[0], max(1, round(height * scale)))
    w = min(fit[1], max(1, round(width * scale)))
    if height <= input_size[0] and width <= input_size[1] and abs(h - height) <= 1 and abs(w - width) <= 1:
        # Within a pixel of the fit (640 in 641, Cityscapes 1024×2048 in 1025×2049): padded, never stretched.
        return height, width
    return h, w


def reference_resized_shape(height: int, width: int, input_size: tuple[int, int]) -> tuple[int, int]:
    """Size the reference gives an image at test time: detectron2's ``ResizeShortestEdge`` with the shorter input
    side as the short edge and the longer one as the limit (1281/1281 for COCO, 1025/2049 for Cityscapes).

    Every image is resized, small ones upwards, so the longer side lands on the full input side (128 -> 129, not
    our 128 + 1 pixel of padding). Sides are rounded half up (``int(x + 0.5)``). An image the reference would run
    beyond the fixed input (a portrait photo in the 1025×2049 Cityscapes input) is scaled to fit instead, the
    only way a fixed-size batch can hold it.
    """
    short, longest = min(input_size), max(input_size)
    scale = short / min(height, width)
    new_h, new_w = (short, scale * width) if height < width else (scale * height, short)
    if max(new_h, new_w) > longest:
        shrink = longest / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    h, w = int(new_h + 0.5), int(new_w + 0.5)
    if h > input_size[0] or w > input_size[1]:
        fit = min(input_size[0] / height, input_size[1] / width)
        h = min(input_size[0], max(1, int(height * fit + 0.5)))
        w = min(input_size[1], max(1, int(width * fit + 0.5)))
    return max(1, h), max(1, w)


def reference_crop(height: int, width: int, input_size: tuple[int, int]) -> tuple[int, int]:
    """Region of the padded logits the reference keeps for an ``height×width`` image: each side times
    ``max(input) / max(height, width)``, rounded with Python's ``round`` (half to even).

    This is not always the resized size: a 1024×2048 Cityscapes image is resized to 1025×2049 but 1024 rows are
    kept (``round(1024.5) == 1024``). Reproduced as it is, since it shifts the masks by a fraction of a pixel.
    """
    scale = max(input_size) / max(height, width)
    return (min(input_size[0], max(1, round(height * scale))), min(input_size[1], max(1, round(width * scale))))


def resize_uint8_pil(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 ``3×H×W`` -> uint8 ``3×h×w`` with PIL's bilinear filter, as detectron2's ``ResizeTransform`` does.

    PIL widens its filter when shrinking (an antialiased resize) and rounds to uint8, so the result differs from
    a float ``F.interpolate`` by up to a few grey levels; the reference protocol uses this to match its inputs.
    """
    arr = np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy())
    resized = Image.fromarray(arr).resize((int(size[1]), int(size[0])), Image.BILINEAR)
    return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1).contiguous()


def resize_image(image: torch.Tensor, input_size: tuple[int, int], protocol: str = "remax") -> torch.Tensor:
    """uint8 ``3×H×W`` -> float ``3×h×w`` in 0..255 at the size the protocol gives it inside ``input_size``."""
    if check_protocol(protocol) == "reference":
        h, w = reference_resized_shape(int(image.shape[1]), int(image.shape[2]), input_size)
        x = image if (h, w) == tuple(image.shape[1:]) else resize_uint8_pil(image, (h, w))
        return x.float()
    h, w = resized_shape(int(image.shape[1]), int(image.shape[2]), input_size)
    x = image.unsqueeze(0).float()
    if (h, w) != tuple(image.shape[1:]):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True).clamp(0, 255)
    return x[0]


def pad_batch(images: Sequence[torch.Tensor], input_size: tuple[int, int]) -> torch.Tensor:
    """Normalise float ``3×h×w`` images (0..255) and pad each at the top-left of a zero ``B×3×H_in×W_in`` batch."""
    batch = torch.zeros(len(images), 3, *input_size)
    for i, x in enumerate(images):
        h, w = x.shape[-2:]
        if h > input_size[0] or w > input_size[1]:
            raise ValueError(f"image {i} is {h}×{w}, larger than the model input {input_size[0]}×{input_size[1]}")
        batch[i, :, :h, :w] = normalize_image(x)
    return batch


def preprocess(images: Sequence[torch.Tensor], input_size: tuple[int, int],
               protocol: str = "remax") -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """uint8 ``3×H×W`` images -> normalised, zero-padded ``B×3×H_in×W_in`` batch and each image's resized size.

    ``protocol="reference"`` resizes as the reference does (:func:`reference_resized_shape`, PIL bilinear on
    uint8); the default fits the longer side into the input with a float antialiased resize.
    """
    resized = [resize_image(img, input_size, protocol) for img in images]
    return pad_batch(resized, input_size), [(int(x.shape[1]), int(x.shape[2])) for x in resized]

"""The kMaX pixel decoder (kmax-reference §1.3): a U-Net-like path from stride 32 to stride 4.

Every backbone feature is LayerNorm'd; stage 0 runs on res5, each later stage on the ResizedFuse sum of the
previous stage's output and the next finer skip. Axial blocks at the coarse strides act as the transformer
encoder; bottleneck blocks at the fine strides. Stage outputs at strides 32/16/8 feed the kMaX decoder, the last
one is the panoptic pixel feature.
"""

from __future__ import annotations

from torch import Tensor, nn

from remax.models.blocks import BlockGroup, LayerNorm2d, ResizedFuse

_ORDER = ("res5", "res4", "res3", "res2")  # coarse to fine


class KMaXPixelDecoder(nn.Module):
    """Pixel decoder over ``{"res2".."res5"}`` with per-stage block counts, base widths and block types."""

    def __init__(self, in_channels: dict[str, int], layers: tuple[int, ...], channels: tuple[int, ...],
                 block_types: tuple[str, ...], *, num_heads: int = 8, max_length: int = 255,
                 bn_momentum: float = 0.01, bn_eps: float = 1e-3):
        super().__init__()
        if not (len(layers) == len(channels) == len(block_types) == len(_ORDER)):
            raise ValueError(f"pixel decoder needs 4 stages (strides 32/16/8/4); got layers={layers}, "
                             f"channels={channels}, block_types={block_types}")
        if any(n < 1 for n in layers):
            raise ValueError(f"pixel decoder stage block counts must be >= 1, got {layers}")
        block_kwargs = dict(num_heads=num_heads, max_length=max_length, bn_momentum=bn_momentum, bn_eps=bn_eps)
        self.backbone_norms = nn.ModuleList(LayerNorm2d(in_channels[name]) for name in _ORDER)
        self.stages = nn.ModuleList()
        self.fuses = nn.ModuleList()
        for i, name in enumerate(_ORDER):
            stage_in = in_channels[name] if i == 0 else channels[i]
            self.stages.append(BlockGroup(stage_in, channels[i], layers[i], block_types[i], **block_kwargs))
            if i > 0:
                self.fuses.append(ResizedFuse(4 * channels[i - 1], in_channels[name], channels[i],
                                              bn_momentum=bn_momentum, bn_eps=bn_eps))
        self.out_channels = [4 * c for c in channels]  # stride 32, 16, 8, 4

    def forward(self, features: dict[str, Tensor]) -> tuple[list[Tensor], Tensor]:
        """Returns ([stride-32, stride-16, stride-8 outputs], stride-4 pixel feature)."""
        outs = []
        x = self.stages[0](self.backbone_norms[0](features[_ORDER[0]]))
        outs.append(x)
        for i in range(1, len(_ORDER)):
            skip = self.backbone_norms[i](features[_ORDER[i]])
            x = self.stages[i](self.fuses[i - 1](x, skip))
            outs.append(x)
        return outs[:3], outs[3]

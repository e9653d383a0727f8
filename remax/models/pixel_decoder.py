"""The kMaX pixel decoder (kmax-reference §1.3): a U-Net-like path from stride 32 to stride 4 (or 2).

Every backbone feature is LayerNorm'd; stage 0 runs on res5, each later stage on the ResizedFuse sum of the
previous stage's output and the next finer skip. Axial blocks at the coarse strides act as the transformer
encoder; bottleneck blocks at the fine strides. Stage outputs at strides 32/16/8 feed the kMaX decoder, the last
one is the panoptic pixel feature.

Four stages consume ``res5..res2``. The kMaX Cityscapes configurations add a fifth, high-resolution stage on a
``"stem"`` feature (see :mod:`remax.models.backbones` for which one, and why the reference's sits at stride 4);
the backbone's ``feature_order`` says which skip feeds which stage.
"""

from __future__ import annotations

from torch import Tensor, nn

from remax.models.blocks import BlockGroup, LayerNorm2d, ResizedFuse

DEFAULT_ORDER = ("res5", "res4", "res3", "res2")  # coarse to fine


class KMaXPixelDecoder(nn.Module):
    """Pixel decoder over backbone features with per-stage block counts, base widths and block types.

    ``order`` lists the backbone features coarse to fine, one per stage (``res5`` first); its last stage's output
    is the pixel feature at ``output_stride`` = the smallest stride in ``strides`` (4 unless a stride-2 stem).
    """

    def __init__(self, in_channels: dict[str, int], layers: tuple[int, ...], channels: tuple[int, ...],
                 block_types: tuple[str, ...], *, order: tuple[str, ...] = DEFAULT_ORDER,
                 strides: dict[str, int] | None = None, num_heads: int = 8, max_length: int = 255,
                 bn_momentum: float = 0.01, bn_eps: float = 1e-3):
        super().__init__()
        order = tuple(order)
        if order[:3] != DEFAULT_ORDER[:3] or len(order) not in (4, 5):
            raise ValueError(f"pixel decoder feature order must start res5, res4, res3 and have 4 or 5 stages, "
                             f"got {order}")
        if not (len(layers) == len(channels) == len(block_types) == len(order)):
            raise ValueError(f"pixel decoder needs {len(order)} stages (features {', '.join(order)}); got "
                             f"layers={layers}, channels={channels}, block_types={block_types}")
        if any(n < 1 for n in layers):
            raise ValueError(f"pixel decoder stage block counts must be >= 1, got {layers}")
        missing = [name for name in order if name not in in_channels]
        if missing:
            raise ValueError(f"the backbone gives no {', '.join(missing)} feature for the pixel decoder")
        self.order = order
        strides = strides or {"res5": 32, "res4": 16, "res3": 8, "res2": 4}
        self.output_stride = min(strides[name] for name in order)
        block_kwargs = dict(num_heads=num_heads, max_length=max_length, bn_momentum=bn_momentum, bn_eps=bn_eps)
        self.backbone_norms = nn.ModuleList(LayerNorm2d(in_channels[name]) for name in order)
        self.stages = nn.ModuleList()
        self.fuses = nn.ModuleList()
        for i, name in enumerate(order):
            stage_in = in_channels[name] if i == 0 else channels[i]
            self.stages.append(BlockGroup(stage_in, channels[i], layers[i], block_types[i], **block_kwargs))
            if i > 0:
                self.fuses.append(ResizedFuse(4 * channels[i - 1], in_channels[name], channels[i],
                                              bn_momentum=bn_momentum, bn_eps=bn_eps))
        self.out_channels = [4 * c for c in channels]  # stride 32, 16, 8, then the finer stage(s)

    def forward(self, features: dict[str, Tensor]) -> tuple[list[Tensor], Tensor]:
        """Returns ([stride-32, stride-16, stride-8 outputs], the last stage's pixel feature)."""
        outs = []
        x = self.stages[0](self.backbone_norms[0](features[self.order[0]]))
        outs.append(x)
        for i in range(1, len(self.order)):
            skip = self.backbone_norms[i](features[self.order[i]])
            x = self.stages[i](self.fuses[i - 1](x, skip))
            outs.append(x)
        return outs[:3], outs[-1]

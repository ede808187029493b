"""DeepLabv3 segmentation on an MBConv backbone at output stride 16, with a separable ASPP (SPEC §5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fna.backbone import init_weights
from fna.ops import ConvBNAct

IGNORE_INDEX = 255


class SeparableASPP(nn.Module):
    """ASPP whose 3x3 branches are depthwise-separable (torchvision's ``ASPP`` uses full 3x3 convs).

    Branches: 1x1; three (depthwise 3x3 at ``rates`` → BN → ReLU → 1x1 → BN → ReLU); image pooling
    (global average → 1x1 → BN → ReLU, broadcast back). Concatenated, projected by 1x1 → BN → ReLU,
    dropout. This is the head the paper counts: 755,795 params on a 320-channel input, 19 classes.
    """

    def __init__(self, in_channels: int, channels: int = 256, rates: tuple[int, ...] = (6, 12, 18),
                 dropout: float = 0.1) -> None:
        super().__init__()
        relu = dict(activation="relu")
        self.branches = nn.ModuleList([ConvBNAct(in_channels, channels, 1, **relu)])
        for rate in rates:
            self.branches.append(nn.Sequential(
                ConvBNAct(in_channels, in_channels, 3, dilation=rate, groups=in_channels, **relu),
                ConvBNAct(in_channels, channels, 1, **relu)))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvBNAct(in_channels, channels, 1, **relu))
        self.project = ConvBNAct(channels * (len(rates) + 2), channels, 1, **relu)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [b(x) for b in self.branches]
        outs.append(self.pool(x).expand(-1, -1, *x.shape[-2:]))
        return self.dropout(self.project(torch.cat(outs, dim=1)))


class DeepLabV3(nn.Module):
    """Backbone (one tap, OS16) → separable ASPP → 1x1 classifier → bilinear upsampling to the input size."""

    cost_parts = {"backbone": "backbone", "neck": "aspp", "head": "classifier"}

    def __init__(self, backbone: nn.Module, num_classes: int, aspp_channels: int = 256) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = backbone
        self.aspp = SeparableASPP(list(backbone.out_channels.values())[-1], aspp_channels)
        self.classifier = nn.Conv2d(aspp_channels, num_classes, 1)
        init_weights(self.aspp)
        # Small logits at the start (loss ≈ ln C): a kaiming-initialised classifier starts at loss ~7
        # on 6 classes and spends hundreds of steps just shrinking its outputs.
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel class logits at the input resolution."""
        feats = next(iter(self.backbone(x).values()))
        logits = self.classifier(self.aspp(feats))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    dense_forward = forward

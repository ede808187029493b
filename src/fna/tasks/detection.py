"""Detection heads on an MBConv backbone: RetinaNet (FPN P3–P7) and SSDLite, from torchvision's parts.

Labels are ``0 .. num_classes-1`` for both detectors at our API; SSD's background class 0 is added and
removed inside :class:`SSDLite`.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.ssdlite import SSDLiteHead
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7

from fna.backbone import init_weights
from fna.ops import ConvBNAct

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneFPN(nn.Module):
    """Backbone taps C3–C5 (strides 8/16/32) → FPN (P3–P5) + P6 from C5 + P7 from P6.

    ``body`` is any module returning an ordered dict of 3 maps and with an ``out_channels`` dict.
    """

    def __init__(self, body: nn.Module, out_channels: int = 256) -> None:
        super().__init__()
        self.body = body
        in_channels = list(body.out_channels.values())
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels,
                                         extra_blocks=LastLevelP6P7(in_channels[-1], out_channels))
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(self.body(x))


def retinanet_anchors() -> AnchorGenerator:
    """9 anchors per location: 3 scales (2^0, 2^1/3, 2^2/3) × 3 ratios, base sizes 32..512 on P3..P7."""
    sizes = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in (32, 64, 128, 256, 512))
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))


class FNARetinaNet(RetinaNet):
    """torchvision ``RetinaNet`` on :class:`BackboneFPN` (focal loss γ 2, α 0.25; sigmoid classes)."""

    cost_parts = {"backbone": "backbone.body", "neck": "backbone.fpn", "head": "head"}

    def __init__(self, body: nn.Module, num_classes: int, min_size: int = 800, max_size: int = 1333,
                 **kwargs) -> None:
        backbone = BackboneFPN(body)
        anchors = retinanet_anchors()
        head = RetinaNetHead(backbone.out_channels, anchors.num_anchors_per_location()[0], num_classes)
        super().__init__(backbone, num_classes, min_size=min_size, max_size=max_size, image_mean=IMAGENET_MEAN,
                         image_std=IMAGENET_STD, anchor_generator=anchors, head=head, **kwargs)
        self.num_classes = num_classes

    def dense_forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Head outputs on a normalised batch, without resizing or box decoding."""
        return self.head(list(self.backbone(x).values()))


class SSDLiteFeatures(nn.Module):
    """Backbone taps (expand of the first stride-32 layer, final 1x1 conv) + 4 extra downsampling blocks.

    ``body`` returns an ordered dict of 2 maps, the last of them named ``final``.
    """

    def __init__(self, body: nn.Module, extra_channels: tuple[int, ...] = (512, 256, 256, 128)) -> None:
        super().__init__()
        self.body = body
        norm = dict(activation="relu6", bn_eps=1e-3)
        blocks, c_in = [], list(body.out_channels.values())[-1]
        for c_out in extra_channels:
            mid = c_out // 2
            blocks.append(nn.Sequential(ConvBNAct(c_in, mid, 1, **norm),
                                        ConvBNAct(mid, mid, 3, stride=2, groups=mid, **norm),
                                        ConvBNAct(mid, c_out, 1, **norm)))
            c_in = c_out
        self.extras = nn.ModuleList(blocks)
        init_weights(self.extras)
        self.out_channels = [*self.body.out_channels.values(), *extra_channels]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = self.body(x)
        x = feats["final"]
        for i, block in enumerate(self.extras):
            x = block(x)
            feats[f"extra{i}"] = x
        return feats


class SSDLite(SSD):
    """torchvision ``SSD`` with ``SSDLiteHead`` on :class:`SSDLiteFeatures` (6 maps, anchors [4,6,6,6,4,4])."""

    cost_parts = {"backbone": "backbone.body", "neck": "backbone.extras", "head": "head"}

    def __init__(self, body: nn.Module, num_classes: int, size: int = 320, **kwargs) -> None:
        features = SSDLiteFeatures(body)
        anchors = DefaultBoxGenerator([[2], [2, 3], [2, 3], [2, 3], [2], [2]], min_ratio=0.2, max_ratio=0.95)
        # torchvision's head ends each predictor with a 1x1 conv with bias. The paper's counted model
        # (808,218,304 MAdds / 4,322,988 params on MobileNetV2) ends it with a bias-free conv + BN instead:
        # 206,040 MAdds more and 2,550 params fewer here (0.03% / 0.06%). We keep torchvision's form because
        # BN on the logits trains far worse: on the demo data, 300 AdamW steps gave AP 0.024 with the bias
        # head and 0.004 with the BN head.
        head = SSDLiteHead(features.out_channels, anchors.num_anchors_per_location(), num_classes + 1,
                           nn.BatchNorm2d)
        super().__init__(features, anchors, (size, size), num_classes + 1, image_mean=IMAGENET_MEAN,
                         image_std=IMAGENET_STD, head=head, **kwargs)
        self.num_classes = num_classes

    def forward(self, images, targets=None):
        """torchvision's SSD forward with labels ``0..C-1`` in and out (background handled inside)."""
        if targets is not None:
            targets = [{**t, "labels": t["labels"] + 1} for t in targets]
        out = super().forward(images, targets)
        if not self.training:
            out = [{**d, "labels": d["labels"] - 1} for d in out]
        return out

    def dense_forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Head outputs on a normalised batch, without resizing or box decoding."""
        return self.head(list(self.backbone(x).values()))

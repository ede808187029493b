"""RetinaNet detection (SPEC §5): backbone taps at strides 8/16/32 → FPN P3–P7 → torchvision's head
(focal loss γ 2, α 0.25; sigmoid classes)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7

from fna.backbone import stride_taps
from fna.data import retinanet_train_transforms
from fna.data.base import IMAGENET_MEAN, IMAGENET_STD
from fna.data.transforms import detector_resize_size
from fna.tasks.base import register_task
from fna.tasks.detection import DetectionTask, ExplicitAnchorGenerator, RetinaNetAnchors
from fna.train import TrainConfig


class P6P7(LastLevelP6P7):
    """torchvision's P6 (from C5) and P7 (from P6) block; ``relu=False`` drops the ReLU torchvision applies
    between P6 and P7 (mmdet 0.6's RetinaNet, and so the original FNA's, has none)."""

    def __init__(self, in_channels: int, out_channels: int, relu: bool = True) -> None:
        super().__init__(in_channels, out_channels)
        self.relu = relu

    def forward(self, p: list[torch.Tensor], c: list[torch.Tensor], names: list[str]
                ) -> tuple[list[torch.Tensor], list[str]]:
        if self.relu:
            return super().forward(p, c, names)
        p6 = self.p6(p[-1] if self.use_P5 else c[-1])
        p.extend([p6, self.p7(p6)])
        names.extend(["p6", "p7"])
        return p, names


class BackboneFPN(nn.Module):
    """Backbone taps C3–C5 (strides 8/16/32) → FPN (P3–P5) + P6 from C5 + P7 from P6.

    ``body`` is any module returning an ordered dict of 3 maps and with an ``out_channels`` dict.
    ``p7_relu=False``: no ReLU between P6 and P7 (see :class:`P6P7`).
    """

    def __init__(self, body: nn.Module, out_channels: int = 256, p7_relu: bool = True) -> None:
        super().__init__()
        self.body = body
        in_channels = list(body.out_channels.values())
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels,
                                         extra_blocks=P6P7(in_channels[-1], out_channels, p7_relu))
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(self.body(x))


def retinanet_anchors() -> RetinaNetAnchors:
    """9 anchors per location: 3 scales (2^0, 2^1/3, 2^2/3) × 3 ratios, base sizes 32..512 on P3..P7."""
    sizes = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in (32, 64, 128, 256, 512))
    return RetinaNetAnchors(sizes, ((0.5, 1.0, 2.0),) * len(sizes))


class FNARetinaNet(RetinaNet):
    """torchvision ``RetinaNet`` on :class:`BackboneFPN` (focal loss γ 2, α 0.25; sigmoid classes).

    ``anchors`` (a :class:`~fna.tasks.detection.ExplicitAnchorGenerator` spec) replaces torchvision's anchors
    and ``p7_relu=False`` drops the ReLU before P7: both for models imported from the original FNA code
    (:mod:`fna.import_fna`). Other ``kwargs`` go to torchvision's ``RetinaNet`` (thresholds, NMS, top-k).
    """

    cost_parts = {"backbone": "backbone.body", "neck": "backbone.fpn", "head": "head"}

    def __init__(self, body: nn.Module, num_classes: int, min_size: int = 800, max_size: int = 1333,
                 anchors: dict[str, Any] | None = None, p7_relu: bool = True, **kwargs) -> None:
        backbone = BackboneFPN(body, p7_relu=p7_relu)
        anchors = retinanet_anchors() if anchors is None else ExplicitAnchorGenerator(anchors)
        head = RetinaNetHead(backbone.out_channels, anchors.num_anchors_per_location()[0], num_classes)
        super().__init__(backbone, num_classes, min_size=min_size, max_size=max_size, image_mean=IMAGENET_MEAN,
                         image_std=IMAGENET_STD, anchor_generator=anchors, head=head, **kwargs)
        self.num_classes = num_classes

    def dense_forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Head outputs on a normalised batch, without resizing or box decoding."""
        return self.head(list(self.backbone(x).values()))


class RetinaNetTask(DetectionTask):
    """RetinaNet (``retinanet``); ``size`` is (min_size, max_size)."""

    name = "retinanet"
    model = FNARetinaNet
    paper_size = (800, 1088)
    default_size = (800, 1333)
    search_defaults = dict(space="detection", epochs=14, arch_start_epoch=8, weight_steps_per_arch_step=1,
                           batch_size=32, optimizer="sgd", lr=0.02, momentum=0.9, weight_decay=1e-4, clip_grad=35.0,
                           schedule="step", milestones=[8 / 14, 11 / 14], warmup_iters=500, lam=0.02,
                           temperature=1.0)
    paper_costs = {"mobilenet_v2": (133_053_449_976, 11_488_244), "fna_retinanet": (133_029_704_376, 11_732_244)}
    input_rule = "scaled by min(min_size / short side, max_size / long side)"

    def taps(self, arch: Any) -> tuple[str, ...]:
        return stride_taps(arch, (8, 16, 32))

    def model_kwargs(self, size: tuple[int, int] | None = None) -> dict[str, Any]:
        h, w = size or self.default_size
        return {"min_size": h, "max_size": w}

    def network_input(self, size: tuple[int, int], image_hw: tuple[int, int]) -> tuple[int, int]:
        return detector_resize_size(*image_hw, *size)

    def train_transforms(self, size: tuple[int, int], scale: tuple[float, float] = (0.75, 2.0),
                         augment: bool = True) -> Any:
        return retinanet_train_transforms(*size, augment=augment)

    def recipe(self, batch_size: int, iters: int) -> TrainConfig:
        # COCO: batch 32, SGD 0.05, wd 5e-5, ×0.1 at epochs 8 and 11 of 12, clip 35
        return TrainConfig(iters=iters, batch_size=batch_size, lr=0.05 * batch_size / 32, weight_decay=5e-5,
                           warmup_iters=min(500, iters // 10), schedule="step", milestones=[8 / 12, 11 / 12],
                           clip_grad=35.0)

    def default_export_size(self, model_kwargs: dict[str, Any]) -> tuple[int, int]:
        return int(model_kwargs.get("min_size", 800)), int(model_kwargs.get("max_size", 1333))


register_task(RetinaNetTask())

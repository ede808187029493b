"""SSDLite detection (SPEC §5): taps inside the first stride-32 layer (576 channels) and at the final
1x1 conv, four extra downsampling blocks, torchvision's SSDLite head; ``size`` is S×S."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import nn
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.ssdlite import SSDLiteHead

from fna.backbone import init_weights, ssdlite_taps
from fna.data import ssdlite_train_transforms
from fna.data.base import IMAGENET_MEAN, IMAGENET_STD
from fna.ops import ConvBNAct
from fna.tasks.base import register_task
from fna.tasks.detection import DetectionTask, ExplicitAnchorGenerator, SSDAnchors
from fna.train import TrainConfig


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
    """torchvision ``SSD`` with ``SSDLiteHead`` on :class:`SSDLiteFeatures` (6 maps, anchors [4,6,6,6,4,4]).

    For models imported from the original FNA code (:mod:`fna.import_fna`): ``anchors`` (an
    :class:`~fna.tasks.detection.ExplicitAnchorGenerator` spec) replaces torchvision's default boxes,
    ``head_bn_eps`` is the eps of the head's BN, ``image_mean`` / ``image_std`` the normalisation of ``[0, 1]``
    RGB input. Other ``kwargs`` go to torchvision's ``SSD`` (thresholds, NMS, top-k).
    """

    cost_parts = {"backbone": "backbone.body", "neck": "backbone.extras", "head": "head"}

    def __init__(self, body: nn.Module, num_classes: int, size: int = 320, anchors: dict[str, Any] | None = None,
                 head_bn_eps: float = 1e-5, image_mean: Sequence[float] = IMAGENET_MEAN,
                 image_std: Sequence[float] = IMAGENET_STD, **kwargs) -> None:
        features = SSDLiteFeatures(body)
        anchors = (SSDAnchors([[2], [2, 3], [2, 3], [2, 3], [2], [2]], min_ratio=0.2, max_ratio=0.95)
                   if anchors is None else ExplicitAnchorGenerator(anchors))
        # torchvision's head ends each predictor with a 1x1 conv with bias. The paper's counted model
        # (808,218,304 MAdds / 4,322,988 params on MobileNetV2) ends it with a bias-free conv + BN instead:
        # 206,040 MAdds more and 2,550 params fewer here (0.03% / 0.06%). We keep torchvision's form because
        # BN on the logits trains far worse: on the demo data, 300 AdamW steps gave AP 0.024 with the bias
        # head and 0.004 with the BN head.
        head = SSDLiteHead(features.out_channels, anchors.num_anchors_per_location(), num_classes + 1,
                           partial(nn.BatchNorm2d, eps=head_bn_eps))
        super().__init__(features, anchors, (size, size), num_classes + 1, image_mean=list(image_mean),
                         image_std=list(image_std), head=head, **kwargs)
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


class SSDLiteTask(DetectionTask):
    """SSDLite (``ssdlite``); ``size`` is (S, S)."""

    name = "ssdlite"
    model = SSDLite
    paper_size = (320, 320)
    default_size = (320, 320)
    search_defaults = dict(space="detection", epochs=30, arch_start_epoch=15, weight_steps_per_arch_step=5,
                           batch_size=512, optimizer="rmsprop", lr=0.05, rmsprop_eps=1.0, momentum=0.9,
                           weight_decay=4e-5, clip_grad=None, schedule="step",
                           milestones=[18 / 30, 25 / 30, 28 / 30], warmup_iters=500, lam=0.15, temperature=0.9)
    paper_costs = {"mobilenet_v2": (808_218_304, 4_322_988), "fna_ssdlite": (880_333_504, 4_630_316)}
    input_rule = "resized to S×S"

    def taps(self, arch: Any) -> tuple[str, ...]:
        return ssdlite_taps(arch)

    def check_size(self, size: tuple[int, int]) -> None:
        super().check_size(size)
        if size[0] != size[1]:
            raise ValueError(f"SSDLite runs at S×S: give size=[S,S], got {list(size)}")

    def model_kwargs(self, size: tuple[int, int] | None = None) -> dict[str, Any]:
        return {"size": (size or self.default_size)[0]}

    def network_input(self, size: tuple[int, int], image_hw: tuple[int, int]) -> tuple[int, int]:
        return tuple(size)

    def train_transforms(self, size: tuple[int, int], scale: tuple[float, float] = (0.75, 2.0),
                         augment: bool = True) -> Any:
        return ssdlite_train_transforms(size[0], augment)

    def recipe(self, batch_size: int, iters: int) -> TrainConfig:
        # COCO: batch 512, RMSprop 0.2, eps 1, momentum 0.9, wd 4e-5; cosine decay
        return TrainConfig(iters=iters, batch_size=batch_size, optimizer="rmsprop", lr=0.2 * batch_size / 512,
                           weight_decay=4e-5, warmup_iters=iters // 20, schedule="cosine")

    def default_export_size(self, model_kwargs: dict[str, Any]) -> tuple[int, int]:
        s = int(model_kwargs.get("size", 320))
        return s, s


register_task(SSDLiteTask())

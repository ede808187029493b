"""Semantic segmentation: DeepLabv3 at output stride 16 with a separable ASPP (SPEC §5), on Cityscapes,
VOC or a folder of images and masks, scored by mIoU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fna.backbone import init_weights
from fna.data import open_segmentation, seg_collate, seg_eval_transforms, seg_train_transforms
from fna.data.base import IGNORE_INDEX
from fna.evaluate import EvalConfig, evaluate_segmentation
from fna.ops import ConvBNAct
from fna.parity import Parity, compare_segmentation
from fna.tasks.base import Task, register_task
from fna.train import TrainConfig


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
    """Backbone (one tap, OS16) → separable ASPP → 1x1 classifier → bilinear upsampling to the input size.

    ``align_corners`` of the upsampling: ``True`` in the original FNA (TorchSeg) code, see :mod:`fna.import_fna`.
    """

    cost_parts = {"backbone": "backbone", "neck": "aspp", "head": "classifier"}

    def __init__(self, backbone: nn.Module, num_classes: int, aspp_channels: int = 256, dropout: float = 0.1,
                 align_corners: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.align_corners = align_corners
        self.backbone = backbone
        self.aspp = SeparableASPP(list(backbone.out_channels.values())[-1], aspp_channels, dropout=dropout)
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
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=self.align_corners)

    dense_forward = forward


class SegmenterExport(nn.Module):
    """``[0, 1]`` RGB batch → normalise → segmenter → logits at the input size."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model((image - self.mean) / self.std)


class SegmentationTask(Task):
    """DeepLabv3 segmentation (``seg``): one tap at the last stage, output stride 16."""

    name = "seg"
    model = DeepLabV3
    metric = "mIoU"
    num_classes = 19
    paper_size = (1024, 2048)
    default_size = (769, 769)
    output_stride = 16
    formats = ("cityscapes", "voc", "folder")
    # Not published (SPEC §2); the rationale is in fna.search.loop's module docstring.
    search_defaults = dict(space="segmentation", epochs=40, arch_start_epoch=20, weight_steps_per_arch_step=1,
                           batch_size=16, optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4, clip_grad=35.0,
                           schedule="poly", warmup_iters=200, lam=0.15, temperature=1.0)
    paper_costs = {"mobilenet_v2": (24_521_711_616, 2_567_507), "fna_deeplabv3": (24_174_895_104, 2_466_419)}
    undefined = "undefined: the split has no labelled pixels"
    input_rule = "segmentation runs on whole images"
    preprocessing = "RGB float in [0, 1], normalised by mean/std"
    export_names = (["image"], ["logits"], {"image": {0: "batch", 2: "height", 3: "width"},
                                            "logits": {0: "batch", 2: "height", 3: "width"}})
    collate = staticmethod(seg_collate)

    def taps(self, arch: Any) -> tuple[str, ...]:
        return (f"stage{len(arch.stages) - 1}",)

    def recipe(self, batch_size: int, iters: int) -> TrainConfig:
        # Cityscapes: batch 16, SGD 0.01, wd 5e-4, poly 0.9, 5000-iter warm-up of 100k
        return TrainConfig(iters=iters, batch_size=batch_size, lr=0.01 * batch_size / 16, weight_decay=5e-4,
                           warmup_iters=int(0.05 * iters), schedule="poly")

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Per-pixel cross-entropy of ``(images [B,3,H,W] normalised, masks [B,H,W])``, 255 ignored."""
        images, masks = batch
        return F.cross_entropy(model(images), masks, ignore_index=IGNORE_INDEX)

    def train_transforms(self, size: tuple[int, int], scale: tuple[float, float] = (0.75, 2.0),
                         augment: bool = True) -> Any:
        return seg_train_transforms(size, scale, augment)

    def open_dataset(self, root: str | Path, fmt: str, split: str, train_size: tuple[int, int] | None = None,
                     scale: tuple[float, float] = (0.75, 2.0), skip_bad: bool = False) -> Any:
        transforms = self.train_transforms(train_size, scale) if train_size else seg_eval_transforms()
        return open_segmentation(root, fmt, split, transforms, skip_bad)

    def batch_score(self, model: nn.Module, batch: Any) -> tuple[str, float, float] | None:
        """Pixel accuracy beside predicting the batch's most frequent class everywhere."""
        images, masks = batch
        valid = masks != IGNORE_INDEX
        if not bool(valid.any()):
            return None
        labels = masks[valid]
        accuracy = float((model(images).argmax(1)[valid] == labels).double().mean())
        return "pixel accuracy", accuracy, float(torch.bincount(labels).max()) / labels.numel()

    def evaluate(self, model: nn.Module, dataset: Any, cfg: EvalConfig, device: torch.device | str,
                 class_names: tuple[str, ...], results_path: Path | None = None) -> dict[str, Any]:
        return evaluate_segmentation(model, dataset, len(class_names), class_names, device, cfg.window,
                                     cfg.stride_rate, cfg.flip)

    def exportable(self, model: nn.Module, mean: list[float], std: list[float]) -> nn.Module:
        return SegmenterExport(model, mean, std).eval()

    def export_input(self, images: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(images)

    def compare(self, ref: Any, got: list[np.ndarray], x: torch.Tensor, tolerance: float) -> Parity:
        return compare_segmentation(ref.numpy(), got[0])


register_task(SegmentationTask())

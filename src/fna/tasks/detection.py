"""What both detectors share: COCO / VOC data, torchvision's detection losses, COCO mAP, and the
export of the whole detector (normalisation, resizing, decoding and NMS inside the graph).

Labels are ``0 .. num_classes-1`` at our API for every detector. :class:`ExplicitAnchorGenerator` gives
either detector anchors written as data (e.g. another code base's, see :mod:`fna.import_fna`).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

from fna.data import det_collate, det_eval_transforms, open_detection
from fna.evaluate import AREA_RANGES, EvalConfig, evaluate_detection
from fna.parity import Parity, compare_detections
from fna.tasks.base import Task


class Float32Anchors:
    """Mixin for a torchvision anchor generator: anchors in float32 whatever the feature maps' dtype.

    torchvision's generators take the dtype of the feature maps, which under bf16 autocast (training on
    CUDA) quantises anchor coordinates by up to 4–8 px above 512 / 1024 px, so training would match and
    encode boxes against other anchors than evaluation (float32) decodes with. The generators read only
    the maps' shape, dtype and device, so they get stride-0 float32 views of that shape.
    """

    def forward(self, image_list: ImageList, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        if any(f.dtype != torch.float32 for f in feature_maps):
            feature_maps = [torch.empty((), dtype=torch.float32, device=f.device).expand(f.shape)
                            for f in feature_maps]
        return super().forward(image_list, feature_maps)


class RetinaNetAnchors(Float32Anchors, AnchorGenerator):
    """torchvision's ``AnchorGenerator``, in float32 (:class:`Float32Anchors`)."""


class SSDAnchors(Float32Anchors, DefaultBoxGenerator):
    """torchvision's ``DefaultBoxGenerator``, in float32 (:class:`Float32Anchors`)."""


class ExplicitAnchorGenerator(AnchorGenerator):
    """Anchors as data: per feature level its cell anchors and its stride, in input pixels.

    ``spec = {"cells": [[[x1, y1, x2, y2], ...] per level], "strides": [s, ...]}``: the anchors of level ``l``
    at cell ``(i, j)`` are ``cells[l] + (j·s, i·s, j·s, i·s)``. Unlike torchvision's generator the stride is
    fixed, not ``image size // feature size`` (which differs where a side is not a multiple of it, e.g. P7 of
    a 1088-wide input: 120 instead of 128). Boxes are in continuous coordinates (a box covering pixels
    ``0..w-1`` is ``[0, w]``), as torchvision's box coder expects. Plain data, so it lives in ``model_kwargs``.
    """

    def __init__(self, spec: dict[str, Any]) -> None:
        cells, strides = self.check(spec)
        super().__init__(tuple((1,) * len(c) for c in cells), ((1.0,),) * len(cells))
        self.cell_anchors = [torch.tensor(c, dtype=torch.float32) for c in cells]
        self.strides = strides

    @staticmethod
    def check(spec: Any) -> tuple[list[list[list[float]]], list[int]]:
        """``(cells, strides)`` of a valid spec; :class:`ValueError` naming what is wrong otherwise."""
        if not isinstance(spec, dict) or set(spec) != {"cells", "strides"}:
            raise ValueError("anchors must be {'cells': [...], 'strides': [...]}")
        cells, strides = spec["cells"], spec["strides"]
        if not isinstance(cells, Sequence) or not isinstance(strides, Sequence) or len(cells) != len(strides) \
                or not cells:
            raise ValueError("anchors: 'cells' and 'strides' must be lists of the same, non-zero length")
        for level, (c, s) in enumerate(zip(cells, strides)):
            if isinstance(s, bool) or not isinstance(s, int) or s < 1:
                raise ValueError(f"anchors: stride {s!r} of level {level} is not a whole number >= 1")
            if not c or any(len(box) != 4 or not all(isinstance(v, (int, float)) for v in box) for box in c):
                raise ValueError(f"anchors: level {level} needs a non-empty list of [x1, y1, x2, y2] boxes")
        return [[[float(v) for v in box] for box in c] for c in cells], [int(s) for s in strides]

    def num_anchors_per_location(self) -> list[int]:
        return [len(c) for c in self.cell_anchors]

    def forward(self, image_list: ImageList, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        grid_sizes = [f.shape[-2:] for f in feature_maps]
        dtype, device = torch.float32, feature_maps[0].device  # as Float32Anchors, for the same reason
        strides = [[torch.empty((), dtype=torch.int64, device=device).fill_(s)] * 2 for s in self.strides]
        self.set_cell_anchors(dtype, device)
        anchors = torch.cat(self.grid_anchors(grid_sizes, strides))
        return [anchors for _ in image_list.image_sizes]


class DetectorExport(nn.Module):
    """One ``[0, 1]`` RGB image → the detector's full inference → ``(boxes, scores, labels)`` tensors."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        det = self.model([image])[0]
        return det["boxes"], det["scores"], det["labels"]


class DetectionTask(Task):
    """A torchvision-style detector on COCO-json or VOC-xml data, scored by COCO mAP."""

    metric = "AP"
    num_classes = 80
    formats = ("coco", "voc")
    undefined = "undefined: the split has no annotated boxes"
    preprocessing = "RGB float in [0, 1]; the detector normalises and resizes itself"
    export_names = (["image"], ["boxes", "scores", "labels"], {"image": {1: "height", 2: "width"}})
    collate = staticmethod(det_collate)

    @abstractmethod
    def train_transforms(self, size: tuple[int, int], scale: tuple[float, float] = (0.75, 2.0),
                         augment: bool = True) -> Any:
        """The detector's training pipeline at ``size`` (``scale`` is a segmentation setting)."""

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The sum of torchvision's loss terms on ``(images [3,H,W] in [0, 1], target dicts)``."""
        images, targets = batch
        return sum(model(images, targets).values())

    def open_dataset(self, root: str | Path, fmt: str, split: str, train_size: tuple[int, int] | None = None,
                     scale: tuple[float, float] = (0.75, 2.0), skip_bad: bool = False) -> Any:
        transforms = self.train_transforms(train_size, scale) if train_size else det_eval_transforms()
        return open_detection(root, fmt, split, transforms, skip_bad)

    def batch_score(self, model: nn.Module, batch: Any) -> tuple[str, float, float] | None:
        """Recall of the batch's boxes (same label, IoU ≥ 0.5, among the detector's outputs) beside 0, the
        recall of predicting nothing."""
        images, targets = batch
        found = total = 0
        for out, target in zip(model(images), targets):
            total += len(target["boxes"])
            if len(target["boxes"]) and len(out["boxes"]):
                same = target["labels"][:, None] == out["labels"][None, :]
                hit = (box_iou(target["boxes"], out["boxes"]) >= 0.5) & same
                found += int(hit.any(1).sum())
        return ("recall@IoU0.5", found / total, 0.0) if total else None

    def evaluate(self, model: nn.Module, dataset: Any, cfg: EvalConfig, device: torch.device | str,
                 class_names: tuple[str, ...], results_path: Path | None = None) -> dict[str, Any]:
        return evaluate_detection(model, dataset, device, cfg.batch_size, results_path)

    def metric_lines(self, metrics: dict[str, Any]) -> list[str]:
        """As :meth:`Task.metric_lines`; APs/APm/APl undefined on a split with boxes: none of that size."""
        defined = any(v is not None for k, v in metrics.items() if k not in AREA_RANGES and not isinstance(v, dict))
        return [f"{name}: undefined: the split has no boxes of this size"
                if value is None and name in AREA_RANGES and defined else f"{name}: {self.format_metric(value)}"
                for name, value in metrics.items() if not isinstance(value, dict)]

    def exportable(self, model: nn.Module, mean: list[float], std: list[float]) -> nn.Module:
        return DetectorExport(model).eval()

    def compare(self, ref: Any, got: list[np.ndarray], x: torch.Tensor, tolerance: float) -> Parity:
        return compare_detections([t.numpy() for t in ref], got, max(x.shape[-2:]), tolerance)

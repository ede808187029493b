"""Task models: what the backbone is adapted to, one entry per task with the paper's defaults.

A task model is assembled from a backbone *module* (our :class:`~fna.backbone.Backbone`, or the super
network during search) and task parts. :class:`TaskSpec` says which feature taps a task needs and at
which output stride, so every backbone of an architecture is built the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fna.arch import Arch
from fna.errors import FnaError
from fna.backbone import Backbone, Classifier, ssdlite_taps, stride_taps
from fna.tasks.detection import FNARetinaNet, SSDLite
from fna.tasks.segmentation import IGNORE_INDEX, DeepLabV3


@dataclass(frozen=True)
class TaskSpec:
    """A task: model from (backbone, num_classes), the taps it needs, and the paper's sizes."""

    name: str
    head: Callable[[nn.Module, int], nn.Module]
    taps: Callable[[Arch], tuple[str, ...]]
    num_classes: int
    paper_size: tuple[int, int]
    output_stride: int | None = None

    def backbone(self, arch: Arch) -> Backbone:
        """This task's backbone for ``arch`` (fresh weights)."""
        return Backbone(arch, taps=self.taps(arch), output_stride=self.output_stride)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The training loss of ``model`` (in train mode) on one collated batch.

        Dense tasks take ``(images [B,3,H,W] normalised, targets [B] or [B,H,W])``; detectors take
        ``(list of images [3,H,W] in [0, 1], list of target dicts with boxes and labels)`` and sum
        torchvision's loss terms.
        """
        images, targets = batch
        if self.name in ("seg", "cls"):
            return nn.functional.cross_entropy(model(images), targets, ignore_index=IGNORE_INDEX)
        return sum(model(images, targets).values())


TASKS: dict[str, TaskSpec] = {
    "cls": TaskSpec("cls", Classifier, lambda a: ("final",), 1000, (224, 224)),
    "seg": TaskSpec("seg", DeepLabV3, lambda a: (f"stage{len(a.stages) - 1}",), 19, (1024, 2048), output_stride=16),
    "retinanet": TaskSpec("retinanet", FNARetinaNet, lambda a: stride_taps(a, (8, 16, 32)), 80, (800, 1088)),
    "ssdlite": TaskSpec("ssdlite", SSDLite, ssdlite_taps, 80, (320, 320)),
}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise FnaError(f"unknown task {name!r}: expected one of {', '.join(TASKS)}")
    return TASKS[name]


def build_model(task: str, arch: Arch, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """The task's model on ``arch`` with fresh weights (``num_classes`` defaults to the paper's).

    ``kwargs`` go to the task model (e.g. ``min_size``/``max_size`` for RetinaNet, ``size`` for SSDLite).
    """
    spec = get_task(task)
    return spec.head(spec.backbone(arch), num_classes or spec.num_classes, **kwargs)

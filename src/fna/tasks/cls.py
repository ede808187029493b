"""ImageNet classification (``cls``): the seed's own task, here to count a classifier's MAdds and
params (SPEC §6: MobileNetV2 300.8M MAdds at 224×224) and to check seeds; it reads no datasets."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fna.backbone import Classifier
from fna.tasks.base import Task, register_task


class ClassificationTask(Task):
    """Backbone → global average pool → linear (the seed's ImageNet head)."""

    name = "cls"
    model = Classifier
    metric = "top1"
    num_classes = 1000
    paper_size = (224, 224)
    default_size = (224, 224)
    paper_costs = {"mobilenet_v2": (300_774_272, 3_504_872)}

    def taps(self, arch: Any) -> tuple[str, ...]:
        return ("final",)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(model(images), labels)


register_task(ClassificationTask())

"""Training and evaluation transforms (torchvision.transforms.v2 on tv_tensors) and collate functions.

Segmentation transforms take and return ``(image, mask)`` and end with ImageNet normalisation (the same
at train and eval). Detection transforms take and return ``(image, target)``, keep boxes and per-box
fields aligned with the image, and output float images in ``[0, 1]``: both detectors normalise (and
resize) inside torchvision's detector transform. Detection eval keeps the original size so that
predictions come back in the dataset's own coordinates.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from fna.data.base import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD

PER_BOX_KEYS = ("labels", "iscrowd", "difficult")


class RandomScale(v2.Transform):
    """Resize by a factor drawn uniformly from ``scale`` (images bilinear, masks nearest, boxes scaled)."""

    def __init__(self, scale: tuple[float, float]) -> None:
        super().__init__()
        self.scale = scale

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = next(F.get_size(x) for x in flat_inputs if isinstance(x, (tv_tensors.Image, tv_tensors.Mask)))
        s = float(torch.empty(()).uniform_(*self.scale))
        return {"size": [max(1, round(h * s)), max(1, round(w * s))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, params["size"], antialias=True)


def detector_resize_size(h: int, w: int, min_size: int, max_size: int) -> tuple[int, int]:
    """The size torchvision's ``GeneralizedRCNNTransform`` resizes an ``h``×``w`` image to:
    ``scale = min(min_size / short side, max_size / long side)``, each side ``floor(side · scale)``.

    So the short side becomes ``min_size`` unless the long side would pass ``max_size``; a square size
    (``min_size == max_size``) fits the long side to it.
    """
    scale = min(min_size / min(h, w), max_size / max(h, w))
    return max(1, math.floor(h * scale)), max(1, math.floor(w * scale))


class ResizeWithin(v2.Transform):
    """Resize keeping the ratio by :func:`detector_resize_size` (what RetinaNet does at inference)."""

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        if min(min_size, max_size) < 1:
            raise ValueError(f"min_size and max_size must be >= 1, got {min_size}, {max_size}")
        self.min_size, self.max_size = min_size, max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = next(F.get_size(x) for x in flat_inputs if isinstance(x, (tv_tensors.Image, tv_tensors.Mask)))
        return {"size": list(detector_resize_size(h, w, self.min_size, self.max_size))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, params["size"], antialias=True)


def normalize() -> v2.Compose:
    """uint8 image → float, ImageNet mean/std (masks untouched)."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def seg_train_transforms(crop: tuple[int, int] = (769, 769), scale: tuple[float, float] = (0.75, 2.0),
                         augment: bool = True) -> v2.Compose:
    """Random scale, random ``crop`` (h, w) padding the image with 0 and the mask with 255, flip, normalise.

    ``augment=False``: the crop alone (at a random place, so batches keep one size), no scaling or flip.
    """
    crop_t = v2.RandomCrop(crop, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX})
    if not augment:
        return v2.Compose([crop_t, normalize()])
    return v2.Compose([RandomScale(scale), crop_t, v2.RandomHorizontalFlip(), normalize()])


def seg_eval_transforms() -> v2.Compose:
    """Normalise only (whole image; sliding-window inference is the evaluator's job)."""
    return normalize()


def per_box_fields(inputs: tuple[Tensor, dict]) -> tuple[Tensor, ...]:
    """The target tensors indexed like the boxes, for :class:`v2.SanitizeBoundingBoxes`."""
    target = inputs[1]
    return tuple(target[k] for k in PER_BOX_KEYS if k in target)


def sanitize() -> v2.SanitizeBoundingBoxes:
    """Drop boxes under 1 pixel (or cropped away) together with their labels and flags."""
    return v2.SanitizeBoundingBoxes(labels_getter=per_box_fields)


def retinanet_train_transforms(min_size: int = 800, max_size: int = 1333, augment: bool = True) -> v2.Compose:
    """Resize keeping the ratio (short side ``min_size``, long side at most ``max_size``; any pair, e.g.
    square ``128, 128``, by the detector's own rule :func:`detector_resize_size`), flip, to [0, 1].
    ``augment=False``: no flip."""
    return v2.Compose([
        ResizeWithin(min_size, max_size),
        *([v2.RandomHorizontalFlip()] if augment else []),
        sanitize(),
        v2.ToDtype(torch.float32, scale=True),
    ])


def ssdlite_train_transforms(size: int = 320, augment: bool = True) -> v2.Compose:
    """SSD augmentation: photometric distortion, zoom-out (mean fill), IoU crop, flip, resize to
    ``size``×``size``, drop degenerate boxes, to [0, 1]. ``augment=False``: the resize alone."""
    mean_pixel = [round(255 * m) for m in IMAGENET_MEAN]
    augmentation = [
        v2.RandomPhotometricDistort(p=1.0),
        v2.RandomZoomOut(fill={tv_tensors.Image: mean_pixel, "others": 0}),
        v2.RandomIoUCrop(),
        v2.RandomHorizontalFlip(),
    ]
    return v2.Compose([
        *(augmentation if augment else []),
        v2.Resize((size, size), antialias=True),
        sanitize(),
        v2.ToDtype(torch.float32, scale=True),
    ])


def det_eval_transforms() -> v2.ToDtype:
    """To [0, 1] floats at the original size (the detector resizes and maps boxes back)."""
    return v2.ToDtype(torch.float32, scale=True)


def seg_collate(batch: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Stack same-size samples: images ``[B, 3, H, W]``, masks ``[B, H, W]``."""
    images, masks = zip(*batch)
    return torch.stack(images), torch.stack(masks)


def det_collate(batch: list[tuple[Tensor, dict]]) -> tuple[list[Tensor], list[dict]]:
    """Images and targets as lists (sizes and box counts differ), as torchvision detectors take them."""
    images, targets = zip(*batch)
    return list(images), list(targets)

"""Evaluation: mIoU (torchmetrics confusion matrix, whole-image or sliding-window) and COCO mAP (pycocotools).

A metric the split cannot define is ``None`` (``null`` in JSON), never 0.0: mIoU and pixel accuracy of
a split without a labelled pixel, every AP of a split without an annotated (non-crowd) box, and
APs/APm/APl where the split has no box of that size. ``Task.format_metric`` prints it.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools.coco import COCO
from pydantic import BaseModel, ConfigDict, Field, PositiveInt
from pycocotools.cocoeval import COCOeval
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MulticlassConfusionMatrix

from fna.checkpoint import write_text_atomic
from fna.data.base import IGNORE_INDEX
from fna.data.transforms import det_collate

COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
AREA_RANGES = {"APs": (0, 32 ** 2), "APm": (32 ** 2, 96 ** 2), "APl": (96 ** 2, float("inf"))}  # COCO's, inclusive
class EvalConfig(BaseModel):
    """How a split is evaluated: sliding windows and flip for segmentation, the batch of detection."""

    model_config = ConfigDict(extra="forbid")

    window: tuple[PositiveInt, PositiveInt] | None = None  # sliding-window size for segmentation; None: whole image
    stride_rate: float = Field(2 / 3, gt=0, le=1)
    flip: bool = False
    batch_size: int = Field(4, ge=1)


# -- segmentation ----------------------------------------------------------------------------------

def sliding_window_logits(model: nn.Module, image: torch.Tensor, num_classes: int, window: tuple[int, int],
                          stride_rate: float = 2 / 3) -> torch.Tensor:
    """Logits ``[B, C, H, W]`` averaged over overlapping ``window`` crops (zero-padded when smaller)."""
    b, _, h, w = image.shape
    wh, ww = window
    ph, pw = max(wh - h, 0), max(ww - w, 0)
    padded = F.pad(image, (0, pw, 0, ph))
    H, W = padded.shape[-2:]
    sh, sw = max(1, math.ceil(wh * stride_rate)), max(1, math.ceil(ww * stride_rate))
    rows = list(range(0, H - wh, sh)) + [H - wh]
    cols = list(range(0, W - ww, sw)) + [W - ww]
    logits = image.new_zeros(b, num_classes, H, W)
    hits = image.new_zeros(1, 1, H, W)
    for y in rows:
        for x in cols:
            logits[..., y:y + wh, x:x + ww] += model(padded[..., y:y + wh, x:x + ww])
            hits[..., y:y + wh, x:x + ww] += 1
    return (logits / hits)[..., :h, :w]


def predict_logits(model: nn.Module, image: torch.Tensor, num_classes: int, window: tuple[int, int] | None = None,
                   stride_rate: float = 2 / 3, flip: bool = False) -> torch.Tensor:
    """Whole-image or sliding-window logits, optionally averaged with the horizontally flipped image."""
    def run(x: torch.Tensor) -> torch.Tensor:
        return sliding_window_logits(model, x, num_classes, window, stride_rate) if window else model(x)

    logits = run(image)
    if flip:
        logits = (logits + run(image.flip(-1)).flip(-1)) / 2
    return logits


def iou_from_confusion(confusion: torch.Tensor) -> torch.Tensor:
    """Per-class IoU = TP / (TP + FP + FN); NaN for a class absent from both prediction and ground truth."""
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, dataset: Dataset, num_classes: int, class_names: tuple[str, ...] = (),
                          device: str | torch.device = "cpu", window: tuple[int, int] | None = None,
                          stride_rate: float = 2 / 3, flip: bool = False) -> dict:
    """mIoU (mean over classes present in prediction or ground truth), per-class IoU and pixel accuracy.

    ``dataset`` yields normalised images and masks (255 ignored) at full resolution, one at a time.
    """
    model.eval().to(device)
    # Every process scores the whole dataset with its own model: torchmetrics' default sum over ranks under
    # torchrun would mix the ranks' models (their BN statistics differ after DDP training) into the metric.
    confusion = MulticlassConfusionMatrix(num_classes, ignore_index=IGNORE_INDEX, sync_on_compute=False).to(device)
    for image, mask in DataLoader(dataset, batch_size=1):
        image, mask = image.to(device), mask.to(device)
        logits = predict_logits(model, image, num_classes, window, stride_rate, flip)
        confusion.update(logits.argmax(1), mask)
    matrix = confusion.compute().cpu()
    iou = iou_from_confusion(matrix)
    names = class_names or tuple(str(i) for i in range(num_classes))
    labelled = bool(matrix.sum() > 0)  # else every class is NaN and no mean is defined
    return {"mIoU": float(np.nanmean(iou.numpy())) if labelled else None,
            "pixel_accuracy": float(matrix.diag().sum() / matrix.sum()) if labelled else None,
            "per_class_iou": {n: (None if math.isnan(v) else round(float(v), 6)) for n, v in zip(names, iou)}}


# -- detection ---------------------------------------------------------------------------------------

def coco_ground_truth(dataset: Dataset) -> tuple[COCO, list[int]]:
    """The dataset's own COCO json when it has one, else a COCO object built from its annotations.

    Returns it with the label → category id list. Built ground truth marks VOC ``difficult`` boxes as
    crowd, so they neither count as misses nor as false positives.
    """
    if getattr(dataset, "ann_file", None) is not None:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(dataset.ann_file)), list(dataset.label_to_cat_id)
    images, annotations = [], []
    for item in dataset.items:
        images.append({"id": item.image_id, "width": item.width, "height": item.height})
        for box, label, flag in zip(item.boxes, item.labels, item.flags):
            x0, y0, x1, y1 = box
            annotations.append({"id": len(annotations) + 1, "image_id": item.image_id, "category_id": label + 1,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                                "iscrowd": int(flag)})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations,
                  "categories": [{"id": i + 1, "name": n} for i, n in enumerate(dataset.class_names)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt, [i + 1 for i in range(len(dataset.class_names))]


def annotated_boxes(gt: COCO, image_ids: list[int]) -> list[dict]:
    """The ground-truth annotations on ``image_ids`` that count (not crowd, not VOC difficult)."""
    return [a for i in image_ids for a in gt.imgToAnns.get(i, []) if not a.get("iscrowd", 0)]


def coco_map(gt: COCO, results: list[dict], image_ids: list[int]) -> dict:
    """COCO box AP/AP50/AP75/APs/APm/APl of ``results`` (COCO results-json entries) on ``image_ids``.

    ``None`` where the split holds no box to score (at all, or of that size range).
    """
    boxes = annotated_boxes(gt, image_ids)
    if not boxes:
        return {k: None for k in COCO_STATS}
    if not results:  # pycocotools cannot load an empty result list: nothing found scores 0 where defined
        areas = [float(a.get("area", 0)) for a in boxes]
        return {k: 0.0 if k not in AREA_RANGES or any(AREA_RANGES[k][0] <= a <= AREA_RANGES[k][1] for a in areas)
                else None for k in COCO_STATS}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        ev.params.imgIds = list(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: None if v < 0 else float(v) for k, v in zip(COCO_STATS, ev.stats[:6])}  # -1: no box to score


@torch.no_grad()
def predict_detections(model: nn.Module, dataset: Dataset, label_to_cat_id: list[int],
                       device: str | torch.device = "cpu", batch_size: int = 4) -> list[dict]:
    """Run a detector over ``dataset`` (images in [0, 1] at their own size) → COCO results entries."""
    model.eval().to(device)
    results = []
    for images, targets in DataLoader(dataset, batch_size=batch_size, collate_fn=det_collate):
        outputs = model([im.to(device) for im in images])
        for target, out in zip(targets, outputs):
            for box, score, label in zip(out["boxes"].tolist(), out["scores"].tolist(), out["labels"].tolist()):
                x0, y0, x1, y1 = box
                results.append({"image_id": int(target["image_id"]), "category_id": label_to_cat_id[label],
                                "bbox": [round(v, 3) for v in (x0, y0, x1 - x0, y1 - y0)], "score": round(score, 5)})
    return results


def evaluate_detection(model: nn.Module, dataset: Dataset, device: str | torch.device = "cpu",
                       batch_size: int = 4, results_path: str | Path | None = None) -> dict:
    """COCO mAP of ``model`` on ``dataset``, scored against the dataset's own annotations.

    With ``results_path`` the detections are also written as a COCO results json.
    """
    gt, label_to_cat = coco_ground_truth(dataset)
    results = predict_detections(model, dataset, label_to_cat, device, batch_size)
    if results_path is not None:
        write_text_atomic(results_path, json.dumps(results))
    return coco_map(gt, results, dataset.image_ids)

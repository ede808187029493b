"""Datasets, transforms and the demo generator: everything between files on disk and a batch.

Segmentation: :class:`CityscapesSegmentation`, :class:`VOCSegmentation`, :class:`FolderSegmentation`
(:func:`open_segmentation`). Detection: :class:`CocoDetection`, :class:`VOCDetection`
(:func:`open_detection`). Bad files raise :class:`DataError` naming them, or are recorded in
``dataset.skipped`` with ``skip_bad=True``.
"""

from fna.data.base import IGNORE_INDEX, DataError
from fna.data.detection import VOC_DET_CLASSES, CocoDetection, DetectionDataset, VOCDetection, open_detection
from fna.data.segmentation import (CITYSCAPES_CLASSES, VOC_SEG_CLASSES, CityscapesSegmentation, FolderSegmentation,
                                   SegmentationDataset, VOCSegmentation, open_segmentation)
from fna.data.split import split_by_image
from fna.data.transforms import (det_collate, det_eval_transforms, retinanet_train_transforms, seg_collate,
                                 seg_eval_transforms, seg_train_transforms, ssdlite_train_transforms)

__all__ = [
    "IGNORE_INDEX", "DataError", "VOC_DET_CLASSES", "CocoDetection", "DetectionDataset", "VOCDetection",
    "open_detection", "CITYSCAPES_CLASSES", "VOC_SEG_CLASSES", "CityscapesSegmentation", "FolderSegmentation",
    "SegmentationDataset", "VOCSegmentation", "open_segmentation", "split_by_image", "det_collate",
    "det_eval_transforms", "retinanet_train_transforms", "seg_collate", "seg_eval_transforms",
    "seg_train_transforms", "ssdlite_train_transforms",
]

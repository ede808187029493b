"""Semantic segmentation datasets: Cityscapes, Pascal VOC and a generic folder of images + masks.

Each item is ``(image, mask)``: :class:`tv_tensors.Image` ``uint8 [3, H, W]`` and
:class:`tv_tensors.Mask` ``int64 [H, W]`` with ids ``0 .. num_classes-1`` and ``255`` = ignore, before
``transforms(image, mask)``. Construction checks that every image has its mask; loading checks the
mask's mode, size and ids (see :mod:`fna.data.base`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from torchvision import tv_tensors

from fna.data.base import (IGNORE_INDEX, IMAGE_SUFFIXES, DataError, ItemDataset, as_tensor_mask, read_image,
                           read_label_png, require_file)

CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                      "motorcycle", "bicycle")
# Cityscapes labelId → trainId of the 19 evaluated classes; the other labelIds of 0..33 are ignored (255).
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                        25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
CITYSCAPES_LABEL_IDS = 34

VOC_SEG_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
                   "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
                   "train", "tvmonitor")


def identity_lut(num_classes: int) -> np.ndarray:
    """Id lookup table keeping ``0 .. num_classes-1`` and 255; every other id is invalid (-1)."""
    lut = np.full(256, -1, dtype=np.int64)
    lut[:num_classes] = np.arange(num_classes)
    lut[IGNORE_INDEX] = IGNORE_INDEX
    return lut


def cityscapes_lut() -> np.ndarray:
    """labelId → trainId table: 19 classes, other labelIds of 0..33 → 255, ids above 33 invalid (-1)."""
    lut = np.full(256, -1, dtype=np.int64)
    lut[:CITYSCAPES_LABEL_IDS] = IGNORE_INDEX
    for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
        lut[label_id] = train_id
    return lut


class SegmentationDataset(ItemDataset):
    """``(image path, mask path)`` pairs with class names and a raw-id → class-id lookup table."""

    ignore_index = IGNORE_INDEX

    def __init__(self, root: Path, pairs: list[tuple[Path, Path]], class_names: tuple[str, ...],
                 lut: np.ndarray, valid_ids: str, transforms: Callable | None, skip_bad: bool) -> None:
        super().__init__(root, transforms, skip_bad)
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        self._lut = lut
        self._valid_ids = valid_ids
        self.keep_good([((img, mask), require_file(img, "image file")
                          or require_file(mask, f"mask for image {img.name}")) for img, mask in pairs])

    def load(self, item: tuple[Path, Path]) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        image_path, mask_path = item
        image = read_image(image_path)
        raw = read_label_png(mask_path)
        if raw.shape != tuple(image.shape[-2:]):
            raise DataError(mask_path, f"mask is {raw.shape[1]}x{raw.shape[0]} but image {image_path.name} is "
                                       f"{image.shape[-1]}x{image.shape[-2]}")
        inside = (raw >= 0) & (raw < len(self._lut))
        ids = np.where(inside, self._lut[np.where(inside, raw, 0)], -1)
        if (ids < 0).any():
            bad = np.unique(raw[ids < 0])
            raise DataError(mask_path, f"mask holds ids {bad[:10].tolist()} outside the classes "
                                       f"(valid: {self._valid_ids})")
        return image, as_tensor_mask(ids)


class CityscapesSegmentation(SegmentationDataset):
    """``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` + ``gtFine/{split}/{city}/*_gtFine_labelIds.png``."""

    def __init__(self, root: str | Path, split: str = "train", transforms: Callable | None = None,
                 skip_bad: bool = False) -> None:
        root = Path(root)
        image_dir = root / "leftImg8bit" / split
        if not image_dir.is_dir():
            raise DataError(image_dir, f"Cityscapes split folder {split!r} not found")
        pairs = [(p, root / "gtFine" / split / p.parent.name / p.name.replace("_leftImg8bit.png",
                                                                              "_gtFine_labelIds.png"))
                 for p in sorted(image_dir.glob("*/*_leftImg8bit.png"))]
        super().__init__(root, pairs, CITYSCAPES_CLASSES, cityscapes_lut(),
                         f"Cityscapes labelIds 0..{CITYSCAPES_LABEL_IDS - 1}", transforms, skip_bad)


def read_split_file(path: Path) -> list[str]:
    """Non-empty, stripped lines of a split file (one image stem per line)."""
    if not path.is_file():
        raise DataError(path, "split file not found")
    return [line.split()[0] for line in read_text(path, "split file").splitlines() if line.strip()]


def read_text(path: Path, what: str) -> str:
    """The UTF-8 text of ``path``; :class:`DataError` naming ``what`` if it is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, f"{what} is not UTF-8 text (byte {e.start})") from None


class VOCSegmentation(SegmentationDataset):
    """Pascal VOC: ``JPEGImages/*.jpg``, palette ``SegmentationClass/*.png`` (255 = boundary, ignored),
    ``ImageSets/Segmentation/{split}.txt``; 21 classes with background 0."""

    def __init__(self, root: str | Path, split: str = "train", transforms: Callable | None = None,
                 skip_bad: bool = False) -> None:
        root = Path(root)
        stems = read_split_file(root / "ImageSets" / "Segmentation" / f"{split}.txt")
        pairs = [(root / "JPEGImages" / f"{s}.jpg", root / "SegmentationClass" / f"{s}.png") for s in stems]
        super().__init__(root, pairs, VOC_SEG_CLASSES, identity_lut(len(VOC_SEG_CLASSES)),
                         "0..20 and 255", transforms, skip_bad)


def read_class_names(path: Path) -> tuple[str, ...]:
    """Class names, one per line (line i is class id i)."""
    if not path.is_file():
        raise DataError(path, "class-name file not found")
    names = tuple(line.strip() for line in read_text(path, "class-name file").splitlines() if line.strip())
    if not names:
        raise DataError(path, "class-name file is empty")
    if len(names) > IGNORE_INDEX:
        raise DataError(path, f"{len(names)} classes; at most {IGNORE_INDEX} fit in 8-bit masks with 255 ignore")
    return names


class FolderSegmentation(SegmentationDataset):
    """A folder ``root`` with ``classes.txt`` and images + same-stem single-channel PNG masks.

    Split layouts, tried in order: ``images/{split}/`` + ``masks/{split}/``; ``images/`` + ``masks/`` with
    the split's stems in ``{split}.txt``; with ``split=None``, every image in ``images/``.
    Mask ids are class ids (line number in ``classes.txt``); 255 is ignored.
    """

    def __init__(self, root: str | Path, split: str | None = None, transforms: Callable | None = None,
                 skip_bad: bool = False, classes_file: str = "classes.txt") -> None:
        root = Path(root)
        names = read_class_names(root / classes_file)
        image_dir, mask_dir = root / "images", root / "masks"
        if split is not None and (image_dir / split).is_dir():
            image_dir, mask_dir = image_dir / split, mask_dir / split
            images = list_images(image_dir)
        elif split is not None:
            if not (root / f"{split}.txt").is_file():
                raise DataError(root, f"split {split!r}: neither images/{split}/ nor {split}.txt found")
            stems = read_split_file(root / f"{split}.txt")
            by_stem = {p.stem: p for p in list_images(image_dir)}
            images = [by_stem.get(s, image_dir / f"{s}.png") for s in stems]
        else:
            images = list_images(image_dir)
        pairs = [(p, mask_dir / f"{p.stem}.png") for p in images]
        super().__init__(root, pairs, names, identity_lut(len(names)), f"0..{len(names) - 1} and 255",
                         transforms, skip_bad)


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name."""
    if not folder.is_dir():
        raise DataError(folder, "image folder not found")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


SEG_FORMATS = {"cityscapes": CityscapesSegmentation, "voc": VOCSegmentation, "folder": FolderSegmentation}


def open_segmentation(root: str | Path, format: str, split: str | None, transforms: Callable | None = None,
                      skip_bad: bool = False) -> SegmentationDataset:
    """The segmentation dataset of ``format`` (cityscapes | voc | folder) at ``root``."""
    if format not in SEG_FORMATS:
        raise DataError(root, f"unknown segmentation format {format!r}: expected one of {', '.join(SEG_FORMATS)}")
    return SEG_FORMATS[format](root, split, transforms=transforms, skip_bad=skip_bad)

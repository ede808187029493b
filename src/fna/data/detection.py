"""Detection datasets: COCO json and Pascal VOC xml.

Each item is ``(image, target)`` with image :class:`tv_tensors.Image` ``uint8 [3, H, W]`` and target
``{"boxes": BoundingBoxes XYXY float32 [N, 4], "labels": int64 [N] in 0..C-1, "image_id": int}`` plus a
per-box flag: ``"iscrowd"`` (COCO; all 0, crowd regions are left out of training targets) or
``"difficult"`` (VOC, kept). Images without boxes are kept with ``boxes`` of shape ``[0, 4]``.

Construction checks the annotations against the sizes they state (box size > 0, box inside the image
with :data:`BOX_TOLERANCE` pixels of slack, then clipped to it; known categories; image files exist);
loading checks that the image decodes at that size.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torchvision import tv_tensors

from fna.data.base import DataError, ItemDataset, read_image, require_file
from fna.data.segmentation import VOC_SEG_CLASSES, read_split_file

VOC_DET_CLASSES = VOC_SEG_CLASSES[1:]
BOX_TOLERANCE = 1.0


@dataclass
class DetItem:
    """One image's validated annotation: XYXY boxes in pixels, labels and per-box flags."""

    image_id: int
    path: Path
    width: int
    height: int
    boxes: list[list[float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    flags: list[int] = field(default_factory=list)


def clip_box(x0: float, y0: float, x1: float, y1: float, width: int, height: int) -> list[float] | str:
    """An XYXY box clipped to a ``width``×``height`` image, or why it is invalid (a string)."""
    if not (x1 > x0 and y1 > y0):
        return f"non-positive box size {x1 - x0:g}x{y1 - y0:g}"
    t = BOX_TOLERANCE
    clipped = [min(max(x0, 0), width), min(max(y0, 0), height), min(max(x1, 0), width), min(max(y1, 0), height)]
    empty = not (clipped[2] > clipped[0] and clipped[3] > clipped[1])
    if x0 < -t or y0 < -t or x1 > width + t or y1 > height + t or empty:
        return f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) outside the {width}x{height} image"
    return clipped


class DetectionDataset(ItemDataset):
    """:class:`DetItem` list with class names; ``flag_key`` names the per-box flag in targets."""

    flag_key = ""

    def __init__(self, root: Path, class_names: tuple[str, ...], transforms: Callable | None,
                 skip_bad: bool) -> None:
        super().__init__(root, transforms, skip_bad)
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)

    @property
    def image_ids(self) -> list[int]:
        """Ids of the images this dataset yields (after skipping), in order."""
        return [item.image_id for item in self.items]

    def load(self, item: DetItem) -> tuple[tv_tensors.Image, dict]:
        image = read_image(item.path)
        if tuple(image.shape[-2:]) != (item.height, item.width):
            raise DataError(item.path, f"image is {image.shape[-1]}x{image.shape[-2]} but its annotation says "
                                       f"{item.width}x{item.height}")
        boxes = torch.tensor(item.boxes, dtype=torch.float32).reshape(-1, 4)
        target = {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(item.height, item.width)),
                  "labels": torch.tensor(item.labels, dtype=torch.int64),
                  "image_id": item.image_id,
                  self.flag_key: torch.tensor(item.flags, dtype=torch.int64)}
        return image, target


def load_json(path: Path) -> dict:
    """A JSON object from ``path``; :class:`DataError` if missing or malformed."""
    if not path.is_file():
        raise DataError(path, "annotation file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(path, f"malformed JSON ({e})") from None
    except (ValueError, RecursionError) as e:  # json.loads raises these for what it cannot convert
        raise DataError(path, "malformed JSON (" + ("nested too deeply" if isinstance(e, RecursionError)
                                                    else "a number too long to read") + ")") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("categories"), list) or not isinstance(data.get("annotations", []), list):
        raise DataError(path, "malformed COCO json: expected an object with 'images' and 'categories' lists "
                              "(and an 'annotations' list)")
    return data


class CocoDetection(DetectionDataset):
    """COCO instances json + image folder. Category ids map to labels ``0..C-1`` sorted by id.

    For an evaluator: ``ann_file`` (the json to score against), ``label_to_cat_id`` (label → COCO
    category id, for results json) and ``image_ids`` (the images actually yielded).
    """

    flag_key = "iscrowd"

    def __init__(self, images_dir: str | Path, ann_file: str | Path, transforms: Callable | None = None,
                 skip_bad: bool = False) -> None:
        self.images_dir, self.ann_file = Path(images_dir), Path(ann_file)
        data = load_json(self.ann_file)
        try:
            categories = sorted(data["categories"], key=lambda c: int(c["id"]))
            self.label_to_cat_id = [int(c["id"]) for c in categories]
            names = tuple(str(c["name"]) for c in categories)
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise DataError(self.ann_file, f"malformed category entry ({e!r})") from None
        if len(set(self.label_to_cat_id)) < len(self.label_to_cat_id):
            twice = sorted({c for c in self.label_to_cat_id if self.label_to_cat_id.count(c) > 1})
            raise DataError(self.ann_file, f"category ids {twice} are listed more than once")
        super().__init__(self.images_dir, names, transforms, skip_bad)
        self.cat_id_to_label = {c: i for i, c in enumerate(self.label_to_cat_id)}

        candidates: dict[int, tuple[DetItem, DataError | None]] = {}
        for k, rec in enumerate(data["images"]):
            try:
                item = DetItem(int(rec["id"]), self.images_dir / rec["file_name"], int(rec["width"]),
                               int(rec["height"]))
            except (KeyError, TypeError, ValueError, OverflowError) as e:
                raise DataError(self.ann_file, f"malformed image entry #{k} ({e!r})") from None
            if item.image_id in candidates:
                raise DataError(self.ann_file, f"image entry #{k}: image id {item.image_id} is listed more than once")
            missing = require_file(item.path, f"image file (listed in {self.ann_file.name} as image id "
                                              f"{item.image_id})")
            candidates[item.image_id] = (item, missing)
        for k, ann in enumerate(data.get("annotations", [])):
            self._add_annotation(k, ann, candidates)
        self.keep_good(list(candidates.values()))

    def _add_annotation(self, k: int, ann: dict, candidates: dict[int, tuple[DetItem, DataError | None]]) -> None:
        """Validate one annotation and append it to its image, or mark the image bad."""
        try:
            if not isinstance(ann, dict):
                raise TypeError(f"expected an object, got {type(ann).__name__}")
            ann_id, image_id, cat_id = ann.get("id", k), int(ann["image_id"]), int(ann["category_id"])
            x, y, w, h = (float(v) for v in ann["bbox"])
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            self.reject(DataError(self.ann_file, f"malformed annotation #{k} ({e!r})"))
            return
        if image_id not in candidates:
            self.reject(DataError(self.ann_file, f"annotation {ann_id} references image id {image_id}, "
                                                 "which is not in 'images'"))
            return
        item, error = candidates[image_id]
        if error is not None:
            return
        where = f"{self.ann_file}: annotation {ann_id} of image {item.path.name}"
        if cat_id not in self.cat_id_to_label:
            candidates[image_id] = (item, DataError(where, f"unknown category id {cat_id}"))
        elif isinstance(box := clip_box(x, y, x + w, y + h, item.width, item.height), str):
            candidates[image_id] = (item, DataError(where, box))
        elif not ann.get("iscrowd", 0):
            item.boxes.append(box)
            item.labels.append(self.cat_id_to_label[cat_id])
            item.flags.append(0)


class VOCDetection(DetectionDataset):
    """Pascal VOC: ``Annotations/*.xml``, ``JPEGImages/*.jpg``, ``ImageSets/Main/{split}.txt``.

    VOC's 1-based inclusive pixel boxes become 0-based XYXY ``(xmin-1, ymin-1, xmax, ymax)``; labels
    index ``class_names`` (20 classes, no background); ``image_id`` is the line number in the split file.
    """

    flag_key = "difficult"

    def __init__(self, root: str | Path, split: str = "train", transforms: Callable | None = None,
                 skip_bad: bool = False, class_names: tuple[str, ...] = VOC_DET_CLASSES) -> None:
        root = Path(root)
        super().__init__(root, class_names, transforms, skip_bad)
        stems = read_split_file(root / "ImageSets" / "Main" / f"{split}.txt")
        self.keep_good([self._parse(i, stem) for i, stem in enumerate(stems)])

    def _parse(self, image_id: int, stem: str) -> tuple[DetItem | None, DataError | None]:
        """One xml file → its :class:`DetItem`, or the error that makes it bad."""
        xml_path = self.root / "Annotations" / f"{stem}.xml"
        image_path = self.root / "JPEGImages" / f"{stem}.jpg"
        if error := require_file(image_path, "image file") or require_file(xml_path, "annotation file"):
            return None, error
        try:
            tree = ET.parse(xml_path).getroot()
            item = DetItem(image_id, image_path, int(tree.findtext("size/width")),
                           int(tree.findtext("size/height")))
            objects = [(obj.findtext("name", "").strip(), int(obj.findtext("difficult", "0")),
                        [float(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")])
                       for obj in tree.iter("object")]
        except (ET.ParseError, TypeError, ValueError) as e:
            return None, DataError(xml_path, f"malformed VOC annotation ({e})")
        for k, (name, difficult, (x0, y0, x1, y1)) in enumerate(objects):
            if name not in self.class_names:
                return None, DataError(xml_path, f"object {k}: unknown class {name!r}")
            if isinstance(box := clip_box(x0 - 1, y0 - 1, x1, y1, item.width, item.height), str):
                return None, DataError(xml_path, f"object {k} ({name}): {box}")
            item.boxes.append(box)
            item.labels.append(self.class_names.index(name))
            item.flags.append(difficult)
        return item, None


def open_detection(root: str | Path, format: str, split: str, transforms: Callable | None = None,
                   skip_bad: bool = False) -> DetectionDataset:
    """The detection dataset of ``format`` at ``root``.

    ``coco``: ``annotations/instances_{split}.json`` with images in ``images/{split}/`` or else
    ``{split}/`` (the COCO 2017 layout, e.g. split ``val2017``). ``voc``: a ``VOC20xx`` folder.
    """
    root = Path(root)
    if format == "coco":
        images = root / "images" / split
        return CocoDetection(images if images.is_dir() else root / split,
                             root / "annotations" / f"instances_{split}.json", transforms, skip_bad)
    if format == "voc":
        return VOCDetection(root, split, transforms, skip_bad)
    raise DataError(root, f"unknown detection format {format!r}: expected coco or voc")

"""Tiny datasets on disk in every supported layout, with known contents, for the data tests.

Builders are plain functions (``make_*(root) -> root``) so pipeline tests can reuse them; the
pytest fixtures below wrap them with ``tmp_path``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_rgb(path: Path, h: int, w: int, value: int = 0, fmt: str | None = None) -> np.ndarray:
    """A deterministic RGB image (a gradient plus ``value``) written to ``path``; returns its pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:h, 0:w]
    pixels = np.stack([(xx * 10 + value) % 256, (yy * 10 + value) % 256, np.full((h, w), value)], -1).astype(np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return pixels


def write_label(path: Path, ids: np.ndarray, palette: bool = False) -> None:
    """A single-channel label PNG (``L``, or ``P`` with a palette like VOC's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = np.ascontiguousarray(ids, dtype=np.uint8)
    im = Image.frombytes("P" if palette else "L", (ids.shape[1], ids.shape[0]), ids.tobytes())
    if palette:
        im.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    im.save(path)


# Cityscapes: labelIds chosen to cover classes, ignored labelIds and both ends of the table.
CITYSCAPES_IDS = np.array([[7, 26, 0, 33], [24, 4, 11, 23], [1, 8, 17, 31]])
CITYSCAPES_TRAIN = np.array([[0, 13, 255, 18], [11, 255, 2, 10], [255, 1, 5, 16]])


def make_cityscapes(root: Path) -> Path:
    """Two cities in ``train``, one image in ``val``; every mask is :data:`CITYSCAPES_IDS`."""
    for split, city, frame in [("train", "aachen", "000000_000019"), ("train", "bochum", "000001_000019"),
                               ("val", "frankfurt", "000000_000294")]:
        stem = f"{city}_{frame}"
        write_rgb(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", 3, 4)
        write_label(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", CITYSCAPES_IDS)
    return root


VOC_SEG_IDS = np.array([[0, 0, 15, 15], [0, 255, 15, 20], [12, 12, 255, 0]])


def make_voc_seg(root: Path) -> Path:
    """VOC segmentation: ``2007_000001`` (train) and ``2007_000002`` (val) with palette masks."""
    for split, stem in [("train", "2007_000001"), ("val", "2007_000002")]:
        write_rgb(root / "JPEGImages" / f"{stem}.jpg", 3, 4, fmt="JPEG")
        write_label(root / "SegmentationClass" / f"{stem}.png", VOC_SEG_IDS, palette=True)
        (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(stem + "\n")
    return root


FOLDER_IDS = {"a": np.array([[0, 1, 2], [255, 2, 1]]), "b": np.array([[2, 2, 2], [0, 0, 255]])}


def make_folder_seg(root: Path) -> Path:
    """Flat folder layout: 3 classes, images ``a.png`` and ``b.jpg``, split file ``train.txt`` = [a]."""
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("background\nsky\ntree\n")
    write_rgb(root / "images" / "a.png", 2, 3)
    write_rgb(root / "images" / "b.jpg", 2, 3, value=50, fmt="JPEG")
    for stem, ids in FOLDER_IDS.items():
        write_label(root / "masks" / f"{stem}.png", ids)
    (root / "train.txt").write_text("a\n")
    return root


def coco_json(root: Path) -> dict:
    """The COCO fixture's annotation (see :func:`make_coco`); tests edit a copy to make it bad."""
    return json.loads((root / "annotations" / "instances_train.json").read_text())


def write_coco_json(root: Path, data: dict) -> None:
    (root / "annotations" / "instances_train.json").write_text(json.dumps(data))


def make_coco(root: Path) -> Path:
    """COCO layout (``images/train`` + ``annotations/instances_train.json``), 3 images.

    Categories have ids 7, 1, 3 (unsorted) → labels 0 (id 1), 1 (id 3), 2 (id 7). Image 10 (20x16)
    has boxes (2, 3, 5, 4) cat 7 and (0, 0, 20, 16) cat 1, plus a crowd box; image 11 (8x8) has one
    box (1, 1, 2, 2) cat 3; image 12 (8x8) has none.
    """
    for name, (h, w) in [("p.png", (16, 20)), ("q.png", (8, 8)), ("r.png", (8, 8))]:
        write_rgb(root / "images" / "train" / name, h, w)
    data = {
        "images": [{"id": 10, "file_name": "p.png", "width": 20, "height": 16},
                   {"id": 11, "file_name": "q.png", "width": 8, "height": 8},
                   {"id": 12, "file_name": "r.png", "width": 8, "height": 8}],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 7, "bbox": [2, 3, 5, 4], "area": 20, "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 1, "bbox": [0, 0, 20, 16], "area": 320, "iscrowd": 0},
            {"id": 3, "image_id": 10, "category_id": 3, "bbox": [5, 5, 4, 4], "area": 16, "iscrowd": 1},
            {"id": 4, "image_id": 11, "category_id": 3, "bbox": [1, 1, 2, 2], "area": 4, "iscrowd": 0},
        ],
        "categories": [{"id": 7, "name": "cat"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}],
    }
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    write_coco_json(root, data)
    return root


VOC_XML = """<annotation><filename>{stem}.jpg</filename>
<size><width>20</width><height>16</height><depth>3</depth></size>
{objects}</annotation>"""
VOC_OBJECT = """<object><name>{name}</name><difficult>{difficult}</difficult>
<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"""


def write_voc_xml(root: Path, stem: str, objects: list[tuple[str, int, int, int, int, int]]) -> None:
    """``Annotations/{stem}.xml`` for a 20x16 image with objects ``(name, difficult, x0, y0, x1, y1)``."""
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    body = "".join(VOC_OBJECT.format(name=n, difficult=d, x0=a, y0=b, x1=c, y1=e) for n, d, a, b, c, e in objects)
    (root / "Annotations" / f"{stem}.xml").write_text(VOC_XML.format(stem=stem, objects=body))


def make_voc_det(root: Path) -> Path:
    """VOC detection: ``000001`` with a dog (2, 3)-(10, 8) and a difficult person, ``000002`` empty."""
    write_voc_xml(root, "000001", [("dog", 0, 2, 3, 10, 8), ("person", 1, 1, 1, 20, 16)])
    write_voc_xml(root, "000002", [])
    for stem in ("000001", "000002"):
        write_rgb(root / "JPEGImages" / f"{stem}.jpg", 16, 20, fmt="JPEG")
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("000001\n000002\n")
    return root


@pytest.fixture
def cityscapes_root(tmp_path: Path) -> Path:
    return make_cityscapes(tmp_path / "cityscapes")


@pytest.fixture
def voc_seg_root(tmp_path: Path) -> Path:
    return make_voc_seg(tmp_path / "VOC2012")


@pytest.fixture
def folder_root(tmp_path: Path) -> Path:
    return make_folder_seg(tmp_path / "folder")


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    return make_coco(tmp_path / "coco")


@pytest.fixture
def voc_det_root(tmp_path: Path) -> Path:
    return make_voc_det(tmp_path / "VOC2007")

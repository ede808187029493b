"""The demo dataset is deterministic, exact, and loads through the same loaders as user data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from fna.cli import app
from fna.data import open_detection, open_segmentation
from fna.data.demo import CLASSES, make_sample, write_demo
from fna.data.base import DataError
from PIL import Image

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    write_demo(root, n_train=4, n_val=2, size=64, seed=7)
    return root


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_writes_identical_bytes(demo_root, tmp_path):
    write_demo(tmp_path, n_train=4, n_val=2, size=64, seed=7)
    assert _files(tmp_path) == _files(demo_root)


def test_other_seed_writes_other_images(demo_root, tmp_path):
    write_demo(tmp_path, n_train=4, n_val=2, size=64, seed=8)
    name = "images/train/train_00000.png"
    assert (tmp_path / name).read_bytes() != (demo_root / name).read_bytes()


def test_sample_has_several_visible_objects_of_the_five_classes():
    rng = np.random.default_rng(0)
    samples = [make_sample(rng, (96, 80)) for _ in range(12)]
    assert all(s.image.shape == (96, 80, 3) and s.image.dtype == np.uint8 for s in samples)
    assert all(2 <= len(s.classes) <= 6 for s in samples)
    assert {c for s in samples for c in s.classes} == set(range(len(CLASSES)))
    for s in samples:
        assert not np.any(np.sum(s.masks, axis=0) > 1)  # visible masks do not overlap
        assert set(np.unique(s.semantic_mask())) <= set(range(len(CLASSES) + 1))


def test_loads_through_the_coco_loader_with_boxes_on_the_masks(demo_root):
    ds = open_detection(demo_root, "coco", "val")
    assert ds.class_names == CLASSES and ds.label_to_cat_id == [1, 2, 3, 4, 5] and len(ds) == 2
    coco = json.loads(ds.ann_file.read_text())
    for image_id, (image, target) in zip(ds.image_ids, ds):
        assert image.shape == (3, 64, 64)
        anns = [a for a in coco["annotations"] if a["image_id"] == image_id]
        assert len(anns) == len(target["boxes"]) >= 2
        for ann, box, label in zip(anns, target["boxes"].tolist(), target["labels"].tolist()):
            m = mask_utils.decode(ann["segmentation"])
            ys, xs = np.nonzero(m)
            assert box == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert label == ann["category_id"] - 1 and ann["area"] == m.sum() and ann["iscrowd"] == 0


def test_loads_through_the_folder_loader_with_masks_matching_instances(demo_root):
    seg = open_segmentation(demo_root, "folder", "train")
    det = open_detection(demo_root, "coco", "train")
    assert seg.class_names == ("background", *CLASSES) and len(seg) == len(det) == 4
    coco = json.loads(det.ann_file.read_text())
    for image_id, (image, mask) in zip(det.image_ids, seg):
        assert image.shape == (3, 64, 64) and mask.shape == (64, 64)
        for ann in (a for a in coco["annotations"] if a["image_id"] == image_id):
            instance = mask_utils.decode(ann["segmentation"]).astype(bool)
            assert (mask.numpy()[instance] == ann["category_id"]).all()


def test_cli_make_demo(tmp_path):
    result = CliRunner().invoke(app, ["data", "make-demo", str(tmp_path / "d"), "--train", "2", "--val", "1",
                                      "--size", "48", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "2 train images" in result.output
    assert len(open_segmentation(tmp_path / "d", "folder", "val")) == 1


def test_rewriting_a_smaller_demo_leaves_no_stale_images(tmp_path):
    write_demo(tmp_path, n_train=3, n_val=1, size=32)
    write_demo(tmp_path, n_train=1, n_val=1, size=32)
    assert len(open_segmentation(tmp_path, "folder", "train")) == len(open_detection(tmp_path, "coco", "train")) == 1


def test_fewer_classes_larger_objects_and_object_counts_are_respected(tmp_path):
    counts = write_demo(tmp_path, n_train=6, n_val=2, size=64, seed=3, n_classes=2, objects=(1, 2),
                        radius=(0.3, 0.35))
    assert (tmp_path / "classes.txt").read_text().split() == ["background", *CLASSES[:2]]
    coco = json.loads((tmp_path / "annotations" / "instances_train.json").read_text())
    assert [c["name"] for c in coco["categories"]] == list(CLASSES[:2])
    per_image = np.bincount([a["image_id"] for a in coco["annotations"]], minlength=len(coco["images"]))
    ids = [im["id"] for im in coco["images"]]
    assert all(1 <= per_image[i] <= 2 for i in ids) and counts["train_objects"] == len(coco["annotations"])
    assert {a["category_id"] for a in coco["annotations"]} <= {1, 2}
    # a shape's corners lie within sqrt(2)·r of its centre (the rectangle's): boxes at most 2·sqrt(2)·r a side
    sides = [max(a["bbox"][2], a["bbox"][3]) for a in coco["annotations"]]
    assert max(sides) <= 2 * 2 ** 0.5 * 0.35 * 64 + 1
    write_demo(tmp_path / "default", n_train=6, n_val=2, size=64, seed=3, n_classes=2, objects=(1, 2))
    default = json.loads((tmp_path / "default" / "annotations" / "instances_train.json").read_text())
    default_sides = [max(a["bbox"][2], a["bbox"][3]) for a in default["annotations"]]
    assert np.mean(sides) > 1.4 * np.mean(default_sides)  # radius 0.3-0.35 against 0.1-0.25
    masks = [np.asarray(Image.open(p)) for p in sorted((tmp_path / "masks" / "train").glob("*.png"))]
    assert max(int(m.max()) for m in masks) <= 2


@pytest.mark.parametrize("bad", [{"n_classes": 0}, {"n_classes": len(CLASSES) + 1}, {"objects": (3, 2)},
                                 {"radius": (0.0, 0.2)}])
def test_bad_demo_settings_are_refused_naming_them(tmp_path, bad):
    with pytest.raises(DataError, match="bad demo settings"):
        write_demo(tmp_path, n_train=2, n_val=1, size=32, **bad)

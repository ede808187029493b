"""Detection datasets: COCO ids → contiguous labels, crowd and empty images, VOC xml, bad input named."""

from __future__ import annotations

import pytest
import torch
from data_fixtures import coco_json, write_coco_json, write_voc_xml
from torchvision import tv_tensors

from fna.data import CocoDetection, DataError, VOCDetection, open_detection


def test_coco_labels_follow_sorted_category_ids(coco_root):
    ds = open_detection(coco_root, "coco", "train")
    assert ds.label_to_cat_id == [1, 3, 7] and ds.class_names == ("person", "car", "cat")
    assert ds.ann_file == coco_root / "annotations" / "instances_train.json"
    assert ds.image_ids == [10, 11, 12]
    image, target = ds[0]
    assert isinstance(image, tv_tensors.Image) and image.shape == (3, 16, 20) and image.dtype == torch.uint8
    boxes = target["boxes"]
    assert isinstance(boxes, tv_tensors.BoundingBoxes) and boxes.format == tv_tensors.BoundingBoxFormat.XYXY
    assert boxes.canvas_size == (16, 20)
    assert boxes.tolist() == [[2, 3, 7, 7], [0, 0, 20, 16]]
    assert target["labels"].tolist() == [2, 0] and target["labels"].dtype == torch.int64
    assert target["image_id"] == 10


def test_coco_crowd_boxes_are_left_out(coco_root):
    target = CocoDetection(coco_root / "images/train", coco_root / "annotations/instances_train.json")[0][1]
    assert [5, 5, 9, 9] not in target["boxes"].tolist()
    assert target["labels"].tolist() == [2, 0] and target["iscrowd"].tolist() == [0, 0]


def test_coco_image_without_annotations_is_kept(coco_root):
    image, target = open_detection(coco_root, "coco", "train")[2]
    assert target["image_id"] == 12 and target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


def test_coco2017_layout_without_images_folder(coco_root):
    (coco_root / "images" / "train").rename(coco_root / "train")
    assert len(open_detection(coco_root, "coco", "train")) == 3


def _edit(root, fn):
    data = coco_json(root)
    fn(data)
    write_coco_json(root, data)


def test_coco_missing_image_file_names_it(coco_root):
    (coco_root / "images" / "train" / "q.png").unlink()
    with pytest.raises(DataError, match=r"q\.png: image file \(listed in instances_train\.json as image id 11\)"):
        open_detection(coco_root, "coco", "train")


def test_coco_non_positive_box_names_annotation(coco_root):
    _edit(coco_root, lambda d: d["annotations"][3].update(bbox=[1, 1, 0, 2]))
    with pytest.raises(DataError, match=r"instances_train\.json: annotation 4 of image q\.png: non-positive box"):
        open_detection(coco_root, "coco", "train")


def test_coco_box_outside_image_names_annotation(coco_root):
    _edit(coco_root, lambda d: d["annotations"][3].update(bbox=[5, 5, 6, 2]))
    with pytest.raises(DataError, match=r"annotation 4 of image q\.png: box \(5, 5, 11, 7\) outside the 8x8 image"):
        open_detection(coco_root, "coco", "train")


def test_coco_box_within_tolerance_is_clipped(coco_root):
    _edit(coco_root, lambda d: d["annotations"][3].update(bbox=[1, 1, 7.5, 2]))
    assert open_detection(coco_root, "coco", "train")[1][1]["boxes"].tolist() == [[1, 1, 8, 3]]


def test_coco_unknown_category_names_annotation(coco_root):
    _edit(coco_root, lambda d: d["annotations"][0].update(category_id=99))
    with pytest.raises(DataError, match=r"annotation 1 of image p\.png: unknown category id 99"):
        open_detection(coco_root, "coco", "train")


def test_coco_annotation_of_unlisted_image_is_an_error(coco_root):
    _edit(coco_root, lambda d: d["annotations"][0].update(image_id=77))
    with pytest.raises(DataError, match=r"annotation 1 references image id 77"):
        open_detection(coco_root, "coco", "train")


def test_coco_malformed_json_names_file(coco_root):
    (coco_root / "annotations" / "instances_train.json").write_text('{"images": [')
    with pytest.raises(DataError, match=r"instances_train\.json: malformed JSON"):
        open_detection(coco_root, "coco", "train")


def test_coco_json_without_images_list_is_malformed(coco_root):
    write_coco_json(coco_root, {"annotations": []})
    with pytest.raises(DataError, match="malformed COCO json"):
        open_detection(coco_root, "coco", "train")


def test_coco_skip_bad_drops_the_image_and_records_why(coco_root):
    _edit(coco_root, lambda d: d["annotations"][0].update(category_id=99))
    ds = open_detection(coco_root, "coco", "train", skip_bad=True)
    assert ds.image_ids == [11, 12]
    [(path, reason)] = ds.skipped
    assert "annotation 1 of image p.png" in path and reason == "unknown category id 99"


def test_coco_image_of_another_size_than_json_is_rejected(coco_root):
    _edit(coco_root, lambda d: d["images"][2].update(width=9))
    ds = open_detection(coco_root, "coco", "train")
    with pytest.raises(DataError, match=r"r\.png: image is 8x8 but its annotation says 9x8"):
        ds[2]


def test_voc_boxes_become_zero_based_xyxy_and_keep_difficult(voc_det_root):
    ds = VOCDetection(voc_det_root, "train")
    assert ds.num_classes == 20 and ds.class_names[11] == "dog"
    image, target = ds[0]
    assert image.shape == (3, 16, 20)
    assert target["boxes"].tolist() == [[1, 2, 10, 8], [0, 0, 20, 16]]
    assert target["labels"].tolist() == [11, 14] and target["difficult"].tolist() == [0, 1]
    assert ds[1][1]["boxes"].shape == (0, 4) and ds.image_ids == [0, 1]


def test_voc_unknown_class_names_the_xml(voc_det_root):
    write_voc_xml(voc_det_root, "000002", [("unicorn", 0, 1, 1, 4, 4)])
    with pytest.raises(DataError, match=r"000002\.xml: object 0: unknown class 'unicorn'"):
        VOCDetection(voc_det_root)


def test_voc_box_outside_names_the_xml(voc_det_root):
    write_voc_xml(voc_det_root, "000002", [("cat", 0, 1, 1, 40, 4)])
    with pytest.raises(DataError, match=r"000002\.xml: object 0 \(cat\): box .* outside the 20x16 image"):
        VOCDetection(voc_det_root)


def test_voc_malformed_xml_skipped_when_asked(voc_det_root):
    (voc_det_root / "Annotations" / "000002.xml").write_text("<annotation>")
    ds = VOCDetection(voc_det_root, skip_bad=True)
    assert len(ds) == 1 and ds.skipped[0][0].endswith("000002.xml")
    assert ds.skipped[0][1].startswith("malformed VOC annotation")


def test_voc_missing_image_names_it(voc_det_root):
    (voc_det_root / "JPEGImages" / "000002.jpg").unlink()
    with pytest.raises(DataError, match=r"000002\.jpg: image file not found"):
        open_detection(voc_det_root, "voc", "train")

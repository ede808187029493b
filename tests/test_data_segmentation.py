"""Segmentation datasets read each layout exactly and name the file of every bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_fixtures import CITYSCAPES_IDS, CITYSCAPES_TRAIN, FOLDER_IDS, VOC_SEG_IDS, write_label, write_rgb
from PIL import Image
from torchvision import tv_tensors

from fna.data import (CityscapesSegmentation, DataError, FolderSegmentation, VOCSegmentation, open_segmentation)


def test_cityscapes_maps_label_ids_to_train_ids(cityscapes_root):
    ds = CityscapesSegmentation(cityscapes_root, "train")
    assert len(ds) == 2 and ds.num_classes == 19 and ds.ignore_index == 255
    assert ds.class_names[0] == "road" and ds.class_names[13] == "car"
    image, mask = ds[0]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8 and image.shape == (3, 3, 4)
    assert isinstance(mask, tv_tensors.Mask) and mask.dtype == torch.int64
    assert mask.tolist() == CITYSCAPES_TRAIN.tolist()


@pytest.mark.parametrize("label_id, train_id", [(7, 0), (26, 13), (0, 255), (33, 18), (4, 255), (24, 11)])
def test_cityscapes_table_edge_cases(cityscapes_root, label_id, train_id):
    mask = CityscapesSegmentation(cityscapes_root, "val")[0][1]
    assert mask[CITYSCAPES_IDS == label_id].unique().tolist() == [train_id]


def test_cityscapes_label_id_above_33_names_the_mask(cityscapes_root):
    bad = cityscapes_root / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png"
    write_label(bad, np.full((3, 4), 40))
    with pytest.raises(DataError, match=r"aachen_000000_000019_gtFine_labelIds\.png.*\[40\]"):
        CityscapesSegmentation(cityscapes_root, "train")[0]


def test_cityscapes_missing_split_is_an_error(cityscapes_root):
    with pytest.raises(DataError, match="test"):
        CityscapesSegmentation(cityscapes_root, "test")


def test_voc_reads_palette_indices_and_keeps_255(voc_seg_root):
    ds = VOCSegmentation(voc_seg_root, "val")
    assert ds.num_classes == 21 and ds.class_names[15] == "person"
    image, mask = ds[0]
    assert image.shape == (3, 3, 4)
    assert mask.tolist() == VOC_SEG_IDS.tolist()


def test_folder_with_split_file(folder_root):
    ds = FolderSegmentation(folder_root, "train")
    assert ds.class_names == ("background", "sky", "tree") and len(ds) == 1
    assert ds[0][1].tolist() == FOLDER_IDS["a"].tolist()


def test_folder_without_split_reads_every_image(folder_root):
    ds = open_segmentation(folder_root, "folder", None)
    assert [ds[i][1].tolist() for i in range(len(ds))] == [FOLDER_IDS["a"].tolist(), FOLDER_IDS["b"].tolist()]


def test_folder_with_split_subfolders(tmp_path):
    (tmp_path / "classes.txt").write_text("bg\nfg\n")
    write_rgb(tmp_path / "images" / "val" / "x.png", 2, 2)
    write_label(tmp_path / "masks" / "val" / "x.png", np.array([[0, 1], [1, 255]]))
    assert FolderSegmentation(tmp_path, "val")[0][1].tolist() == [[0, 1], [1, 255]]


def test_missing_mask_names_it(folder_root):
    (folder_root / "masks" / "b.png").unlink()
    with pytest.raises(DataError, match=r"b\.png: mask for image b\.jpg not found"):
        FolderSegmentation(folder_root)


def test_missing_mask_skipped_when_asked(folder_root):
    (folder_root / "masks" / "b.png").unlink()
    ds = FolderSegmentation(folder_root, skip_bad=True)
    assert len(ds) == 1
    assert ds.skipped == [(str(folder_root / "masks" / "b.png"), "mask for image b.jpg not found")]


def test_image_missing_from_split_file_names_it(folder_root):
    (folder_root / "train.txt").write_text("a\nzzz\n")
    with pytest.raises(DataError, match=r"zzz\.png: image file not found"):
        FolderSegmentation(folder_root, "train")


def test_mask_id_outside_classes_names_the_mask(folder_root):
    write_label(folder_root / "masks" / "a.png", np.array([[0, 1, 3], [255, 2, 1]]))
    ds = FolderSegmentation(folder_root)
    with pytest.raises(DataError, match=r"a\.png: mask holds ids \[3\] outside the classes \(valid: 0\.\.2 and 255\)"):
        ds[0]


def test_unreadable_image_names_it(folder_root):
    (folder_root / "images" / "a.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"a\.png: unreadable image"):
        FolderSegmentation(folder_root)[0]


def test_unreadable_image_skipped_at_load_returns_next_item(folder_root):
    (folder_root / "images" / "a.png").write_bytes(b"not a png")
    ds = FolderSegmentation(folder_root, skip_bad=True)
    assert ds[0][1].tolist() == FOLDER_IDS["b"].tolist()
    assert ds.skipped[0][0] == str(folder_root / "images" / "a.png")


def test_verify_drops_bad_items_up_front(folder_root):
    write_label(folder_root / "masks" / "a.png", np.full((2, 3), 9))
    ds = FolderSegmentation(folder_root, skip_bad=True).verify()
    assert len(ds) == 1 and ds[0][1].tolist() == FOLDER_IDS["b"].tolist()
    assert "[9]" in ds.skipped[0][1]


def test_rgb_mask_is_rejected(folder_root):
    Image.new("RGB", (3, 2)).save(folder_root / "masks" / "a.png")
    with pytest.raises(DataError, match=r"a\.png: mask must be single-channel"):
        FolderSegmentation(folder_root)[0]


def test_mask_of_another_size_is_rejected(folder_root):
    write_label(folder_root / "masks" / "a.png", np.zeros((4, 4)))
    with pytest.raises(DataError, match=r"a\.png: mask is 4x4 but image a\.png is 3x2"):
        FolderSegmentation(folder_root)[0]


def test_iterating_a_dataset_stops(folder_root):
    assert len(list(FolderSegmentation(folder_root))) == 2


def test_unknown_format_is_an_error(folder_root):
    with pytest.raises(DataError, match="unknown segmentation format 'ade'"):
        open_segmentation(folder_root, "ade", "train")


def test_folder_unknown_split_says_what_was_looked_for(folder_root):
    with pytest.raises(DataError, match=r"split 'val': neither images/val/ nor val\.txt found"):
        FolderSegmentation(folder_root, "val")

"""Transforms keep boxes and masks aligned with the image; crops pad masks with 255; the split is stable."""

from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors

from torchvision.models.detection.transform import GeneralizedRCNNTransform

from fna.data import (det_collate, det_eval_transforms, retinanet_train_transforms, seg_collate,
                      seg_eval_transforms, seg_train_transforms, split_by_image, ssdlite_train_transforms)
from fna.data.transforms import ResizeWithin, detector_resize_size
from fna.data.base import IMAGENET_MEAN, IMAGENET_STD


def _det_sample(h: int = 30, w: int = 40) -> tuple[tv_tensors.Image, dict]:
    """An image with two boxes; ``masks`` marks each box's pixels so geometry can be checked after."""
    boxes = torch.tensor([[5.0, 4.0, 15.0, 20.0], [20.0, 10.0, 38.0, 28.0]])
    masks = torch.zeros(2, h, w, dtype=torch.uint8)
    for m, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
        m[y0:y1, x0:x1] = 1
    image = tv_tensors.Image(torch.randint(0, 256, (3, h, w), dtype=torch.uint8))
    return image, {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
                   "labels": torch.tensor([3, 1]), "iscrowd": torch.tensor([0, 0]), "image_id": 5,
                   "masks": tv_tensors.Mask(masks)}


def test_retinanet_flip_moves_boxes_with_the_image():
    image, target = _det_sample()
    flipped_seen = kept_seen = False
    for seed in range(8):
        torch.manual_seed(seed)
        out, t = retinanet_train_transforms(min_size=30, max_size=1000)(image, target)
        assert out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1
        if torch.allclose(out, image.flip(-1).float() / 255):
            flipped_seen = True
            assert t["boxes"].tolist() == [[40 - 15, 4, 40 - 5, 20], [40 - 38, 10, 40 - 20, 28]]
        else:
            kept_seen = True
            assert torch.allclose(out, image.float() / 255) and t["boxes"].tolist() == target["boxes"].tolist()
        assert t["labels"].tolist() == [3, 1] and t["image_id"] == 5
    assert flipped_seen and kept_seen


def test_retinanet_resize_keeps_ratio_within_max_size():
    image, target = _det_sample(30, 40)
    out, t = retinanet_train_transforms(min_size=60, max_size=70)(image, target)
    assert out.shape[-2:] == (52, 70)  # short side 60 would make the long side 80 > 70
    assert t["boxes"].canvas_size == (52, 70)


def _box_of(mask: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


@pytest.mark.parametrize("seed", range(6))
def test_ssdlite_augmentation_keeps_boxes_on_their_pixels(seed):
    torch.manual_seed(seed)
    image, t = ssdlite_train_transforms(size=64)(*_det_sample())
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert len(t["boxes"]) == len(t["labels"]) == len(t["iscrowd"]) == len(t["masks"]) >= 1
    for box, mask in zip(t["boxes"], t["masks"]):
        assert box.tolist() == pytest.approx(_box_of(mask), abs=1.5)


def test_det_eval_keeps_size_and_scales_to_unit_range():
    image, target = _det_sample()
    out, t = det_eval_transforms()(image, target)
    assert torch.allclose(out, image.float() / 255) and torch.equal(t["boxes"], target["boxes"])


def _normalized(value: float) -> torch.Tensor:
    return (value - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)


def test_seg_crop_pads_image_with_zero_and_mask_with_255():
    image = tv_tensors.Image(torch.full((3, 6, 8), 255, dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.ones(6, 8, dtype=torch.int64))
    out, m = seg_train_transforms(crop=(10, 12), scale=(1.0, 1.0))(image, mask)
    assert out.shape == (3, 10, 12) and m.shape == (10, 12) and m.dtype == torch.int64
    padded = m == 255
    assert padded.sum() == 10 * 12 - 6 * 8 and (m[~padded] == 1).all()
    assert torch.allclose(out[:, padded].T, _normalized(0.0).expand(int(padded.sum()), 3))
    assert torch.allclose(out[:, ~padded].T, _normalized(1.0).expand(48, 3))


@pytest.mark.parametrize("seed", range(4))
def test_seg_train_keeps_mask_aligned_with_image(seed):
    torch.manual_seed(seed)
    mask = torch.zeros(32, 48, dtype=torch.int64)
    mask[:, 24:] = 1
    mask[8:24, 4:16] = 2
    image = tv_tensors.Image((mask * 100).to(torch.uint8).expand(3, -1, -1).clone())
    out, m = seg_train_transforms(crop=(24, 24), scale=(0.5, 2.0))(image, tv_tensors.Mask(mask))
    red = out[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
    valid = m != 255
    agree = (torch.round(red[valid] * 255 / 100) == m[valid]).float().mean()
    assert agree > 0.9  # only interpolated edge pixels may differ


def test_seg_eval_only_normalizes():
    image = tv_tensors.Image(torch.zeros(3, 4, 5, dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.arange(20).reshape(4, 5))
    out, m = seg_eval_transforms()(image, mask)
    assert torch.allclose(out[:, 0, 0], _normalized(0.0)) and torch.equal(m, mask)


def test_collate_functions():
    images, masks = seg_collate([(torch.zeros(3, 4, 5), torch.zeros(4, 5, dtype=torch.int64))] * 2)
    assert images.shape == (2, 3, 4, 5) and masks.shape == (2, 4, 5)
    samples = [_det_sample(), _det_sample(20, 10)]
    images, targets = det_collate(samples)
    assert [i.shape for i in images] == [(3, 30, 40), (3, 20, 10)] and targets[1] is samples[1][1]


def test_split_by_image_is_a_deterministic_partition():
    a, b = split_by_image(11, seed=3)
    assert (a, b) == split_by_image(11, seed=3)
    assert sorted(a + b) == list(range(11)) and len(a) == 6 and len(b) == 5
    assert split_by_image(11, seed=4) != (a, b)


@pytest.mark.parametrize("make", [lambda: ssdlite_train_transforms(size=32), lambda: retinanet_train_transforms(32, 64)])
def test_detection_train_transforms_accept_images_without_boxes(make):
    image = tv_tensors.Image(torch.zeros(3, 20, 30, dtype=torch.uint8))
    target = {"boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(20, 30)),
              "labels": torch.zeros(0, dtype=torch.int64), "iscrowd": torch.zeros(0, dtype=torch.int64),
              "image_id": 1}
    out, t = make()(image, target)
    assert out.dtype == torch.float32 and t["boxes"].shape == (0, 4) and t["labels"].shape == (0,)


@pytest.mark.parametrize("size,expected", [((128, 128), (64, 128)), ((128, 64), (32, 64)), ((60, 1000), (60, 120))])
def test_retinanet_resize_accepts_square_and_max_below_min_sizes(size, expected):
    image, target = _det_sample(100, 200)
    out, t = retinanet_train_transforms(*size)(image, target)
    assert out.shape[-2:] == expected and t["boxes"].canvas_size == expected
    assert t["masks"].shape[-2:] == expected and len(t["boxes"]) == 2


def test_retinanet_resize_scales_boxes_with_the_image():
    image, target = _det_sample(100, 200)
    out, t = ResizeWithin(128, 128)(image, target)  # scale 0.64
    assert torch.allclose(t["boxes"], target["boxes"] * 0.64)
    for box, mask in zip(t["boxes"], t["masks"]):
        assert box.tolist() == pytest.approx(_box_of(mask), abs=1.5)


@pytest.mark.parametrize("h,w", [(100, 200), (480, 640), (333, 500), (128, 128), (50, 30)])
@pytest.mark.parametrize("min_size,max_size", [(128, 128), (60, 70), (800, 1333), (96, 64)])
def test_retinanet_train_resize_gives_the_size_the_detector_resizes_to(h, w, min_size, max_size):
    detector = GeneralizedRCNNTransform(min_size, max_size, IMAGENET_MEAN, IMAGENET_STD).eval()
    batch, _ = detector([torch.zeros(3, h, w)])
    out = ResizeWithin(min_size, max_size)(tv_tensors.Image(torch.zeros(3, h, w, dtype=torch.uint8)))
    assert tuple(out.shape[-2:]) == tuple(batch.image_sizes[0]) == detector_resize_size(h, w, min_size, max_size)


def test_retinanet_model_trains_and_predicts_at_a_square_size(one_thread):
    from fna.arch import get_arch
    from fna.tasks import build_model

    model = build_model("retinanet", get_arch("mobilenet_v2"), 3, min_size=128, max_size=128)
    image, target = retinanet_train_transforms(128, 128)(*_det_sample(100, 200))
    model.train()
    losses = model([image], [{"boxes": target["boxes"], "labels": target["labels"]}])
    assert set(losses) == {"classification", "bbox_regression"} and all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        (out,) = model([torch.rand(3, 100, 200)])
    assert out["boxes"].shape[-1] == 4

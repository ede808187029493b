import json

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from torch.utils.data import TensorDataset

from fna.data.demo import write_demo
from fna.data.detection import open_detection
from fna.data.transforms import det_eval_transforms
from fna.evaluate import (COCO_STATS, evaluate_detection, evaluate_segmentation, format_metric, iou_from_confusion,
                          metric_lines, sliding_window_logits)
from fna.tasks import build_model


def test_miou_equals_a_hand_computed_confusion_matrix(tiny_arch):
    model = build_model("seg", tiny_arch, 3).eval()
    images = torch.randn(4, 3, 32, 32)
    masks = torch.randint(0, 3, (4, 32, 32))
    masks[:, :4] = 255
    result = evaluate_segmentation(model, TensorDataset(images, masks), 3)
    with torch.no_grad():
        pred = model(images).argmax(1).numpy().ravel()
    gt = masks.numpy().ravel()
    keep = gt != 255
    cm = np.bincount(3 * gt[keep] + pred[keep], minlength=9).reshape(3, 3)
    iou = [cm[c, c] / (cm[c, :].sum() + cm[:, c].sum() - cm[c, c]) for c in range(3) if cm[c, :].sum() + cm[:, c].sum()]
    assert result["mIoU"] == pytest.approx(np.mean(iou), abs=1e-9)
    assert result["pixel_accuracy"] == pytest.approx(np.trace(cm) / cm.sum())


def test_class_absent_everywhere_is_left_out_of_the_mean():
    confusion = torch.tensor([[3, 1, 0], [0, 4, 0], [0, 0, 0]])
    iou = iou_from_confusion(confusion)
    assert iou[0] == pytest.approx(3 / 4) and iou[1] == pytest.approx(4 / 5) and iou[2].isnan()


def test_sliding_window_of_a_pointwise_model_equals_the_whole_image():
    model = nn.Conv2d(3, 4, 1)
    image = torch.randn(1, 3, 37, 53)
    with torch.no_grad():
        expected = model(image)
        assert torch.allclose(sliding_window_logits(model, image, 4, (16, 24), 2 / 3), expected, atol=1e-6)
        assert torch.allclose(sliding_window_logits(model, image, 4, (64, 64)), expected, atol=1e-6)


class GroundTruthDetector(nn.Module):
    """Returns each image's annotations, in dataset order, as detections (optionally jittered)."""

    def __init__(self, dataset, jitter: float = 0.0) -> None:
        super().__init__()
        self.targets = [dataset[i][1] for i in range(len(dataset))]
        self.jitter, self.calls = jitter, 0

    def forward(self, images):
        out = []
        for _ in images:
            t = self.targets[self.calls]
            self.calls += 1
            g = torch.Generator().manual_seed(self.calls)
            boxes = t["boxes"].as_subclass(torch.Tensor) + self.jitter * torch.randn(t["boxes"].shape, generator=g)
            out.append({"boxes": boxes, "labels": t["labels"], "scores": torch.rand(len(boxes), generator=g)})
        return out


@pytest.fixture(scope="module")
def demo_val(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    write_demo(root, n_train=1, n_val=6, size=96, seed=3)
    return open_detection(root, "coco", "val", det_eval_transforms())


def test_ground_truth_detections_score_ap_1(demo_val):
    result = evaluate_detection(GroundTruthDetector(demo_val), demo_val)
    assert result["AP"] == pytest.approx(1.0) and result["AP50"] == pytest.approx(1.0)


def test_our_map_equals_pycocotools_on_the_same_detections(demo_val, tmp_path):
    ours = evaluate_detection(GroundTruthDetector(demo_val, jitter=3.0), demo_val, results_path=tmp_path / "dt.json")
    gt = COCO(str(demo_val.ann_file))
    ev = COCOeval(gt, gt.loadRes(json.loads((tmp_path / "dt.json").read_text())), "bbox")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert 0.05 < ours["AP"] < 0.95
    assert ours["AP"] == pytest.approx(ev.stats[0]) and ours["AP75"] == pytest.approx(ev.stats[2])


def test_real_detector_runs_through_the_evaluator(demo_val):
    arch = __import__("fna.arch", fromlist=["BUILTIN_ARCHS"]).BUILTIN_ARCHS["mobilenet_v2"]
    model = build_model("ssdlite", arch, demo_val.num_classes, size=96)
    result = evaluate_detection(model, demo_val)
    assert set(result) == {"AP", "AP50", "AP75", "APs", "APm", "APl"} and 0.0 <= result["AP"] <= 1.0


class FixedDetector(nn.Module):
    """Predicts the same box with label 0 on every image (or nothing with ``boxes=0``)."""

    def __init__(self, boxes: int = 1) -> None:
        super().__init__()
        self.boxes = boxes

    def forward(self, images):
        return [{"boxes": torch.tensor([[2.0, 2.0, 20.0, 20.0]] * self.boxes).reshape(-1, 4),
                 "labels": torch.zeros(self.boxes, dtype=torch.int64), "scores": torch.ones(self.boxes)}
                for _ in images]


def _demo_val_where(tmp_path, edit) -> object:
    """The demo's val split after ``edit`` rewrote each of its COCO annotations (a list → a list)."""
    write_demo(tmp_path, n_train=1, n_val=3, size=48, seed=5)
    path = tmp_path / "annotations" / "instances_val.json"
    data = json.loads(path.read_text())
    data["annotations"] = edit(data["annotations"])
    path.write_text(json.dumps(data))
    return open_detection(tmp_path, "coco", "val", det_eval_transforms())


@pytest.mark.parametrize("boxes", [0, 1])
def test_split_without_annotated_boxes_has_undefined_ap_not_zero(tmp_path, boxes):
    val = _demo_val_where(tmp_path, lambda anns: [])
    assert evaluate_detection(FixedDetector(boxes), val) == {k: None for k in COCO_STATS}


def test_split_with_only_crowd_boxes_has_undefined_ap(tmp_path):
    val = _demo_val_where(tmp_path, lambda anns: [{**a, "iscrowd": 1} for a in anns])
    assert evaluate_detection(FixedDetector(), val)["AP"] is None


def test_size_range_without_boxes_is_undefined_while_ap_is_defined(demo_val):
    result = evaluate_detection(GroundTruthDetector(demo_val), demo_val)  # 96x96 images: no box above 96²
    assert result["AP"] == pytest.approx(1.0) and result["APl"] is None


def test_no_detections_on_annotated_boxes_score_zero_where_defined(demo_val):
    result = evaluate_detection(FixedDetector(boxes=0), demo_val)
    assert result["AP"] == 0.0 and result["AP50"] == 0.0 and result["APl"] is None


def test_segmentation_split_without_labelled_pixels_has_undefined_miou(tiny_arch):
    model = build_model("seg", tiny_arch, 3).eval()
    data = TensorDataset(torch.randn(2, 3, 32, 32), torch.full((2, 32, 32), 255))
    result = evaluate_segmentation(model, data, 3)
    assert result["mIoU"] is None and result["pixel_accuracy"] is None
    assert set(result["per_class_iou"].values()) == {None}


def test_undefined_metrics_print_why():
    assert format_metric(None, "ssdlite") == "undefined: the split has no annotated boxes"
    assert format_metric(None, "seg") == "undefined: the split has no labelled pixels"
    assert format_metric(0.25, "seg") == "0.2500"
    lines = metric_lines({"AP": 0.5, "APl": None, "per_class_iou": {}}, "retinanet")
    assert lines == ["AP: 0.5000", "APl: undefined: the split has no boxes of this size"]
    assert metric_lines({"AP": None, "APs": None}, "retinanet") == [
        "AP: undefined: the split has no annotated boxes", "APs: undefined: the split has no annotated boxes"]

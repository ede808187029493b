import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset
from data_fixtures import write_rgb

from fna.data.demo import write_demo
from fna.data.detection import open_detection
from fna.data.transforms import det_eval_transforms
from fna.evaluate import COCO_STATS, evaluate_detection, evaluate_segmentation, iou_from_confusion, sliding_window_logits
from fna.tasks import get_task
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


# One 160x160 image. Category 5 has three 40x40 boxes A, B, C; category 2 has one, D. Labels follow the
# sorted category ids: label 0 is category 2, label 1 is category 5.
HAND_GT = {5: [(4, 4, 40, 40), (60, 4, 40, 40), (4, 60, 40, 40)], 2: [(110, 110, 40, 40)]}
# Detections (x, y, w, h, score, label): A exactly; a false positive touching no box; B shifted 8 px to the
# right (IoU 32*40 / (2*1600 - 32*40) = 2/3); D exactly. C is missed.
HAND_DT = [(4, 4, 40, 40, 0.9, 1), (60, 60, 40, 40, 0.8, 1), (68, 4, 40, 40, 0.7, 1), (110, 110, 40, 40, 0.6, 0)]


def _hand_coco(root):
    write_rgb(root / "images" / "val" / "a.png", 160, 160)
    anns = [{"id": i + 1, "image_id": 1, "category_id": cat, "bbox": list(box), "area": box[2] * box[3], "iscrowd": 0}
            for i, (cat, box) in enumerate((c, b) for c, boxes in HAND_GT.items() for b in boxes)]
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_val.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 160, "height": 160}], "annotations": anns,
        "categories": [{"id": 5, "name": "ball"}, {"id": 2, "name": "box"}]}))
    return open_detection(root, "coco", "val", det_eval_transforms())


class FixedDetector(nn.Module):
    """Returns :data:`HAND_DT` (as xyxy boxes, 0-based labels) for every image."""

    def forward(self, images):
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h, _, _ in HAND_DT], dtype=torch.float32)
        return [{"boxes": boxes, "scores": torch.tensor([d[4] for d in HAND_DT]),
                 "labels": torch.tensor([d[5] for d in HAND_DT])} for _ in images]


def test_map_of_a_hand_computed_case(tmp_path):
    # Category 5, IoU thresholds 0.50-0.65 (4 of 10): hits at ranks 1 and 3 of 3 boxes, so recall 1/3 at
    # precision 1, then 2/3 at precision 2/3. On COCO's 101 recall points: 34 points (0.00-0.33) at
    # precision 1, 33 (0.34-0.66) at 2/3, the rest 0: 56/101. Thresholds 0.70-0.95 (6 of 10): only A
    # counts: 34/101. Category 2: D found exactly, AP 1 at every threshold. AP is the mean over both.
    dataset = _hand_coco(tmp_path)
    assert dataset.label_to_cat_id == [2, 5]
    ball = (4 * 56 / 101 + 6 * 34 / 101) / 10
    result = evaluate_detection(FixedDetector(), dataset)
    assert result["AP"] == pytest.approx((ball + 1) / 2, abs=1e-6)
    assert result["AP50"] == pytest.approx((56 / 101 + 1) / 2, abs=1e-6)
    assert result["AP75"] == pytest.approx((34 / 101 + 1) / 2, abs=1e-6)
    assert result["APm"] == pytest.approx(result["AP"], abs=1e-6)  # every box is 40x40: medium
    assert result["APs"] is None and result["APl"] is None  # no small or large boxes: undefined


def test_real_detectors_detections_reach_the_evaluator_as_coco_results(demo_val, tmp_path):
    arch = __import__("fna.arch", fromlist=["BUILTIN_ARCHS"]).BUILTIN_ARCHS["mobilenet_v2"]
    model = build_model("ssdlite", arch, demo_val.num_classes, size=96).eval()
    result = evaluate_detection(model, demo_val, batch_size=4, results_path=tmp_path / "dt.json")
    assert set(result) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    written = json.loads((tmp_path / "dt.json").read_text())
    expected = []  # the model's own outputs, in the same batches, as COCO entries
    with torch.no_grad():
        for start in range(0, len(demo_val), 4):
            items = [demo_val[i] for i in range(start, min(start + 4, len(demo_val)))]
            for (_, target), out in zip(items, model([image for image, _ in items])):
                for (x0, y0, x1, y1), score, label in zip(out["boxes"].tolist(), out["scores"].tolist(),
                                                          out["labels"].tolist()):
                    expected.append((int(target["image_id"]), demo_val.label_to_cat_id[label],
                                     [x0, y0, x1 - x0, y1 - y0], score))
    assert len(written) == len(expected) > 0
    for entry, (image_id, cat, bbox, score) in zip(written, expected):
        assert (entry["image_id"], entry["category_id"]) == (image_id, cat)
        assert entry["bbox"] == pytest.approx(bbox, abs=1e-3) and entry["score"] == pytest.approx(score, abs=1e-5)
    assert {e["image_id"] for e in written} <= set(demo_val.image_ids)


class OneBoxDetector(nn.Module):
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
    assert evaluate_detection(OneBoxDetector(boxes), val) == {k: None for k in COCO_STATS}


def test_split_with_only_crowd_boxes_has_undefined_ap(tmp_path):
    val = _demo_val_where(tmp_path, lambda anns: [{**a, "iscrowd": 1} for a in anns])
    assert evaluate_detection(OneBoxDetector(), val)["AP"] is None


def test_size_range_without_boxes_is_undefined_while_ap_is_defined(demo_val):
    result = evaluate_detection(GroundTruthDetector(demo_val), demo_val)  # 96x96 images: no box above 96²
    assert result["AP"] == pytest.approx(1.0) and result["APl"] is None


def test_no_detections_on_annotated_boxes_score_zero_where_defined(demo_val):
    result = evaluate_detection(OneBoxDetector(boxes=0), demo_val)
    assert result["AP"] == 0.0 and result["AP50"] == 0.0 and result["APl"] is None


def test_segmentation_split_without_labelled_pixels_has_undefined_miou(tiny_arch):
    model = build_model("seg", tiny_arch, 3).eval()
    data = TensorDataset(torch.randn(2, 3, 32, 32), torch.full((2, 32, 32), 255))
    result = evaluate_segmentation(model, data, 3)
    assert result["mIoU"] is None and result["pixel_accuracy"] is None
    assert set(result["per_class_iou"].values()) == {None}


def test_undefined_metrics_print_why():
    assert get_task("ssdlite").format_metric(None) == "undefined: the split has no annotated boxes"
    assert get_task("seg").format_metric(None) == "undefined: the split has no labelled pixels"
    assert get_task("seg").format_metric(0.25) == "0.2500"
    lines = get_task("retinanet").metric_lines({"AP": 0.5, "APl": None, "per_class_iou": {}})
    assert lines == ["AP: 0.5000", "APl: undefined: the split has no boxes of this size"]
    assert get_task("retinanet").metric_lines({"AP": None, "APs": None}) == [
        "AP: undefined: the split has no annotated boxes", "APs: undefined: the split has no annotated boxes"]

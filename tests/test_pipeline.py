"""End-to-end runs of `fna train` / `fna adapt` on tiny on-disk datasets (CPU, a few steps)."""

import contextlib
import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import write_label, write_rgb

import fna
from fna.data.demo import write_demo
from fna.errors import FnaError
from fna.pipeline import eval_dataset, load_config, run
from fna.seeds import SEEDS, find_weights

TINY = ["finetune.iters=3", "finetune.batch_size=2", "finetune.checkpoint_every=2"]
TINY_SEARCH = ["search.epochs=2", "search.arch_start_epoch=1", "search.batch_size=2", "search.warmup_iters=0",
               "search.progress=false", "search.space.name=tiny",
               "search.space.stages=" + "[" + ",".join(["{max_depth: 2, kernels: [3, 5], expansions: [3, 6]}"] * 5)
               + ",{max_depth: 1, kernels: [3, 5], expansions: [3, 6]}]"]


def make_seg_layout(root, layout: str, n_train: int = 4, n_val: int = 2, size: int = 40):
    """``n_train``/``n_val`` random images with random masks in a segmentation layout; returns (root, format)."""
    rng = np.random.default_rng(0)
    ids = {"cityscapes": [0, 7, 8, 26], "voc": [0, 15, 12, 255], "folder": [0, 1, 2, 255]}[layout]
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            mask = rng.choice(ids, size=(size, size))
            if layout == "cityscapes":
                stem = f"city_{split}_{i:06d}_000019"
                write_rgb(root / "leftImg8bit" / split / "city" / f"{stem}_leftImg8bit.png", size, size, 10 * i)
                write_label(root / "gtFine" / split / "city" / f"{stem}_gtFine_labelIds.png", mask)
            elif layout == "voc":
                stem = f"2007_{split}{i}"
                write_rgb(root / "JPEGImages" / f"{stem}.jpg", size, size, 10 * i, fmt="JPEG")
                write_label(root / "SegmentationClass" / f"{stem}.png", mask, palette=True)
                with open(root / "ImageSets" / "Segmentation" / f"{split}.txt", "a") as f:
                    f.write(stem + "\n")
            else:
                write_rgb(root / "images" / split / f"{i}.png", size, size, 10 * i)
                write_label(root / "masks" / split / f"{i}.png", mask)
    (root / "classes.txt").write_text("background\nsky\ntree\n")
    return root


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    write_demo(root, n_train=6, n_val=3, size=64, seed=1)
    return root


def _config(task, root, fmt, *overrides, **fields):
    size = {"seg": "size=[48,48]", "retinanet": "size=[64,96]", "ssdlite": "size=[64,64]"}[task]
    return load_config(None, [*TINY, size, *overrides], task=task, data={"root": str(root), "format": fmt}, **fields)


def _miou_by_hand(run_dir: Path, root, fmt: str) -> float:
    """mIoU of the saved model on the val split: argmax per pixel, a numpy confusion matrix (255 ignored),
    IoU over the classes present in prediction or ground truth."""
    model, info = fna.load(run_dir / "model.fna.pt")
    n = info.num_classes
    confusion = np.zeros((n, n), dtype=np.int64)
    with torch.no_grad():
        for image, mask in eval_dataset("seg", root, fmt, "val"):
            pred = model(image[None]).argmax(1)[0].numpy().ravel()
            gt = np.asarray(mask).ravel()
            keep = gt != 255
            confusion += np.bincount(n * gt[keep] + pred[keep], minlength=n * n).reshape(n, n)
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    return float(np.mean(tp[union > 0] / union[union > 0]))


def _ap_by_pycocotools(run_dir: Path, root) -> float:
    """COCO AP of the run's ``detections.json`` on the val annotation file, by pycocotools directly."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    detections = json.loads((run_dir / "detections.json").read_text())
    if not detections:  # RetinaNet after a few steps: no score above its 0.05 threshold yet
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(Path(root) / "annotations" / "instances_val.json"))
        ev = COCOeval(gt, gt.loadRes(detections), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    return float(ev.stats[0])


def _assert_metric_recomputes(summary: dict, run_dir: Path, root, fmt: str) -> None:
    """The summary's metric is the saved model's mIoU (seg) or the written detections' AP, worked out here."""
    if summary["task"] == "seg":
        assert summary["metric_name"] == "mIoU"
        assert summary["metric"] == pytest.approx(_miou_by_hand(run_dir, root, fmt), abs=1e-6)
    else:
        assert summary["metric_name"] == "AP"
        if summary["task"] == "ssdlite":  # its softmax scores start near 1/(C+1), far above its 0.01 threshold,
            assert json.loads((run_dir / "detections.json").read_text())  # so AP is computed on real detections
        assert summary["metric"] == pytest.approx(_ap_by_pycocotools(run_dir, root), abs=1e-6)


@pytest.mark.parametrize("layout", ["cityscapes", "voc", "folder"])
def test_adapt_runs_every_phase_on_each_segmentation_layout(layout, tmp_path, mbv2_seed):
    root = make_seg_layout(tmp_path / "data", layout)
    summary = run(_config("seg", root, layout, *TINY_SEARCH), tmp_path / "run")
    assert set(summary["phases"]) == {"search", "remap", "finetune", "eval"}
    assert all(p["done"] for p in summary["phases"].values())
    arch = json.loads((tmp_path / "run" / "arch.json").read_text())
    assert summary["arch"]["stages"] == arch["arch"]["stages"] and len(arch["arch"]["stages"]) == 7
    assert (arch["task"], arch["source"]) == ("seg", "search")
    phases = summary["phases"]
    assert summary["search_over_finetune"] == round(phases["search"]["seconds"] / phases["finetune"]["seconds"], 4)
    assert (tmp_path / "run" / "search" / "diagnostics.json").is_file()
    assert (tmp_path / "run" / "search" / "alpha_history.json").exists()
    _assert_metric_recomputes(summary, tmp_path / "run", root, layout)


@pytest.mark.parametrize("task", ["retinanet", "ssdlite"])
def test_adapt_runs_every_phase_for_both_detectors(task, demo_root, tmp_path, mbv2_seed):
    summary = run(_config(task, demo_root, "coco", *TINY_SEARCH), tmp_path / "run")
    assert set(summary["phases"]) == {"search", "remap", "finetune", "eval"}
    detections = json.loads((tmp_path / "run" / "detections.json").read_text())
    assert all({"image_id", "category_id", "bbox", "score"} <= set(d) for d in detections)
    _assert_metric_recomputes(summary, tmp_path / "run", demo_root, "coco")


@pytest.mark.parametrize("task,fmt", [("seg", "folder"), ("retinanet", "coco"), ("ssdlite", "coco")])
def test_train_writes_a_complete_run_directory(task, fmt, demo_root, tmp_path, mbv2_seed):
    summary = run(_config(task, demo_root, fmt, arch="mobilenet_v2"), tmp_path / "run")
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"config.yaml", "arch.json", "arch.net_config.txt", "remap_report.json", "remap_report.md", "model.fna.pt",
            "metrics.json", "ledger.json", "summary.json", "finetune"} <= names
    _assert_metric_recomputes(summary, tmp_path / "run", demo_root, fmt)
    assert set(summary["phases"]) == {"remap", "finetune", "eval"}
    assert all(p["done"] and p["seconds"] > 0 and p["device"].startswith("cpu") for p in summary["phases"].values())
    assert summary["params"] > 0 and summary["madds_data"] < summary["madds_paper_size"]


def test_saved_model_rebuilds_and_reproduces_the_metric(demo_root, tmp_path, mbv2_seed):
    summary = run(_config("seg", demo_root, "folder", arch="fna_deeplabv3"), tmp_path / "run")
    model, info = fna.load(tmp_path / "run" / "model.fna.pt")
    assert info.task == "seg" and info.class_names[0] == "background" and info.arch.name == "fna_deeplabv3"
    weights = find_weights(SEEDS["mobilenet_v2"])
    assert info.seed == {"seed": "mobilenet_v2", "weights": str(weights), "init": "remap",
                         "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    out = subprocess.run([sys.executable, "-m", "fna", "eval", str(tmp_path / "run" / "model.fna.pt"), "--data",
                          str(demo_root), "--format", "folder", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["mIoU"] == pytest.approx(summary["metric"])


def test_resume_skips_finished_phases(demo_root, tmp_path, mbv2_seed):
    cfg = _config("seg", demo_root, "folder", arch="mobilenet_v2")
    first = run(cfg, tmp_path / "run")
    again = run(cfg, tmp_path / "run", resume=True)
    assert again["metric"] == first["metric"] and again["phases"] == first["phases"]


def test_random_init_baseline_records_no_seed(demo_root, tmp_path):
    run(_config("seg", demo_root, "folder", arch="fna_deeplabv3", init="random"), tmp_path / "run")
    _, info = fna.load(tmp_path / "run" / "model.fna.pt")
    assert info.seed == {"seed": None, "init": "random"}
    assert not (tmp_path / "run" / "remap_report.md").exists()


def test_bad_config_values_are_one_line_errors(demo_root):
    with pytest.raises(FnaError, match="finetune config: lr"):
        _config("seg", demo_root, "folder", "finetune.lr=fast", arch="mobilenet_v2").train_config()
    with pytest.raises(FnaError, match="run config: task"):
        load_config(None, [], task="pose", data={"root": str(demo_root), "format": "folder"})


def test_truncated_or_foreign_model_files_are_clear_errors(demo_root, tmp_path, mbv2_seed):
    run(_config("seg", demo_root, "folder", arch="mobilenet_v2"), tmp_path / "run")
    blob = (tmp_path / "run" / "model.fna.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(FnaError, match="truncated or corrupt"):
        fna.load(tmp_path / "cut.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(FnaError, match="not an fna model file"):
        fna.load(tmp_path / "other.pt")
    state = torch.load(tmp_path / "run" / "model.fna.pt", weights_only=False)
    state["format_version"] = 99
    torch.save(state, tmp_path / "future.pt")
    with pytest.raises(FnaError, match="model format v99"):
        fna.load(tmp_path / "future.pt")


def test_train_under_torchrun_with_two_processes(demo_root, tmp_path, mbv2_seed):
    out = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2", "-m",
                          "fna", "train", "--task", "seg", "--data", str(demo_root), "--format", "folder", "--arch",
                          "mobilenet_v2", "--out", str(tmp_path / "run"), "size=[48,48]", *TINY,
                          "finetune.batch_size=4"],  # the total: 2 per process
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["phases"]["finetune"]["done"]
    _assert_metric_recomputes(summary, tmp_path / "run", demo_root, "folder")


@pytest.mark.parametrize("task,fmt", [("seg", "folder"), ("ssdlite", "coco")])
def test_data_augment_false_trains_on_the_plain_training_pipeline(task, fmt, demo_root):
    from fna.pipeline import open_datasets

    def first_item_twice(augment: bool):
        cfg = load_config(None, ["size=[64,64]", f"data.augment={str(augment).lower()}"], task=task,
                          data={"root": str(demo_root), "format": fmt})
        train, _ = open_datasets(cfg)
        torch.manual_seed(0)
        a = train[0][0]
        return a, train[0][0]

    augmented = first_item_twice(True)
    assert not torch.equal(*augmented)  # random augmentation: another image each time
    plain = first_item_twice(False)
    assert torch.equal(*plain) and plain[0].shape[-2:] == (64, 64)

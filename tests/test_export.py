"""`fna export`: the exported segmenter/detector matches PyTorch, and mismatches or bad files fail clearly."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from fna.arch import Arch, Stage
from fna.artifact import load_model, save_model
from fna.cli import app, main
from fna.errors import FnaError
from fna.export import ExportReport, sample_image
from fna.parity import compare_detections, compare_segmentation
from fna.tasks import build_model

CLASSES = ["circle", "square", "triangle"]
KWARGS = {"seg": {}, "retinanet": {"min_size": 64, "max_size": 96}, "ssdlite": {"size": 64}}
# MobileNetV2's shape (stem, e1 block, stages down to stride 32, final conv) with few layers: export time
# grows with the number of traced ops.
ARCH = Arch(stages=(Stage(8, 8, 1, ("k3_e1",)), Stage(8, 12, 2, ("k3_e6",)), Stage(12, 16, 2, ("k5_e3", "k3_e6")),
                    Stage(16, 24, 2, ("k3_e6",)), Stage(24, 32, 2, ("k5_e6",))),
            stem_channels=8, final_channels=64, name="tiny")

pytestmark = pytest.mark.usefixtures("one_thread")


def _trained_like(model: nn.Module, task: str) -> nn.Module:
    """Give a fresh model the spread-out activations and scores of a trained one.

    A fresh model's eval-mode activations fade to ~0 (unit BN statistics) and RetinaNet's scores all sit at
    its 0.01 prior, so parity would be checked on ties. Random BN shifts, BN statistics gathered on noise
    images and (RetinaNet) a wider class layer make logits, scores and boxes distinct.
    """
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None  # cumulative average over the calibration batches
                m.bias.normal_(0, 0.5)
        if task == "retinanet":
            model.head.classification_head.cls_logits.bias.zero_()
            model.head.classification_head.cls_logits.weight.normal_(0, 0.05)
        model.train()
        for _ in range(3):
            model.dense_forward((torch.rand(2, 3, 64, 64) - 0.45) / 0.22)
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``saved(task)`` → path of a small real MobileNetV2 model of that task written by ``save_model``."""
    paths = {}

    def get(task: str):
        if task not in paths:
            model = _trained_like(build_model(task, ARCH, len(CLASSES), **KWARGS[task]), task)
            paths[task] = tmp_path_factory.mktemp(task) / "model.fna.pt"
            save_model(paths[task], model, task, ARCH, CLASSES, KWARGS[task])
        return paths[task]

    return get


def export(*args: str):
    result = CliRunner().invoke(app, ["export", *map(str, args)])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_segmenter_onnx_takes_unit_rgb_and_matches_pytorch_at_several_sizes(saved):
    path = saved("seg")
    result = export(path, "--dynamic", "--size", 64, 64)
    assert result.exit_code == 0, result.output
    assert "1×3×64×64: logits max |Δ|" in result.output and "2×3×53×83" in result.output
    assert "tolerance 0.001" in result.output
    session = ort.InferenceSession(str(path.with_name("model.onnx")), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 3, "height", "width"]
    model, info = load_model(path)
    image = sample_image(72, 40)[None]
    mean, std = torch.tensor(info.preprocessing["mean"]), torch.tensor(info.preprocessing["std"])
    with torch.no_grad():
        ref = model((image - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)).numpy()
    (logits,) = session.run(None, {"image": image.numpy()})
    assert logits.shape == (1, 3, 72, 40) and np.abs(logits).max() > 0.1
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4)


def test_fixed_shape_onnx_has_the_export_size(saved, tmp_path):
    out = tmp_path / "seg.onnx"
    assert export(saved("seg"), "--out", out, "--size", 64, 96).exit_code == 0
    assert ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).get_inputs()[0].shape == [1, 3, 64, 96]


@pytest.mark.parametrize("task", ["retinanet", "ssdlite"])
def test_detector_onnx_includes_decoding_and_nms_and_matches_pytorch(saved, task, tmp_path):
    out = tmp_path / f"{task}.onnx"
    result = export(saved(task), "--dynamic", "--out", out, "--size", 64, 96)
    assert result.exit_code == 0, result.output
    assert result.output.count("without a counterpart") == 0 and "3×64×96:" in result.output
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["boxes", "scores", "labels"]
    model, _ = load_model(saved(task))
    image = sample_image(90, 70)
    with torch.no_grad():
        ref = model([image])[0]
    boxes, scores, labels = session.run(None, {"image": image.numpy()})
    assert len(scores) == len(ref["scores"]) > 10
    assert set(labels.tolist()) <= {0, 1, 2} and labels.dtype == np.int64
    assert boxes[:, 2].max() <= 70 and boxes[:, 3].max() <= 90  # in the input image's pixels
    np.testing.assert_allclose(np.sort(scores), np.sort(ref["scores"].numpy()), atol=1e-4)


@pytest.mark.parametrize("task", ["seg", "ssdlite"])
def test_torchscript_trace_matches_pytorch_at_several_sizes(saved, task, tmp_path):
    out = tmp_path / "model.torchscript.pt"
    result = export(saved(task), "--format", "torchscript", "--dynamic", "--out", out, "--size", 64, 64)
    assert result.exit_code == 0, result.output
    assert out.is_file() and "torchscript" in result.output


def test_export_beyond_a_tiny_tolerance_fails_after_printing_the_differences(saved, tmp_path):
    out = tmp_path / "seg.onnx"
    result = CliRunner().invoke(app, ["export", str(saved("seg")), "--out", str(out), "--size", "64", "64",
                                      "--tolerance", "1e-9"])
    assert isinstance(result.exception, FnaError) and out.is_file()
    assert "1×3×64×64: logits max |Δ|" in result.output and "tolerance 1e-09" in result.output
    assert re.search(r"seg.onnx: the onnx model differs from PyTorch on 1 of 1 sample inputs: max \|Δ\| \S+ > "
                     r"tolerance 1e-09 \(the file is kept for inspection\)$", str(result.exception))


def test_outputs_beyond_the_tolerance_fail_with_the_numbers():
    logits = np.random.default_rng(0).uniform(-1, 1, size=(1, 3, 8, 8)).astype(np.float32)
    close, far = compare_segmentation(logits, logits + 1e-5), compare_segmentation(logits, logits + 0.01)
    report = ExportReport(Path("m.onnx"), "onnx", "seg", False, 1e-3, [close, far])
    assert close.ok(1e-3) and not far.ok(1e-3) and not report.ok
    with pytest.raises(FnaError, match=r"m.onnx: the onnx model differs from PyTorch on 1 of 2 sample inputs: "
                                       r"max \|Δ\| 1.00e-02 > tolerance 0.001"):
        report.check()


def test_detections_match_by_label_and_score_and_missing_ones_fail():
    boxes = np.array([[0, 0, 10, 10], [5, 5, 30, 40]], dtype=np.float32)
    ref = [boxes, np.array([0.9, 0.5], dtype=np.float32), np.array([1, 2])]
    swapped = [boxes[::-1] + 0.05, np.array([0.5, 0.9], dtype=np.float32), np.array([2, 1])]
    same = compare_detections(ref, swapped, side=100, tolerance=1e-3)
    assert same.unmatched == 0 and same.diff == pytest.approx(0.05 / 100, rel=1e-4)
    dropped = compare_detections(ref, [a[:1] for a in ref], side=100, tolerance=1e-3)
    assert dropped.unmatched == 1 and not dropped.ok(1e-3) and "1 without a counterpart" in dropped.summary
    with pytest.raises(FnaError, match="on 1 of 1 sample inputs: 1 detections without a counterpart"):
        ExportReport(Path("m.onnx"), "onnx", "ssdlite", False, 1e-3, [dropped]).check()
    relabelled = compare_detections(ref, [ref[0], ref[1], np.array([1, 1])], side=100, tolerance=1e-3)
    assert relabelled.unmatched == 2


def test_missing_model_file_is_one_line_error_from_the_command_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fna", "export", str(tmp_path / "model.fna.pt")],
                         capture_output=True, text=True)
    assert out.returncode == 1 and "model.fna.pt: model file not found" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("make,args,message", [
    (lambda p: p.write_bytes(b"not a model"), (), "not a readable model file"),
    (lambda p: torch.save({"weights": 1}, p), (), "not an fna model file"),
    (lambda p: torch.save({"weights": 1}, p), ("--format", "tflite"), "unknown export format 'tflite'"),
    (lambda p: torch.save({"weights": 1}, p), ("--tolerance", "-1"), "tolerance must be a non-negative number"),
])
def test_bad_input_is_one_line_error(tmp_path, monkeypatch, capsys, make, args, message):
    path = tmp_path / "model.fna.pt"
    make(path)
    monkeypatch.setattr(sys, "argv", ["fna", "export", str(path), *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and message in err and len(err.strip().splitlines()) == 1


def test_out_in_a_missing_folder_creates_it_from_the_command_line(saved, tmp_path):
    out = tmp_path / "exports" / "v1" / "seg.onnx"
    result = subprocess.run([sys.executable, "-m", "fna", "export", str(saved("seg")), "--out", str(out),
                             "--size", "64", "64"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert out.is_file() and [p.name for p in out.parent.iterdir()] == ["seg.onnx"]  # no temporary file left


def test_out_below_a_file_is_one_line_error(saved, tmp_path, monkeypatch, capsys):
    (tmp_path / "exports").write_text("")
    out = tmp_path / "exports" / "m.onnx"
    monkeypatch.setattr(sys, "argv", ["fna", "export", str(saved("seg")), "--out", str(out)])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and len(err.strip().splitlines()) == 1
    assert f"m.onnx: cannot create its folder: {tmp_path / 'exports'} is a file" in err

"""Export a saved model (``model.fna.pt``) to ONNX or TorchScript and check it against PyTorch.

The exported graph is the whole model; callers feed RGB floats in ``[0, 1]`` and never normalise:

* **segmentation** — ``image [B, 3, H, W]`` → ``logits [B, C, H, W]``. The ImageNet mean/std
  normalisation is part of the graph (a subtract and a divide), and the logits are upsampled to the
  input size. Take ``argmax`` over ``C`` for the label map.
* **detection** (RetinaNet, SSDLite) — one ``image [3, H, W]`` → ``boxes [N, 4]`` (x1, y1, x2, y2 in
  the input image's pixels), ``scores [N]``, ``labels [N]`` (int64, ``0 .. C-1``, the order of the
  model's class names). Everything torchvision does at inference is in the graph: normalisation,
  resizing to the model's input size, backbone and head, box decoding against the anchors, score
  threshold, per-class NMS, top-k, and rescaling of the boxes to the input image. ``N`` varies per image.

Without ``dynamic`` the ONNX input shape is fixed to the export size (batch 1 for segmentation); with
it, height and width (and the segmentation batch) are free. ONNX uses the TorchScript-based exporter
(``torch.onnx.export(dynamo=False)``, opset :data:`OPSET`), which follows torchvision's tracing paths
for its detection models. TorchScript files are traces of the same wrappers; they accept other sizes too.

After writing the file, :func:`export_model` runs it (onnxruntime's CPU provider, or ``torch.jit.load``)
on sample inputs — scikit-image's photo of a cat resized to each size, plus noise images in a
segmentation batch — and compares with the PyTorch model: segmentation by the max absolute logit
difference (argmax agreement is reported too); detection by matching every detection to one of the
other side with the same label and a score within the tolerance, then the max score difference and the
max box-corner difference in units of the image's longer side. A detection without such a counterpart
fails the check. So one tolerance reads as a fraction of each output's scale: logit differences are
divided by the largest |logit| (at least 1), scores lie in ``[0, 1]``, boxes are divided by the image side.

Known limitation: where detection scores tie (e.g. many saturated at exactly 1.0 in a model with huge
logits), NMS and top-k may keep different, equally valid boxes in onnxruntime and PyTorch, and the check
fails although the graphs agree up to rounding. TorchScript traces match PyTorch exactly.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fna.artifact import ModelInfo, load_model
from fna.checkpoint import os_error_in, write_atomic
from fna.errors import FnaError

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
OPSET = 17
DEFAULT_TOLERANCE = 1e-3

Runner = Callable[[torch.Tensor], list[np.ndarray]]


class SegmenterExport(nn.Module):
    """``[0, 1]`` RGB batch → normalise → segmenter → logits at the input size."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model((image - self.mean) / self.std)


class DetectorExport(nn.Module):
    """One ``[0, 1]`` RGB image → the detector's full inference → ``(boxes, scores, labels)`` tensors."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        det = self.model([image])[0]
        return det["boxes"], det["scores"], det["labels"]


def exportable(model: nn.Module, info: ModelInfo) -> nn.Module:
    """The module that gets exported: ``model`` wrapped to take ``[0, 1]`` RGB and return plain tensors."""
    if info.task == "seg":
        return SegmenterExport(model, info.preprocessing["mean"], info.preprocessing["std"]).eval()
    if info.task in ("retinanet", "ssdlite"):
        return DetectorExport(model).eval()
    raise FnaError(f"cannot export a {info.task!r} model: expected seg, retinanet or ssdlite")


def default_size(info: ModelInfo) -> tuple[int, int]:
    """The export/check size: the run's configured size, else the detector's input size, else 512×512."""
    if info.config.get("size"):
        h, w = info.config["size"]
        return int(h), int(w)
    kw = info.model_kwargs
    if info.task == "retinanet":
        return int(kw.get("min_size", 800)), int(kw.get("max_size", 1333))
    if info.task == "ssdlite":
        return int(kw.get("size", 320)), int(kw.get("size", 320))
    return 512, 512


def sample_image(h: int, w: int) -> torch.Tensor:
    """A real photo (scikit-image's ``chelsea``) resized to ``[3, h, w]`` in ``[0, 1]``."""
    from skimage.data import chelsea

    photo = torch.from_numpy(chelsea()).permute(2, 0, 1).float().div(255)[None]
    return F.interpolate(photo, size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)


def sample_inputs(task: str, size: tuple[int, int], dynamic: bool) -> list[torch.Tensor]:
    """Inputs to check the export on: the export size, and with ``dynamic`` two other shapes.

    Segmentation inputs are batches (the photo, then noise images); detection inputs single images.
    """
    h, w = size
    shapes = [(1, h, w)]
    if dynamic:
        shapes += [(2, max(32, 3 * h // 4 + 5), w + w // 4 + 3), (1, h + h // 2 + 1, max(32, 3 * w // 4))]
    gen = torch.Generator().manual_seed(0)
    inputs = []
    for batch, sh, sw in shapes:
        images = [sample_image(sh, sw), *(torch.rand(3, sh, sw, generator=gen) for _ in range(batch - 1))]
        inputs.append(torch.stack(images) if task == "seg" else images[0])
    return inputs


@dataclass
class Parity:
    """How the exported model's outputs on one input differ from PyTorch's."""

    diff: float  # compared with the tolerance
    unmatched: int  # detections without a counterpart (always 0 for segmentation)
    summary: str
    shape: tuple[int, ...] = ()  # the input's

    def ok(self, tolerance: float) -> bool:
        return self.diff <= tolerance and self.unmatched == 0


def compare_segmentation(ref: np.ndarray, got: np.ndarray) -> Parity:
    """Max absolute logit difference relative to the largest |logit| (at least 1); argmax agreement too."""
    if ref.shape != got.shape:
        return Parity(float("inf"), 0, f"logits shape {got.shape}, PyTorch {ref.shape}")
    diff, scale = float(np.abs(ref - got).max()), max(1.0, float(np.abs(ref).max()))
    agree = float((ref.argmax(1) == got.argmax(1)).mean())
    return Parity(diff / scale, 0, f"logits max |Δ| {diff:.2e} = {diff / scale:.2e} of the largest |logit| "
                                   f"{scale:.2f}, argmax agreement {agree:.4%}")


def compare_detections(ref: list[np.ndarray], got: list[np.ndarray], side: int, tolerance: float) -> Parity:
    """Match detections (same label, score within ``tolerance``, closest box), then the worst differences.

    ``ref``/``got`` are ``[boxes, scores, labels]``; box differences are divided by ``side`` (the image's
    longer side) so one tolerance serves scores and boxes. Greedy in PyTorch's score order.
    """
    (rb, rs, rl), (gb, gs, gl) = ref, got
    used = np.zeros(len(gs), dtype=bool)
    box_diff = score_diff = 0.0
    unmatched = 0
    for i in np.argsort(-rs, kind="stable"):
        cand = np.flatnonzero(~used & (gl == rl[i]) & (np.abs(gs - rs[i]) <= tolerance))
        if len(cand) == 0:
            unmatched += 1
            continue
        corner = np.abs(gb[cand] - rb[i]).max(axis=1)
        j = cand[corner.argmin()]
        used[j] = True
        box_diff = max(box_diff, float(corner.min()))
        score_diff = max(score_diff, float(abs(gs[j] - rs[i])))
    unmatched += int((~used).sum())
    diff = max(score_diff, box_diff / side)
    text = (f"{len(rs)} detections (exported {len(gs)}), scores max |Δ| {score_diff:.2e}, boxes max |Δ| "
            f"{box_diff:.2e} px = {box_diff / side:.2e} of the image side")
    if unmatched:
        text += f", {unmatched} without a counterpart (same label, score within the tolerance)"
    return Parity(diff, unmatched, text)


@dataclass
class ExportReport:
    """What was exported where, and the parity check on each sample input."""

    path: Path
    format: str
    task: str
    dynamic: bool
    tolerance: float
    checks: list[Parity] = field(default_factory=list)

    @property
    def worst(self) -> float:
        return max(c.diff for c in self.checks)

    @property
    def ok(self) -> bool:
        return all(c.ok(self.tolerance) for c in self.checks)

    def check(self) -> None:
        """Raise :class:`FnaError` when any sample differs from PyTorch beyond the tolerance."""
        if self.ok:
            return
        bad = [c for c in self.checks if not c.ok(self.tolerance)]
        unmatched = sum(c.unmatched for c in bad)
        reasons = [f"max |Δ| {self.worst:.2e} > tolerance {self.tolerance:g}"] if self.worst > self.tolerance else []
        if unmatched:
            reasons.append(f"{unmatched} detections without a counterpart (same label, score within the tolerance)")
        raise FnaError(f"{self.path}: the {self.format} model differs from PyTorch on {len(bad)} of "
                       f"{len(self.checks)} sample inputs: {'; '.join(reasons)} (the file is kept for inspection)")


def default_out(model_path: Path, fmt: str) -> Path:
    """``runs/x/model.fna.pt`` → ``runs/x/model.onnx`` (or ``model.torchscript.pt``)."""
    name = model_path.name.removesuffix(".pt").removesuffix(".fna")
    return model_path.with_name(name + FORMATS[fmt])


def export_onnx(module: nn.Module, example: torch.Tensor, f: Path | IO[bytes], task: str, dynamic: bool) -> None:
    """Write ``module`` as ONNX (TorchScript-based exporter); free H/W (and segmentation batch) if ``dynamic``."""
    if task == "seg":
        inputs, outputs = ["image"], ["logits"]
        axes = {"image": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch", 2: "height", 3: "width"}}
    else:
        inputs, outputs = ["image"], ["boxes", "scores", "labels"]
        axes = {"image": {1: "height", 2: "width"}}
    torch.onnx.export(module, (example,), str(f) if isinstance(f, Path) else f, dynamo=False, opset_version=OPSET,
                      input_names=inputs, output_names=outputs, dynamic_axes=axes if dynamic else None)


def export_torchscript(module: nn.Module, example: torch.Tensor, f: Path | IO[bytes]) -> None:
    """Write a ``torch.jit.trace`` of ``module`` (torchvision's tracing paths keep detector sizes free)."""
    torch.jit.save(torch.jit.trace(module, (example,), check_trace=False), str(f) if isinstance(f, Path) else f)


def onnx_runner(path: Path) -> Runner:
    """Run an ONNX file with onnxruntime on the CPU."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x.numpy()})


def torchscript_runner(path: Path) -> Runner:
    """Run a TorchScript file on the CPU."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
        module = torch.jit.load(str(path), map_location="cpu").eval()

    def run(x: torch.Tensor) -> list[np.ndarray]:
        with torch.no_grad():
            out = module(x)
        return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]

    return run


def check_parity(task: str, module: nn.Module, run: Runner, x: torch.Tensor, tolerance: float) -> Parity:
    """Compare the exported model (``run``) with ``module`` on one input."""
    with torch.no_grad():
        ref = module(x)
    got = run(x)
    if task == "seg":
        parity = compare_segmentation(ref.numpy(), got[0])
    else:
        parity = compare_detections([t.numpy() for t in ref], got, max(x.shape[-2:]), tolerance)
    parity.shape = tuple(x.shape)
    return parity


def export_model(model_path: str | Path, fmt: str = "onnx", out: str | Path | None = None, dynamic: bool = False,
                 size: tuple[int, int] | None = None, tolerance: float = DEFAULT_TOLERANCE) -> ExportReport:
    """Export ``model.fna.pt`` to ``fmt`` and check it against PyTorch on sample inputs (see the module doc).

    Returns the report; call :meth:`ExportReport.check` to raise if the outputs differ beyond ``tolerance``.
    """
    if fmt not in FORMATS:
        raise FnaError(f"unknown export format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if not tolerance >= 0:
        raise FnaError(f"tolerance must be a non-negative number, got {tolerance}")
    if size is not None and min(size) < 32:
        raise FnaError(f"export size {size[0]}×{size[1]} is too small: both sides must be at least 32")
    model_path = Path(model_path)
    model, info = load_model(model_path)
    module = exportable(model, info)
    samples = sample_inputs(info.task, tuple(size) if size else default_size(info), dynamic)
    out = Path(out) if out is not None else default_out(model_path, fmt)

    def write(f: IO[bytes]) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer and exporter-deprecation warnings, not user-actionable
            try:
                if fmt == "onnx":
                    export_onnx(module, samples[0], f, info.task, dynamic)
                else:
                    export_torchscript(module, samples[0], f)
            except Exception as e:
                if os_error_in(e) is not None:  # full disk, read-only file system: write_atomic says so
                    raise
                raise FnaError(f"{fmt} export of {model_path} failed: {type(e).__name__}: "
                               f"{(str(e).splitlines() or [''])[0]}") from e

    write_atomic(out, write)  # creates a missing folder; a full or read-only disk is one line naming ``out``
    run = onnx_runner(out) if fmt == "onnx" else torchscript_runner(out)
    checks = [check_parity(info.task, module, run, x, tolerance) for x in samples]
    return ExportReport(out, fmt, info.task, dynamic, tolerance, checks)

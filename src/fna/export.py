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
from fna.parity import Parity
from fna.tasks import Task, get_task

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
OPSET = 17
DEFAULT_TOLERANCE = 1e-3

Runner = Callable[[torch.Tensor], list[np.ndarray]]


def default_size(info: ModelInfo) -> tuple[int, int]:
    """The export/check size: the run's configured size, else the task's (the detector's input size)."""
    if info.config.get("size"):
        h, w = info.config["size"]
        return int(h), int(w)
    return get_task(info.task).default_export_size(info.model_kwargs)


def sample_image(h: int, w: int) -> torch.Tensor:
    """A real photo (scikit-image's ``chelsea``) resized to ``[3, h, w]`` in ``[0, 1]``."""
    from skimage.data import chelsea

    photo = torch.from_numpy(chelsea()).permute(2, 0, 1).float().div(255)[None]
    return F.interpolate(photo, size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)


def sample_inputs(task: Task, size: tuple[int, int], dynamic: bool) -> list[torch.Tensor]:
    """Inputs to check the export on: the export size, and with ``dynamic`` two other shapes (the
    photo, then noise images; the task makes them a batch or takes the one image)."""
    h, w = size
    shapes = [(1, h, w)]
    if dynamic:
        shapes += [(2, max(32, 3 * h // 4 + 5), w + w // 4 + 3), (1, h + h // 2 + 1, max(32, 3 * w // 4))]
    gen = torch.Generator().manual_seed(0)
    return [task.export_input([sample_image(sh, sw), *(torch.rand(3, sh, sw, generator=gen) for _ in range(b - 1))])
            for b, sh, sw in shapes]


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


def export_onnx(module: nn.Module, example: torch.Tensor, f: Path | IO[bytes], task: Task, dynamic: bool) -> None:
    """Write ``module`` as ONNX (TorchScript-based exporter); the task's axes are free if ``dynamic``."""
    inputs, outputs, axes = task.export_names
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


def check_parity(task: Task, module: nn.Module, run: Runner, x: torch.Tensor, tolerance: float) -> Parity:
    """Compare the exported model (``run``) with ``module`` on one input."""
    with torch.no_grad():
        ref = module(x)
    parity = task.compare(ref, run(x), x, tolerance)
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
    task = get_task(info.task)
    module = task.exportable(model, info.preprocessing["mean"], info.preprocessing["std"])
    samples = sample_inputs(task, tuple(size) if size else default_size(info), dynamic)
    out = Path(out) if out is not None else default_out(model_path, fmt)

    def write(f: IO[bytes]) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer and exporter-deprecation warnings, not user-actionable
            try:
                if fmt == "onnx":
                    export_onnx(module, samples[0], f, task, dynamic)
                else:
                    export_torchscript(module, samples[0], f)
            except Exception as e:
                if os_error_in(e) is not None:  # full disk, read-only file system: write_atomic says so
                    raise
                raise FnaError(f"{fmt} export of {model_path} failed: {type(e).__name__}: "
                               f"{(str(e).splitlines() or [''])[0]}") from e

    write_atomic(out, write)  # creates a missing folder; a full or read-only disk is one line naming ``out``
    run = onnx_runner(out) if fmt == "onnx" else torchscript_runner(out)
    checks = [check_parity(task, module, run, x, tolerance) for x in samples]
    return ExportReport(out, fmt, info.task, dynamic, tolerance, checks)

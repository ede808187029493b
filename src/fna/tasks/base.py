"""The :class:`Task` interface and the task registry.

A task is everything that differs between segmentation, RetinaNet and SSDLite (and any task a user
adds): the model built on a backbone and the feature taps it needs; the paper's and the default input
size and how a size becomes model arguments; the search defaults and the fine-tuning recipe; the
dataset formats, transforms and collate; the loss; the evaluator and its metric; the export wrapper
and its parity check. Code outside :mod:`fna.tasks` asks the task and never switches on its name.
Adding a task is one module with a :class:`Task` subclass plus one :func:`register_task` call.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from fna.arch import Arch
from fna.backbone import Backbone
from fna.errors import FnaError

if TYPE_CHECKING:
    from fna.evaluate import EvalConfig
    from fna.parity import Parity
    from fna.train import TrainConfig


class Task(ABC):
    """One task. Subclasses set the class attributes, implement :meth:`taps` and :meth:`loss`, and
    override what their kind of task needs (data, evaluation, export).

    ``model`` is the task model class, built as ``model(backbone, num_classes, **model_kwargs(size))``.
    """

    name: ClassVar[str]
    model: ClassVar[type[nn.Module]]
    metric: ClassVar[str]  # the key of the main metric in evaluate()'s result
    num_classes: ClassVar[int]  # the paper's
    paper_size: ClassVar[tuple[int, int]]  # where the paper counts MAdds (SPEC §6)
    default_size: ClassVar[tuple[int, int]]  # the training size when a run gives none
    output_stride: ClassVar[int | None] = None
    formats: ClassVar[tuple[str, ...]] = ()  # dataset formats open_dataset reads
    search_defaults: ClassVar[dict[str, Any] | None] = None  # SearchConfig fields; None: not searchable
    paper_costs: ClassVar[dict[str, tuple[int, int]]] = {}  # built-in arch → the paper's (MAdds, params)
    undefined: ClassVar[str] = "undefined"  # why the metric is undefined on a split (None)
    input_rule: ClassVar[str] = ""  # how an image becomes the network's input, for messages
    preprocessing: ClassVar[str] = "RGB float in [0, 1]"  # what the model's forward takes
    export_names: ClassVar[tuple[list[str], list[str], dict[str, dict[int, str]]]] = (["image"], ["output"], {})
    collate: ClassVar[Callable[[list[Any]], Any] | None] = None  # samples → one batch for loss and evaluation

    # -- the model ----------------------------------------------------------------------------------
    @abstractmethod
    def taps(self, arch: Arch) -> tuple[str, ...]:
        """The backbone feature taps this task's model reads (see :mod:`fna.backbone`)."""

    def check_size(self, size: tuple[int, int]) -> None:
        """:class:`ValueError` when ``size`` means nothing for this task."""
        if min(size) < 1:
            raise ValueError(f"both sides of size must be >= 1, got {list(size)}")

    def model_kwargs(self, size: tuple[int, int] | None = None) -> dict[str, Any]:
        """The model's constructor arguments for input ``size`` (default: :attr:`default_size`)."""
        return {}

    def network_input(self, size: tuple[int, int], image_hw: tuple[int, int]) -> tuple[int, int]:
        """The network's input size for an ``image_hw`` image when training at ``size``."""
        return tuple(image_hw)

    def backbone(self, arch: Arch) -> Backbone:
        """This task's backbone for ``arch`` (fresh weights)."""
        return Backbone(arch, taps=self.taps(arch), output_stride=self.output_stride)

    def head(self, backbone: nn.Module, num_classes: int, **kwargs: Any) -> nn.Module:
        """The task model on ``backbone`` (ours, or the super network during search)."""
        return self.model(backbone, num_classes, **kwargs)

    def build_model(self, arch: Arch, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
        """The task model on ``arch`` with fresh weights (``num_classes`` defaults to the paper's)."""
        return self.head(self.backbone(arch), num_classes or self.num_classes, **kwargs)

    # -- training -----------------------------------------------------------------------------------
    def recipe(self, batch_size: int, iters: int) -> TrainConfig:
        """The fine-tuning recipe (SPEC §5) for a total ``batch_size`` and ``iters`` steps."""
        raise FnaError(f"task {self.name!r} has no fine-tuning recipe")

    @abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The training loss of ``model`` (in train mode) on one collated batch."""

    # -- data ---------------------------------------------------------------------------------------
    def train_transforms(self, size: tuple[int, int], scale: tuple[float, float] = (0.75, 2.0),
                         augment: bool = True) -> Callable | None:
        """The training pipeline at ``size``; ``augment=False`` the same without augmentation (what the
        search's weight half uses by default, SPEC §4). ``None``: the task's datasets bring their own."""
        return None

    def without_augmentation(self, dataset: Any, size: tuple[int, int], scale: tuple[float, float]) -> Any:
        """``dataset`` (same items) with the un-augmented training pipeline, if the task has one."""
        plain = self.train_transforms(size, scale, augment=False)
        if plain is None:
            return dataset
        dataset = copy.copy(dataset)
        dataset.transforms = plain
        return dataset

    def open_dataset(self, root: str | Path, fmt: str, split: str, train_size: tuple[int, int] | None = None,
                     scale: tuple[float, float] = (0.75, 2.0), skip_bad: bool = False) -> Any:
        """A split with the training transforms at ``train_size``, or (``None``) the evaluation ones."""
        raise FnaError(f"task {self.name!r} reads no datasets")

    # -- evaluation and export ----------------------------------------------------------------------
    def batch_score(self, model: nn.Module, batch: Any) -> tuple[str, float, float] | None:
        """A quick score of ``model`` (in eval mode) on one collated training batch, beside the score of
        the trivial predictor: ``(name, score, trivial)``, or ``None`` if the task has none."""
        return None

    def format_metric(self, value: float | None) -> str:
        """``0.1234``, or why the metric is undefined (``None``) on this split."""
        return self.undefined if value is None else f"{value:.4f}"

    def metric_lines(self, metrics: dict[str, Any]) -> list[str]:
        """``name: value`` for every scalar metric; an undefined one says why."""
        return [f"{name}: {self.format_metric(value)}" for name, value in metrics.items()
                if not isinstance(value, dict)]

    def evaluate(self, model: nn.Module, dataset: Any, cfg: EvalConfig, device: torch.device | str,
                 class_names: tuple[str, ...], results_path: Path | None = None) -> dict[str, Any]:
        """The task's metrics of ``model`` on ``dataset`` (``metric`` among them, ``None`` if undefined)."""
        raise FnaError(f"task {self.name!r} has no evaluator")

    def exportable(self, model: nn.Module, mean: list[float], std: list[float]) -> nn.Module:
        """``model`` wrapped to take RGB floats in ``[0, 1]`` and return plain tensors."""
        raise FnaError(f"cannot export a {self.name!r} model")

    def export_input(self, images: list[torch.Tensor]) -> torch.Tensor:
        """What the exported graph takes, from ``[3, H, W]`` images (a batch, or the first image)."""
        return images[0]

    def default_export_size(self, model_kwargs: dict[str, Any]) -> tuple[int, int]:
        """The export and check size when neither the run nor the user gives one."""
        return 512, 512

    def compare(self, ref: Any, got: list[Any], x: torch.Tensor, tolerance: float) -> Parity:
        """How far the exported outputs ``got`` are from PyTorch's ``ref`` on input ``x``."""
        raise FnaError(f"cannot export a {self.name!r} model")


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Make ``task`` known by its name (to the CLI, configs, model files); returns it."""
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise FnaError(f"unknown task {name!r}: expected one of {', '.join(TASKS)}")
    return TASKS[name]


def build_model(task: str, arch: Arch, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """The task's model on ``arch`` with fresh weights (``num_classes`` defaults to the paper's).

    ``kwargs`` go to the task model (e.g. ``min_size``/``max_size`` for RetinaNet, ``size`` for SSDLite).
    """
    return get_task(task).build_model(arch, num_classes, **kwargs)

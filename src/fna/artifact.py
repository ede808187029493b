"""``model.fna.pt``: one file that rebuilds a fine-tuned model with nothing else.

It holds the architecture, task, classes, task-model arguments, preprocessing, seed provenance
(name, weights sha256), the run's config, the package version and git commit, and the weights.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from torch import nn

from fna.arch import Arch, ArchError
from fna.checkpoint import load, save_atomic
from fna.data.base import IMAGENET_MEAN, IMAGENET_STD
from fna.errors import FnaError
from fna.tasks import build_model, get_task

FORMAT = "fna-model"
FORMAT_VERSION = 1
_FIELDS = ("task", "arch", "class_names", "model_kwargs", "seed", "config", "preprocessing", "fna_version", "commit",
           "state_dict")


def package_version() -> str:
    try:
        return version("fna")
    except PackageNotFoundError:  # running from a source tree without installing
        return "unknown"


def git_commit() -> str:
    """The commit of the source tree this package runs from, or ``unknown``."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


@dataclass
class ModelInfo:
    """Everything about a saved model except its weights."""

    task: str
    arch: Arch
    class_names: list[str]
    model_kwargs: dict[str, Any]
    seed: dict[str, Any]
    config: dict[str, Any]
    preprocessing: dict[str, Any]
    version: str
    commit: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def save_model(path: str | Path, model: nn.Module, task: str, arch: Arch, class_names: list[str],
               model_kwargs: dict[str, Any] | None = None, seed: dict[str, Any] | None = None,
               config: dict[str, Any] | None = None) -> None:
    """Write ``model`` and what it takes to rebuild it as one file (atomically)."""
    save_atomic({
        "format": FORMAT, "format_version": FORMAT_VERSION, "fna_version": package_version(), "commit": git_commit(),
        "task": task, "arch": arch.to_dict(), "class_names": list(class_names), "model_kwargs": model_kwargs or {},
        "seed": seed or {}, "config": config or {},
        "preprocessing": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                          "input": get_task(task).preprocessing},
        "state_dict": model.state_dict()}, path)


def load_model(path: str | Path) -> tuple[nn.Module, ModelInfo]:
    """Rebuild the model saved by :func:`save_model` (in eval mode) and its :class:`ModelInfo`.

    Only tensors and plain data are read from the file (``torch.load(weights_only=True)``); a file that
    would run code is refused with :class:`fna.checkpoint.UnsafeFileError`.
    """
    path = Path(path)
    if not path.is_file():
        raise FnaError(f"{path}: model file not found")
    blob = load(path, "model file")  # tensors and plain data only: a crafted file cannot run code
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise FnaError(f"{path}: not an fna model file (expected a file written by `fna adapt`/`fna train`)")
    if blob.get("format_version") != FORMAT_VERSION:
        raise FnaError(f"{path}: written by fna {blob.get('fna_version')} in model format "
                       f"v{blob.get('format_version')}; this fna {package_version()} reads v{FORMAT_VERSION}")
    missing = [k for k in _FIELDS if k not in blob]
    if missing or not isinstance(blob["state_dict"], dict):
        what = f"missing {', '.join(missing)}" if missing else "its weights are not a state dict"
        raise FnaError(f"{path}: damaged fna model file ({what})")
    try:
        arch = Arch.from_dict(blob["arch"])
    except ArchError as e:
        raise FnaError(f"{path}: stored architecture is invalid ({e})") from None
    info = ModelInfo(task=blob["task"], arch=arch, class_names=blob["class_names"], model_kwargs=blob["model_kwargs"],
                     seed=blob["seed"], config=blob["config"], preprocessing=blob["preprocessing"],
                     version=blob["fna_version"], commit=blob["commit"])
    model = build_model(info.task, arch, info.num_classes, **info.model_kwargs)
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as e:
        raise FnaError(f"{path}: weights do not fit the stored architecture ({str(e).splitlines()[0]})") from None
    return model.eval(), info

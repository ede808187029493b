"""Adding a task is one module and one registry line: a toy task defined only here runs the whole pipeline
(search, remap, fine-tune, evaluate, model file) without any change elsewhere.

The toy task classifies each demo image by the most frequent shape in its mask.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

import fna
from fna.backbone import Classifier
from fna.data import open_segmentation, seg_eval_transforms
from fna.data.demo import write_demo
from fna.pipeline import load_config, run
from fna.tasks import TASKS, Task, register_task
from fna.train import TrainConfig


class MajorityShape(Dataset):
    """A segmentation split as ``(normalised image, label of the most frequent non-background class)``."""

    def __init__(self, seg: Any) -> None:
        self.seg = seg
        self.class_names = seg.class_names
        self.skipped = seg.skipped

    def verify(self) -> MajorityShape:
        self.seg.verify()
        return self

    def __len__(self) -> int:
        return len(self.seg)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.seg[i]
        ids = mask[(mask > 0) & (mask != 255)]
        return image, torch.bincount(ids, minlength=len(self.class_names)).argmax() if len(ids) else torch.tensor(0)


class ToyTask(Task):
    name = "toy_majority"
    model = Classifier
    metric = "accuracy"
    num_classes = 6
    paper_size = default_size = (64, 64)
    formats = ("folder",)
    search_defaults = dict(space={"stages": [{"max_depth": 2, "kernels": [3, 5], "expansions": [3, 6]}] * 5
                                  + [{"max_depth": 1, "kernels": [3, 5], "expansions": [3, 6]}]},
                           epochs=2, arch_start_epoch=1, weight_steps_per_arch_step=1, batch_size=2, optimizer="sgd",
                           lr=0.01, weight_decay=0.0, schedule="constant", lam=0.1, temperature=1.0)
    collate = staticmethod(lambda items: (torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])))

    def taps(self, arch: Any) -> tuple[str, ...]:
        return ("final",)

    def recipe(self, batch_size: int, iters: int) -> TrainConfig:
        return TrainConfig(iters=iters, batch_size=batch_size, optimizer="adamw", lr=1e-3, weight_decay=0.0)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(model(images), labels)

    def open_dataset(self, root, fmt, split, train_size=None, scale=(1.0, 1.0), skip_bad=False) -> MajorityShape:
        return MajorityShape(open_segmentation(root, fmt, split, seg_eval_transforms(), skip_bad))

    def evaluate(self, model, dataset, cfg, device, class_names, results_path=None) -> dict[str, Any]:
        model.eval().to(device)
        with torch.no_grad():
            hits = [int(model(image[None].to(device)).argmax(1).item() == int(label)) for image, label in dataset]
        return {"accuracy": sum(hits) / len(hits)}


@pytest.fixture
def toy_task():
    task = register_task(ToyTask())  # the one registry line
    yield task
    TASKS.pop(task.name)


def test_a_task_defined_outside_the_package_runs_the_whole_pipeline(toy_task, tmp_path, mbv2_seed, one_thread):
    write_demo(tmp_path / "data", n_train=8, n_val=4, size=64, seed=4)
    cfg = load_config(None, ["finetune.iters=4", "finetune.batch_size=2", "search.progress=false"],
                      task="toy_majority", data={"root": str(tmp_path / "data"), "format": "folder"})
    summary = run(cfg, tmp_path / "run")
    assert set(summary["phases"]) == {"search", "remap", "finetune", "eval"}
    assert summary["metric_name"] == "accuracy"
    model, info = fna.load(tmp_path / "run" / "model.fna.pt")
    assert info.task == "toy_majority" and info.arch.stages == fna.arch.get_arch(tmp_path / "run" / "arch.json").stages
    val = toy_task.open_dataset(tmp_path / "data", "folder", "val")
    with torch.no_grad():  # the summary's metric, recomputed from the saved model
        right = sum(int(model(image[None]).argmax(1).item() == int(label)) for image, label in val)
    assert summary["metric"] == right / len(val)

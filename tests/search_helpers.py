"""Small real objects for the super-network and search tests: a tiny seed, a small space, in-memory data.

Plain functions, importable by the test files and by the ``torchrun`` worker script.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from fna.arch import Arch, Stage
from fna.backbone import Backbone, Classifier
from fna.search import SearchConfig
from fna.seeds import Seed
from fna.supernet import SearchSpace, StageSpace

SIZE = 64


def two_process_config(**overrides: object) -> SearchConfig:
    """The tiny segmentation search that tests run in one process and under ``torchrun`` (total batch 4)."""
    return SearchConfig.for_task("seg", **{
        "space": tiny_space().to_dict(), "num_classes": 3, "cost_size": (64, 64), "epochs": 2, "arch_start_epoch": 1,
        "batch_size": 4, "lr": 0.01, "warmup_iters": 0, "progress": False, "tensorboard": False, "device": "cpu",
        "debug_rank_files": True, **overrides})


def tiny_seed_arch() -> Arch:
    """An MBConv net with MobileNetV2's shape (stem, e1 block, downsampling stages to stride 32, final conv)."""
    return Arch(stages=(Stage(8, 8, 1, ("k3_e1",)), Stage(8, 8, 2, ("k3_e6", "k3_e6")),
                        Stage(8, 16, 2, ("k3_e6", "k3_e6")), Stage(16, 16, 2, ("k3_e6",)),
                        Stage(16, 24, 2, ("k3_e6",))),
                stem_channels=8, final_channels=32, name="tiny")


def tiny_seed(seed: int = 0) -> Seed:
    """A seed with random 'ImageNet' weights and non-trivial BN statistics."""
    gen = torch.Generator().manual_seed(seed)
    model = Classifier(Backbone(tiny_seed_arch()), 10)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5 if "running_var" in name
                        else 0.3 * torch.randn(t.shape, generator=gen))
    return Seed("tiny", tiny_seed_arch(), model.state_dict(), "", "")


def tiny_space(allow_skip: bool = True) -> SearchSpace:
    """2 layers per searched stage (1 in the last), kernels 3/5, expansions 3/6."""
    return SearchSpace(tuple(StageSpace(d, (3, 5), (3, 6), allow_skip) for d in (2, 2, 2, 1)), "tiny")


class SegData(Dataset):
    """Random images and 3-class masks; ``poison`` makes every image NaN (for the NaN-loss test)."""

    def __init__(self, n: int = 8, size: int = SIZE, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, size, size, generator=gen)
        self.masks = torch.randint(0, 3, (n, size, size), generator=gen)
        self.poison = False

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[i] * float("nan") if self.poison else self.images[i]
        return image, self.masks[i]


def seg_collate(items: list) -> tuple[torch.Tensor, torch.Tensor]:
    images, masks = zip(*items)
    return torch.stack(images), torch.stack(masks)


class DetData(Dataset):
    """Random images in [0, 1] with one box each (labels 0..2)."""

    def __init__(self, n: int = 8, size: int = SIZE, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, size, size, generator=gen)
        self.labels = torch.randint(0, 3, (n,), generator=gen)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict]:
        return self.images[i], {"boxes": torch.tensor([[8.0, 8.0, 40.0, 48.0]]), "labels": self.labels[i:i + 1]}


def det_collate(items: list) -> tuple[list, list]:
    images, targets = zip(*items)
    return list(images), list(targets)

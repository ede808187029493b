"""The training toolkit both loops share (search: :mod:`fna.search`; fine-tuning: :mod:`fna.train`).

One vocabulary, :class:`OptimConfig`, for the weights' optimiser and learning-rate schedule:

* ``optimizer`` sgd | rmsprop | adamw, ``lr``, ``momentum``, ``weight_decay``, ``rmsprop_eps``;
* ``schedule`` poly | step | cosine | constant over the phase's iterations, ``milestones`` as
  *fractions* of them (step: ×``gamma`` at each), ``poly_power``;
* ``warmup_iters`` of linear warm-up from ``warmup_factor`` × lr, multiplied onto the schedule (as
  mmdetection does), ``clip_grad`` (max total gradient norm).

Schedules are torch's own (``LinearLR`` chained with ``PolynomialLR`` / ``MultiStepLR`` /
``CosineAnnealingLR``). Also here: the loss guard (non-finite or diverging losses), resumable batches
in a fixed, seed-derived order, and moving batches to a device. ``batch_size`` means the total over
all processes everywhere.
"""

from __future__ import annotations

import math
import os
import pickle
import random
import warnings
from collections.abc import Callable, Iterator
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn
from torch.optim.lr_scheduler import (ChainedScheduler, ConstantLR, CosineAnnealingLR, LinearLR, LRScheduler,
                                      MultiStepLR, PolynomialLR)
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from fna.errors import FnaError

DIVERGENCE_FACTOR = 100.0
MAX_AUTO_WORKERS = 8
NumWorkers = Annotated[int, Field(ge=0)] | Literal["auto"]  # see num_workers()


class OptimConfig(BaseModel):
    """The weights' optimiser, schedule and guard; fine-tuning and search configs extend it."""

    model_config = ConfigDict(extra="forbid")

    optimizer: Literal["sgd", "rmsprop", "adamw"] = "sgd"
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, le=1)
    weight_decay: float = Field(5e-4, ge=0)
    rmsprop_eps: float = Field(1.0, gt=0)
    schedule: Literal["poly", "step", "cosine", "constant"] = "poly"
    poly_power: float = Field(0.9, gt=0)
    milestones: list[float] = []  # fractions of the phase's iterations where a step schedule multiplies by gamma
    gamma: float = Field(0.1, gt=0)
    warmup_iters: int = Field(0, ge=0)
    warmup_factor: float = Field(1e-3, gt=0, le=1)
    clip_grad: float | None = Field(None, gt=0)
    divergence_factor: float | None = Field(DIVERGENCE_FACTOR, gt=1)  # see LossGuard; None: off

    @field_validator("milestones")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not 0 < m <= 1 for m in v):
            raise ValueError(f"milestones are fractions of the iterations in (0, 1], got {v}")
        return v


class CudaSpeedConfig(BaseModel):
    """How a loop runs on CUDA (both are off elsewhere): bf16 autocast and channels-last tensors."""

    model_config = ConfigDict(extra="forbid")

    amp: bool = True  # bf16 autocast, CUDA only
    channels_last: bool = True  # CUDA only


def autocast(device: torch.device, cfg: CudaSpeedConfig) -> torch.autocast:
    """bf16 autocast on CUDA when ``cfg.amp``; a no-op context elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and cfg.amp)


def channels_last(device: torch.device, cfg: CudaSpeedConfig) -> bool:
    """Whether model and batches go channels-last: on CUDA when ``cfg.channels_last``."""
    return device.type == "cuda" and cfg.channels_last


def make_optimizer(params: Any, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimiser ``cfg`` names over ``params``."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":  # not in the paper; converges in far fewer steps on short CPU runs
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum, eps=cfg.rmsprop_eps,
                               weight_decay=cfg.weight_decay)


def milestone_iters(fractions: list[float], total: int) -> list[int]:
    """The first iteration at or past each fraction of ``total`` (``8/12`` of 1200 → 800)."""
    return [math.ceil(round(f * total, 6)) for f in fractions]


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total: int) -> LRScheduler:
    """``cfg``'s schedule over ``total`` iterations (stepped once per iteration), warm-up chained on."""
    if cfg.schedule == "poly":
        main: LRScheduler = PolynomialLR(optimizer, total_iters=total, power=cfg.poly_power)
    elif cfg.schedule == "step":
        main = MultiStepLR(optimizer, milestone_iters(cfg.milestones, total), gamma=cfg.gamma)
    elif cfg.schedule == "cosine":
        main = CosineAnnealingLR(optimizer, T_max=total)
    else:
        main = ConstantLR(optimizer, factor=1.0, total_iters=0)
    if cfg.warmup_iters == 0:
        return main
    warmup = LinearLR(optimizer, start_factor=cfg.warmup_factor, total_iters=cfg.warmup_iters)
    return ChainedScheduler([warmup, main], optimizer)


def scheduler_at(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total: int, step: int) -> LRScheduler:
    """``cfg``'s schedule over ``total`` iterations with ``cfg.lr`` as base, advanced to iteration ``step``.

    A resumed run builds its schedule this way instead of loading a saved one: the rates are the ones
    an uninterrupted run reaches (the same steps from the same start), and a new ``cfg.lr`` (a lower
    one after a divergence) applies from the point where the run stopped.
    """
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr
        group.pop("initial_lr", None)
    scheduler = make_scheduler(optimizer, cfg, total)
    with warnings.catch_warnings():  # stepping without optimiser steps is the point here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(step):
            scheduler.step()
    return scheduler


def clip_grads(params: list[nn.Parameter], max_norm: float | None) -> float:
    """Clip the gradients of ``params`` to a total norm of ``max_norm`` (if given); the norm before clipping."""
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return 0.0
    if max_norm:
        return float(nn.utils.clip_grad_norm_(with_grad, max_norm))
    return float(nn.utils.get_total_norm([p.grad for p in with_grad]))


class LossGuard:
    """Stops a run whose loss is not finite, or has *diverged*: the mean of the last ``window`` losses
    exceeds ``factor`` times the run's first loss (the untrained model's, which training only lowers).

    :meth:`problem` returns why the run must stop, or ``None``. The first loss travels with
    checkpoints, so a resumed run keeps its starting level; the window refills after a resume (which
    may follow a divergence, with a lower learning rate).
    """

    def __init__(self, factor: float | None = DIVERGENCE_FACTOR, window: int = 10) -> None:
        self.factor, self.window = factor, window
        self.first: float | None = None
        self.recent: list[float] = []

    def problem(self, loss: float) -> str | None:
        if not math.isfinite(loss):
            return f"is {loss}"
        if self.first is None:
            self.first = loss
        self.recent = (self.recent + [loss])[-self.window:]
        mean = sum(self.recent) / len(self.recent)
        if self.factor and len(self.recent) == self.window and mean > self.factor * max(self.first, 1e-12):
            return (f"diverged: the mean of the last {self.window} losses is {mean:.4g}, over {self.factor:g}x "
                    f"the first loss {self.first:.4g}")
        return None

    def healthy(self) -> bool:
        """Whether the latest loss is within ``factor`` times the first: a state worth checkpointing."""
        return not (self.factor and self.recent and self.recent[-1] > self.factor * max(self.first or 0, 1e-12))

    def state_dict(self) -> dict[str, Any]:
        return {"first": self.first, "recent": list(self.recent)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.first, self.recent = state["first"], []


def non_finite(module: nn.Module) -> list[str]:
    """Names of ``module``'s floating-point parameters and buffers holding NaN or inf."""
    return [k for k, v in module.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


class ResumableSampler(Sampler[int]):
    """Shuffles with ``seed + epoch``, gives each of ``world`` ranks an equal share (the remainder of
    the shuffled order is left out) and can start mid-epoch (for exact resume)."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True) -> None:
        self.n, self.seed, self.rank, self.world, self.shuffle = n, seed, rank, world, shuffle
        self.epoch, self.skip = 0, 0

    def indices(self, epoch: int) -> list[int]:
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            order = list(range(self.n))
        return order[: len(order) - len(order) % self.world][self.rank::self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices(self.epoch)[self.skip:])

    def __len__(self) -> int:
        return len(self.indices(self.epoch)) - self.skip


def item_seed(seed: int, epoch: int, index: int, stream: int = 0) -> int:
    """The seed of the random transforms of sample ``index`` in ``epoch`` of a stream seeded ``seed``.

    Streams numbered other than 0 draw independently of stream 0 and of each other at the same
    ``(seed, epoch, index)`` (e.g. the search's two halves of one dataset).
    """
    key = (seed, epoch, index) if stream == 0 else (seed, epoch, index, stream)
    return int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0])


class SeededSampler(Sampler[tuple[int, int]]):
    """``sampler``'s indices, each with its :func:`item_seed` for :class:`SeededItems` to apply."""

    def __init__(self, sampler: ResumableSampler, stream: int = 0) -> None:
        self.sampler, self.stream = sampler, stream

    def __iter__(self) -> Iterator[tuple[int, int]]:
        seed, epoch = self.sampler.seed, self.sampler.epoch
        return ((i, item_seed(seed, epoch, i, self.stream)) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class FailedItem:
    """What :class:`SeededItems` returns for an item whose loading raised an :class:`~fna.errors.FnaError`
    (a bad file, a bad annotation), so that the error reaches the loop as itself: raised in a DataLoader
    worker it would come back as a ``RuntimeError`` holding the worker's traceback."""

    def __init__(self, error: FnaError) -> None:
        try:  # it travels from a worker by pickle: an error that does not survive that keeps its message
            pickle.loads(pickle.dumps(error))
        except Exception:
            error = FnaError(str(error))
        self.error = error


class CollateOrFail:
    """``collate`` (torch's default if None) of a batch's items, or the first :class:`FailedItem` among them."""

    def __init__(self, collate: Callable | None) -> None:
        self.collate = collate or default_collate

    def __call__(self, items: list[Any]) -> Any:
        failed = next((item for item in items if isinstance(item, FailedItem)), None)
        return failed if failed is not None else self.collate(items)


class SeededItems(Dataset):
    """``dataset[index]`` for a key ``(index, seed)``, with torch's CPU random stream (where transforms
    draw), Python's and numpy's global one seeded by ``seed`` while it runs and restored afterwards: a
    sample's random transforms depend on its key alone, neither on the process that loads it nor on what
    was drawn before.
    An :class:`~fna.errors.FnaError` while loading comes back as a :class:`FailedItem`."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        states = torch.get_rng_state(), random.getstate(), np.random.get_state()
        torch.default_generator.manual_seed(seed)  # the CPU stream only: torch.manual_seed costs ~2 ms more
        random.seed(seed)
        np.random.seed(seed % 2**32)  # numpy takes 32-bit seeds
        try:
            return self.dataset[index]
        except FnaError as e:
            return FailedItem(e)
        finally:
            torch.set_rng_state(states[0])
            random.setstate(states[1])
            np.random.set_state(states[2])


def batches(dataset: Dataset, collate: Callable | None, batch_size: int, seed: int, start: int = 0,
            num_workers: int = 0, shuffle: bool = True, rank: int = 0, world: int = 1,
            pin_memory: bool = False, stream: int = 0) -> Iterator[Any]:
    """Endless batches of ``batch_size`` per process over epochs, from global batch number ``start``.

    Epoch ``e`` visits the samples in the order ``seed + e`` gives; incomplete last batches are
    dropped, so every step sees ``batch_size`` samples (BatchNorm needs more than one).
    ``num_workers`` processes load and transform the items (kept across epochs). Each sample's random
    transforms draw from their own stream, seeded by ``(seed, epoch, index)`` (:class:`SeededItems`), so
    the batches, augmentation included, are the same for every ``num_workers``, on resume, and whatever
    the loop draws from the global random streams; ``stream`` numbers other than 0 draw other
    augmentations from the same ``seed`` (:func:`item_seed`). ``pin_memory``: batches come in page-locked memory
    (for asynchronous copies to a GPU).
    """
    sampler = ResumableSampler(len(dataset), seed, rank, world, shuffle)
    per_epoch = len(sampler.indices(0)) // batch_size
    if per_epoch == 0:
        raise FnaError(f"dataset has {len(dataset)} samples, fewer than one batch of {batch_size} per process")
    # An own generator: the loader must not draw from the global RNG (exact resume).
    loader = DataLoader(SeededItems(dataset), batch_size=batch_size, sampler=SeededSampler(sampler, stream), drop_last=True,
                        num_workers=num_workers, collate_fn=CollateOrFail(collate), persistent_workers=num_workers > 0,
                        pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed))
    epoch, within = divmod(start, per_epoch)
    while True:
        sampler.epoch, sampler.skip = epoch, within * batch_size
        for batch in loader:
            if isinstance(batch, FailedItem):
                raise batch.error
            yield batch
        epoch, within = epoch + 1, 0


def num_workers(setting: int | Literal["auto"], loaders: int = 1) -> int:
    """DataLoader worker processes per loader for a ``num_workers`` setting.

    ``auto``: ``$FNA_NUM_WORKERS`` when set; else the CPUs this process may use, shared by the
    processes ``torchrun`` starts on this machine and their ``loaders`` loaders each, one CPU of every
    share kept for the loop itself, at most 8.
    """
    if setting != "auto":
        return int(setting)
    env = os.environ.get("FNA_NUM_WORKERS")
    if env is not None:
        if not env.isdigit():
            raise FnaError(f"FNA_NUM_WORKERS={env!r}: expected a whole number >= 0")
        return int(env)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = cpus // (int(os.environ.get("LOCAL_WORLD_SIZE", "1")) * loaders)
    return max(0, min(MAX_AUTO_WORKERS, share - 1))


def batches_per_epoch(n: int, batch_size: int, world: int = 1) -> int:
    """How many full batches of ``batch_size`` per process one epoch over ``n`` samples gives."""
    return (n - n % world) // world // batch_size


def map_tensors(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``batch`` with ``fn`` applied to every tensor inside its tuples, lists and dicts."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return {k: map_tensors(v, fn) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_tensors(v, fn) for v in batch)
    return batch


def to_device(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
    """Move tensors (inside tuples, lists and dicts) to ``device``; 4-d ones channels-last if asked."""
    def move(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device, non_blocking=True)
        return t.contiguous(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t
    return map_tensors(batch, move)

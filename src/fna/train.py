"""Parameter adaptation: one fine-tuning loop for every task (segmentation and both detectors).

Iteration-based: SGD or RMSprop, linear warm-up, then poly / step / cosine decay; gradient clipping;
AMP (bf16) and channels-last on CUDA; ``torchrun`` DDP; atomic checkpoints with RNG and data-order
state, so ``resume=True`` continues exactly where an interrupted run stopped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.tensorboard import SummaryWriter

from fna import dist
from fna.checkpoint import load_checkpoint, rng_state, save_atomic, seed_everything, set_rng_state
from fna.errors import FnaError
from fna.tasks import TaskSpec


class TrainConfig(BaseModel):
    """Fine-tuning recipe. :func:`paper_recipe` gives SPEC §5's numbers per task."""

    model_config = ConfigDict(extra="forbid")

    iters: int = 1000
    batch_size: int = 8  # per process
    optimizer: Literal["sgd", "rmsprop", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    rmsprop_eps: float = 1.0
    warmup_iters: int = 0
    warmup_factor: float = 1e-3
    schedule: Literal["poly", "step", "cosine", "constant"] = "poly"
    poly_power: float = 0.9
    milestones: list[float] = []  # fractions of ``iters`` where a step schedule multiplies lr by 0.1
    clip_grad: float | None = None
    amp: bool = True  # bf16 autocast, CUDA only
    channels_last: bool = True  # CUDA only
    checkpoint_every: int = 500
    log_every: int = 10
    num_workers: int = 0
    seed: int = 0
    device: str = "auto"


def paper_recipe(task: str, batch_size: int, iters: int) -> TrainConfig:
    """SPEC §5's recipe for ``task``, with the learning rate scaled linearly by ``batch_size``."""
    if task == "seg":  # Cityscapes: batch 16, SGD 0.01, wd 5e-4, poly 0.9, 5000-iter warm-up of 100k
        return TrainConfig(iters=iters, batch_size=batch_size, lr=0.01 * batch_size / 16, weight_decay=5e-4,
                           warmup_iters=int(0.05 * iters), schedule="poly")
    if task == "retinanet":  # COCO: batch 32, SGD 0.05, wd 5e-5, ×0.1 at epochs 8 and 11 of 12, clip 35
        return TrainConfig(iters=iters, batch_size=batch_size, lr=0.05 * batch_size / 32, weight_decay=5e-5,
                           warmup_iters=min(500, iters // 10), schedule="step", milestones=[8 / 12, 11 / 12],
                           clip_grad=35.0)
    if task == "ssdlite":  # COCO: batch 512, RMSprop 0.2, eps 1, momentum 0.9, wd 4e-5; cosine decay
        return TrainConfig(iters=iters, batch_size=batch_size, optimizer="rmsprop", lr=0.2 * batch_size / 512,
                           weight_decay=4e-5, warmup_iters=iters // 20, schedule="cosine")
    raise FnaError(f"no fine-tuning recipe for task {task!r}")


def lr_factor(cfg: TrainConfig, it: int) -> float:
    """Multiplier of ``cfg.lr`` at iteration ``it`` (warm-up, then the schedule)."""
    if it < cfg.warmup_iters:
        return cfg.warmup_factor + (1 - cfg.warmup_factor) * it / cfg.warmup_iters
    progress = min(it / max(cfg.iters, 1), 1.0)
    if cfg.schedule == "poly":
        return (1 - progress) ** cfg.poly_power
    if cfg.schedule == "step":
        return 0.1 ** sum(progress >= m for m in cfg.milestones)
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


class ResumableSampler(Sampler[int]):
    """Shuffles with ``seed + epoch``, shards by rank and can start mid-epoch (for exact resume)."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True) -> None:
        self.n, self.seed, self.rank, self.world, self.shuffle = n, seed, rank, world, shuffle
        self.epoch, self.skip = 0, 0

    def indices(self, epoch: int) -> list[int]:
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            order = list(range(self.n))
        order += order[: (-len(order)) % self.world]  # equal share per rank
        return order[self.rank::self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices(self.epoch)[self.skip:])

    def __len__(self) -> int:
        return len(self.indices(self.epoch)) - self.skip


def batches(dataset: Dataset, collate: Callable, batch_size: int, seed: int, start: int = 0,
            num_workers: int = 0, shuffle: bool = True) -> Iterator[Any]:
    """Endless batches over epochs, starting at global batch number ``start`` (for resume).

    Incomplete last batches are dropped, so every step sees ``batch_size`` samples (BatchNorm needs >1).
    """
    rank, world = (torch.distributed.get_rank(), dist.world_size()) if dist.world_size() > 1 else (0, 1)
    sampler = ResumableSampler(len(dataset), seed, rank, world, shuffle)
    per_epoch = len(sampler.indices(0)) // batch_size
    if per_epoch == 0:
        raise FnaError(f"dataset has {len(dataset)} samples, fewer than one batch of {batch_size} per process")
    epoch, within = divmod(start, per_epoch)
    while True:
        sampler.epoch, sampler.skip = epoch, within * batch_size
        # An own generator: creating the loader must not draw from the global RNG (exact resume).
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                            num_workers=num_workers, drop_last=True,
                            generator=torch.Generator().manual_seed(seed + epoch))
        yield from loader
        epoch, within = epoch + 1, 0


def to_device(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
    """Move tensors (inside tuples, lists and dicts) to ``device``."""
    if isinstance(batch, torch.Tensor):
        batch = batch.to(device, non_blocking=True)
        return batch.contiguous(memory_format=torch.channels_last) if channels_last and batch.dim() == 4 else batch
    if isinstance(batch, dict):
        return {k: to_device(v, device, channels_last) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device, channels_last) for v in batch)
    return batch


def make_optimizer(params: Any, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":  # not in the paper; converges in far fewer steps on short CPU runs
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum, eps=cfg.rmsprop_eps,
                               weight_decay=cfg.weight_decay)


def fit(model: nn.Module, task: TaskSpec, dataset: Dataset, collate: Callable, cfg: TrainConfig,
        run_dir: str | Path, resume: bool = False, progress: Callable[[int, float], None] | None = None) -> dict:
    """Fine-tune ``model`` on ``dataset`` for ``cfg.iters`` steps; checkpoints go to ``run_dir/checkpoint.pt``.

    Returns ``{"iters", "loss", "seconds", "device"}``. A NaN/inf loss stops with :class:`FnaError`,
    leaving the last good checkpoint in place.
    """
    run_dir = Path(run_dir)
    ckpt_path = run_dir / "checkpoint.pt"
    device = dist.resolve_device(cfg.device)
    rank, world = dist.init_from_env(device)
    seed_everything(cfg.seed + rank)
    cuda = device.type == "cuda"
    model.to(device)
    if cuda and cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if world > 1 and cuda:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None) if world > 1 else model
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(cfg, it))
    start, elapsed = 0, 0.0
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, elapsed = state["iter"], state["seconds"]
        set_rng_state(state["rng"][rank] if isinstance(state["rng"], list) else state["rng"])

    def checkpoint(it: int) -> None:
        rngs = [rng_state()]
        if world > 1:
            rngs = [None] * world
            torch.distributed.all_gather_object(rngs, rng_state())
        if dist.is_main():
            save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "iter": it, "rng": rngs,
                         "seconds": elapsed + time.perf_counter() - t0, "config": cfg.model_dump()}, ckpt_path)

    writer = SummaryWriter(str(run_dir / "tensorboard")) if dist.is_main() else None
    net.train()
    data = batches(dataset, collate, cfg.batch_size, cfg.seed, start, cfg.num_workers)
    t0, loss_value = time.perf_counter(), float("nan")
    for it in range(start, cfg.iters):
        batch = to_device(next(data), device, cuda and cfg.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda and cfg.amp):
            loss = task.loss(net, batch)
        if not torch.isfinite(loss):
            raise FnaError(f"loss is {loss.item()} at iteration {it}; stopping. "
                           + (f"The last good checkpoint is {ckpt_path}." if ckpt_path.exists() else
                              "No checkpoint was written yet; lower the learning rate."))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        optimizer.step()
        scheduler.step()
        loss_value = loss.item()
        if writer is not None and it % cfg.log_every == 0:
            writer.add_scalar("finetune/loss", loss_value, it)
            writer.add_scalar("finetune/lr", optimizer.param_groups[0]["lr"], it)
        if progress is not None and (it % cfg.log_every == 0 or it + 1 == cfg.iters):
            progress(it + 1, loss_value)
        if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.iters:
            checkpoint(it + 1)
    if writer is not None:
        writer.close()
    return {"iters": cfg.iters, "loss": loss_value, "seconds": elapsed + time.perf_counter() - t0,
            "device": str(device)}

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
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.tensorboard import SummaryWriter

from fna import dist
from fna.checkpoint import load_checkpoint, rng_state, save_atomic, seed_everything, set_rng_state
from fna.errors import FnaError
from fna.tasks import TaskSpec

DIVERGENCE_FACTOR = 100.0


class TrainConfig(BaseModel):
    """Fine-tuning recipe. :func:`paper_recipe` gives SPEC §5's numbers per task."""

    model_config = ConfigDict(extra="forbid")

    iters: int = Field(1000, ge=1)
    batch_size: int = Field(8, ge=1)  # per process
    optimizer: Literal["sgd", "rmsprop", "adamw"] = "sgd"
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, le=1)
    weight_decay: float = Field(5e-4, ge=0)
    rmsprop_eps: float = Field(1.0, gt=0)
    warmup_iters: int = Field(0, ge=0)
    warmup_factor: float = Field(1e-3, ge=0, le=1)
    schedule: Literal["poly", "step", "cosine", "constant"] = "poly"
    poly_power: float = Field(0.9, gt=0)
    milestones: list[float] = []  # fractions of ``iters`` where a step schedule multiplies lr by 0.1
    clip_grad: float | None = Field(None, gt=0)
    amp: bool = True  # bf16 autocast, CUDA only
    channels_last: bool = True  # CUDA only
    checkpoint_every: int = Field(500, ge=0)  # iterations; 0: only at the end
    log_every: int = Field(10, ge=1)
    num_workers: int = Field(0, ge=0)
    seed: int = 0
    device: str = "auto"
    divergence_factor: float | None = Field(DIVERGENCE_FACTOR, gt=1)  # see LossGuard; None: off

    @field_validator("milestones")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not 0 < m <= 1 for m in v):
            raise ValueError(f"milestones are fractions of iters in (0, 1], got {v}")
        return v


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


def set_base_lr(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                lr: float) -> None:
    """Make ``lr`` the base learning rate of a resumed run (e.g. a lower one after a divergence).

    The current rate is scaled by ``lr / old base``, so the schedule's position is kept.
    """
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] *= lr / base
        group["initial_lr"] = lr
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


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


def clip_grads(params: list[nn.Parameter], max_norm: float | None) -> float:
    """Clip the gradients of ``params`` to a total norm of ``max_norm`` (if given); the norm before clipping."""
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return 0.0
    if max_norm:
        return float(nn.utils.clip_grad_norm_(with_grad, max_norm))
    return float(nn.utils.get_total_norm([p.grad for p in with_grad]))


def non_finite(module: nn.Module) -> list[str]:
    """Names of ``module``'s floating-point parameters and buffers holding NaN or inf."""
    return [k for k, v in module.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def fit(model: nn.Module, task: TaskSpec, dataset: Dataset, collate: Callable, cfg: TrainConfig,
        run_dir: str | Path, resume: bool = False, progress: Callable[[int, float], None] | None = None) -> dict:
    """Fine-tune ``model`` on ``dataset`` for ``cfg.iters`` steps; checkpoints go to ``run_dir/checkpoint.pt``.

    ``resume`` continues from the checkpoint when there is one (exactly: weights, optimiser, schedule,
    RNG and data order), with ``cfg.lr`` as the base learning rate; without a checkpoint it starts over.
    A non-finite or diverging loss (see :class:`LossGuard`) or non-finite gradients stop the run with
    :class:`FnaError`. Checkpoints are only written from finite weights whose latest loss is in the
    guard's range (except the final one), so the last checkpoint is a state worth resuming from.
    Returns ``{"iters", "loss", "seconds", "device"}``.
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
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(cfg, it))
    guard = LossGuard(cfg.divergence_factor)
    start, elapsed = 0, 0.0
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_base_lr(optimizer, scheduler, cfg.lr)
        if "guard" in state:
            guard.load_state_dict(state["guard"])
        start, elapsed = state["iter"], state["seconds"]
        set_rng_state(state["rng"][rank] if isinstance(state["rng"], list) else state["rng"])

    def stop(reason: str, it: int) -> FnaError:
        last = (f"the last checkpoint {ckpt_path} (iteration {load_checkpoint(ckpt_path)['iter']}) holds finite "
                "weights: lower finetune.lr and --resume" if ckpt_path.exists()
                else "no checkpoint was written yet: lower finetune.lr and run again")
        return FnaError(f"fine-tuning stopped at iteration {it}: {reason}; {last}")

    def checkpoint(it: int) -> None:
        rngs = [rng_state()]
        if world > 1:
            rngs = [None] * world
            torch.distributed.all_gather_object(rngs, rng_state())
        bad = non_finite(model)
        if bad:
            raise stop(f"the weights became non-finite ({', '.join(bad[:3])})", it)
        if it < cfg.iters and not guard.healthy():  # keep the last good checkpoint instead
            return
        if dist.is_main():
            save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "iter": it, "rng": rngs, "guard": guard.state_dict(),
                         "seconds": elapsed + time.perf_counter() - t0, "config": cfg.model_dump()}, ckpt_path)

    writer = SummaryWriter(str(run_dir / "tensorboard")) if dist.is_main() else None
    net.train()
    data = batches(dataset, collate, cfg.batch_size, cfg.seed, start, cfg.num_workers)
    t0, loss_value = time.perf_counter(), float("nan")
    for it in range(start, cfg.iters):
        batch = to_device(next(data), device, cuda and cfg.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda and cfg.amp):
            loss = task.loss(net, batch)
        loss_value = float(loss.detach())
        problem = guard.problem(loss_value)
        if dist.any_true(problem is not None, device):
            raise stop(f"the loss {problem or 'is not finite on another process'}", it)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = clip_grads(params, cfg.clip_grad)
        if not math.isfinite(grad_norm):
            raise stop(f"the gradient norm is {grad_norm}", it)
        optimizer.step()
        scheduler.step()
        if writer is not None and it % cfg.log_every == 0:
            writer.add_scalar("finetune/loss", loss_value, it)
            writer.add_scalar("finetune/lr", optimizer.param_groups[0]["lr"], it)
        if progress is not None and (it % cfg.log_every == 0 or it + 1 == cfg.iters):
            progress(it + 1, loss_value)
        if (cfg.checkpoint_every and (it + 1) % cfg.checkpoint_every == 0) or it + 1 == cfg.iters:
            checkpoint(it + 1)
    if writer is not None:
        writer.close()
    return {"iters": cfg.iters, "loss": loss_value, "seconds": elapsed + time.perf_counter() - t0,
            "device": str(device)}

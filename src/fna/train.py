"""Parameter adaptation: one fine-tuning loop for every task (segmentation and both detectors).

Iteration-based, with the shared toolkit of :mod:`fna.training` (optimiser, warm-up + schedule,
clipping, loss guard, resumable batches); AMP (bf16) and channels-last on CUDA; ``torchrun`` DDP;
atomic checkpoints with RNG and data-order state, so ``resume=True`` continues exactly where an
interrupted run stopped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from pydantic import Field
from torch import nn
from torch.utils.data import Dataset
from torch.utils.tensorboard import SummaryWriter

from fna.checkpoint import load_checkpoint, rng_state, save_atomic, seed_everything, set_rng_state
from fna.dist import Processes
from fna.errors import FnaError
from fna.training import (CudaSpeedConfig, LossGuard, NumWorkers, OptimConfig, autocast, batches, channels_last,
                          clip_grads, make_optimizer, make_scheduler, non_finite, num_workers, scheduler_at, to_device)

if TYPE_CHECKING:
    from fna.tasks import Task


class TrainConfig(OptimConfig, CudaSpeedConfig):
    """Fine-tuning recipe: :class:`~fna.training.OptimConfig` plus length, batch and execution
    (:class:`~fna.training.CudaSpeedConfig`). ``Task.recipe`` gives SPEC §5's numbers per task."""

    iters: int = Field(1000, ge=1)
    batch_size: int = Field(8, ge=1)  # total over all processes
    checkpoint_every: int = Field(500, ge=0)  # iterations; 0: only at the end
    log_every: int = Field(10, ge=1)
    num_workers: NumWorkers = "auto"  # see fna.training.num_workers
    compile: bool = False  # torch.compile the training forward (not the search's: its path changes every step)
    seed: int = 0
    device: str = "auto"


def fit(model: nn.Module, task: Task, dataset: Dataset, collate: Callable, cfg: TrainConfig,
        run_dir: str | Path, resume: bool = False, progress: Callable[[int, float], None] | None = None) -> dict:
    """Fine-tune ``model`` on ``dataset`` for ``cfg.iters`` steps; checkpoints go to ``run_dir/checkpoint.pt``.

    ``resume`` continues from the checkpoint when there is one (exactly: weights, optimiser, schedule,
    RNG and data order), with ``cfg.lr`` as the base learning rate from there on; without a checkpoint
    it starts over.
    A non-finite or diverging loss (see :class:`LossGuard`) or non-finite gradients stop the run with
    :class:`FnaError`. Checkpoints are only written from finite weights whose latest loss is in the
    guard's range (except the final one), so the last checkpoint is a state worth resuming from.
    Returns ``{"iters", "loss", "seconds", "device"}``.
    """
    run_dir = Path(run_dir)
    ckpt_path = run_dir / "checkpoint.pt"
    procs = Processes(cfg.device)
    device, rank, world = procs.device, procs.rank, procs.world
    if cfg.batch_size % world:
        raise FnaError(f"finetune.batch_size {cfg.batch_size} is the total over the {world} processes: it must "
                       "split into equal shares")
    seed_everything(cfg.seed + rank)
    cuda, last = device.type == "cuda", channels_last(device, cfg)
    model.to(device)
    if last:
        model.to(memory_format=torch.channels_last)
    model = procs.sync_batch_norm(model)
    net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None) if world > 1 else model
    if cfg.compile:
        net = torch.compile(net)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    scheduler = make_scheduler(optimizer, cfg, cfg.iters)
    guard = LossGuard(cfg.divergence_factor)
    start, elapsed = 0, 0.0
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if "guard" in state:
            guard.load_state_dict(state["guard"])
        start, elapsed = state["iter"], state["seconds"]
        scheduler = scheduler_at(optimizer, cfg, cfg.iters, start)
        set_rng_state(state["rng"][rank] if isinstance(state["rng"], list) else state["rng"])

    def stop(reason: str, it: int) -> FnaError:
        last = (f"the last checkpoint {ckpt_path} (iteration {load_checkpoint(ckpt_path)['iter']}) holds finite "
                "weights: lower finetune.lr and --resume" if ckpt_path.exists()
                else "no checkpoint was written yet: lower finetune.lr and run again")
        return FnaError(f"fine-tuning stopped at iteration {it}: {reason}; {last}")

    def checkpoint(it: int) -> None:
        rngs = procs.gather(rng_state())
        bad = non_finite(model)
        if bad:
            raise stop(f"the weights became non-finite ({', '.join(bad[:3])})", it)
        if it < cfg.iters and not guard.healthy():  # keep the last good checkpoint instead
            return
        if procs.main:
            save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iter": it, "rng": rngs, "guard": guard.state_dict(),
                         "seconds": elapsed + time.perf_counter() - t0, "config": cfg.model_dump()}, ckpt_path)

    writer = SummaryWriter(str(run_dir / "tensorboard")) if procs.main else None
    net.train()
    data = batches(dataset, collate, cfg.batch_size // world, cfg.seed, start, num_workers(cfg.num_workers), rank=rank,
                   world=world, pin_memory=cuda)
    t0, loss_value = time.perf_counter(), float("nan")
    for it in range(start, cfg.iters):
        batch = to_device(next(data), device, last)
        with autocast(device, cfg):
            try:
                loss = task.loss(net, batch)
            except ValueError as e:
                if "more than 1 value per channel" not in str(e):
                    raise
                raise FnaError(f"finetune.batch_size {cfg.batch_size} gives {cfg.batch_size // world} image(s) per "
                               "process, and this model's BatchNorm needs at least 2: raise it") from None
        loss_value = float(loss.detach())
        problem = guard.problem(loss_value)
        if procs.any(problem is not None):
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
    procs.close()
    return {"iters": cfg.iters, "loss": loss_value, "seconds": elapsed + time.perf_counter() - t0,
            "device": str(device)}

"""Architecture adaptation (SPEC §4): search a task's super network on task data, then derive.

The loop, per epoch over the weight half of the data:

* before ``arch_start_epoch`` (warm-up): weight steps on uniformly sampled single paths;
* afterwards: one architecture step (every candidate, softmax(α)-weighted, weights frozen, Adam on α)
  before every ``weight_steps_per_arch_step`` weight steps on paths sampled from softmax(α).

The architecture loss is ``L_task + λ·log_τ(C)`` with ``C`` the expected whole-network cost from the
per-candidate cost table (GMAdds, or ms with a latency table). With a hard budget, λ follows the
derived architecture's cost toward the budget after every architecture step (an integral controller:
``λ += gain · (cost / budget − 1)``, so it may go negative when the net is too cheap), and the final
derivation takes the most probable path inside ``budget ± tolerance`` when the argmax path misses it.

The training data is split 50/50 by image with a fixed seed; ``batch_size`` is the *total* batch over
all processes, so a run's schedule does not change with the number of processes. Under ``torchrun``
every process holds the whole super network, gradients of the weights and of α are averaged with one
all-reduce per step, every rank samples the same paths (same generator) and derives the same
architecture; only rank 0 writes.

Segmentation defaults (not published, SPEC §2): the optimiser and poly schedule of DeepLabv3
fine-tuning (SPEC §5); warm-up for the first half of the epochs as in both published schedules
(8/14, 15/30); 1 architecture : 1 weight step as for RetinaNet, since a dense per-pixel loss gives a
low-variance α gradient per batch; λ = 0.15 as for SSDLite, because the pull of ``λ·log C`` on a
layer's α scales with λ times the layer's share of the whole cost, and that share is similar for
DeepLabv3 OS16 (searched layers ≈ 75% of 24.5 GMAdds) and SSDLite (≈ 65% of 0.8 GMAdds), while it is
≈ 5% for RetinaNet (its head dominates), whose λ 0.02 would leave the cost term ineffective.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, ValidationError, model_validator
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from fna import dist as fdist
from fna.arch import SKIP, Arch, save_arch
from fna.checkpoint import (load_checkpoint, rng_state, save_atomic, seed_everything, set_rng_state,
                            write_text_atomic)
from fna.cost import CostTable, best_path_within, cost_table_key, model_cost, task_cost_table
from fna.data.split import split_by_image
from fna.errors import FnaError
from fna.supernet import SearchSpace, SinglePath, SuperBackbone
from fna.tasks import get_task
from fna.progress import Progress
from fna.train import DIVERGENCE_FACTOR, LossGuard, clip_grads, non_finite, set_base_lr, to_device


class SearchError(FnaError):
    """A search cannot start or continue (bad config, impossible budget, non-finite loss)."""


SEARCH_FILES = ("checkpoint.pt", "arch.json", "search_log.jsonl", "alpha_history.json")  # a search's outputs


TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "retinanet": dict(space="detection", epochs=14, arch_start_epoch=8, weight_steps_per_arch_step=1,
                      batch_size=32, optimizer="sgd", lr=0.02, momentum=0.9, weight_decay=1e-4, clip_grad=35.0,
                      lr_schedule="multistep", lr_milestones=[8, 11], warmup_iters=500, lam=0.02,
                      temperature=1.0),
    "ssdlite": dict(space="detection", epochs=30, arch_start_epoch=15, weight_steps_per_arch_step=5,
                    batch_size=512, optimizer="rmsprop", lr=0.05, rms_eps=1.0, momentum=0.9, weight_decay=4e-5,
                    clip_grad=None, lr_schedule="constant", warmup_iters=0, lam=0.15, temperature=0.9),
    "seg": dict(space="segmentation", epochs=40, arch_start_epoch=20, weight_steps_per_arch_step=1,
                batch_size=16, optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4, clip_grad=35.0,
                lr_schedule="poly", warmup_iters=200, lam=0.15, temperature=1.0),
}


class SearchConfig(BaseModel):
    """Every number of a search. :meth:`for_task` fills the task's defaults (SPEC §4)."""

    model_config = ConfigDict(extra="forbid")

    task: Literal["seg", "retinanet", "ssdlite"]
    seed: str = "mobilenet_v2"
    seed_weights: str | None = None
    space: str | dict[str, Any]
    num_classes: int | None = Field(None, ge=1)
    cost_size: tuple[PositiveInt, PositiveInt] | None = None  # input size of the cost table; default: the paper's
    model_kwargs: dict[str, Any] = {}  # to the task model (e.g. min_size/max_size, size)
    # schedule
    epochs: int = Field(ge=1)
    arch_start_epoch: int = Field(ge=0)
    weight_steps_per_arch_step: int = Field(ge=1)
    batch_size: int = Field(ge=1)  # total over all processes
    num_workers: int = Field(0, ge=0)
    # weights
    optimizer: Literal["sgd", "rmsprop"]
    lr: float = Field(gt=0)
    momentum: float = Field(0.9, ge=0, le=1)
    weight_decay: float = Field(ge=0)
    rms_eps: float = Field(1.0, gt=0)
    clip_grad: float | None = Field(None, gt=0)
    lr_schedule: Literal["multistep", "poly", "constant"]
    lr_milestones: list[NonNegativeInt] = []  # epochs
    lr_gamma: float = Field(0.1, gt=0)
    poly_power: float = Field(0.9, gt=0)
    warmup_iters: int = Field(0, ge=0)
    warmup_ratio: float = Field(1 / 3, gt=0, le=1)
    # architecture
    arch_lr: float = Field(3e-4, gt=0)
    arch_betas: tuple[float, float] = (0.5, 0.999)
    arch_weight_decay: float = Field(1e-3, ge=0)
    arch_clip_grad: float | None = Field(35.0, gt=0)
    lam: float = Field(ge=0)  # a negative λ would reward expensive ops
    log_base: float = 10.0
    temperature: float
    # hard budget
    budget_madds: float | None = Field(None, gt=0)
    budget_latency_ms: float | None = Field(None, gt=0)
    latency_table: str | None = None
    budget_tolerance: float = 0.05
    lambda_gain: float = Field(0.1, ge=0)
    # reproducibility, output
    split_seed: int = 0
    random_seed: int = 0
    checkpoint_every: int = Field(0, ge=0)  # weight steps; 0: at the end of every epoch only
    divergence_factor: float | None = Field(DIVERGENCE_FACTOR, gt=1)  # see fna.train.LossGuard; None: off
    device: str = "auto"
    progress: bool = True
    tensorboard: bool = True
    debug_rank_files: bool = False  # every rank writes its α and arch under debug/ (tests)

    @model_validator(mode="after")
    def _check(self) -> SearchConfig:
        if self.budget_madds is not None and self.budget_latency_ms is not None:
            raise ValueError("give budget_madds or budget_latency_ms, not both")
        if self.budget_latency_ms is not None and not self.latency_table:
            raise ValueError("budget_latency_ms needs a latency_table")
        if self.budget_madds is not None and self.latency_table:
            raise ValueError("budget_madds constrains MAdds; with a latency_table give budget_latency_ms")
        if not 0 <= self.arch_start_epoch <= self.epochs:
            raise ValueError("arch_start_epoch must lie in [0, epochs]")
        if self.log_base <= 1 or self.temperature <= 0 or not 0 < self.budget_tolerance < 1:
            raise ValueError("log_base must be > 1, temperature > 0, budget_tolerance in (0, 1)")
        if not all(0 <= b < 1 for b in self.arch_betas):
            raise ValueError(f"arch_betas must lie in [0, 1), got {list(self.arch_betas)}")
        return self

    @classmethod
    def for_task(cls, task: str, **overrides: Any) -> SearchConfig:
        """The task's defaults with ``overrides``; :class:`SearchError` on unknown keys or bad values."""
        if task not in TASK_DEFAULTS:
            raise SearchError(f"unknown search task {task!r}: expected one of {', '.join(TASK_DEFAULTS)}")
        try:
            return cls(task=task, **{**TASK_DEFAULTS[task], **overrides})
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "config"
            raise SearchError(f"search config: {where}: {first['msg']}") from None

    @property
    def budget(self) -> float | None:
        """The hard budget in the cost table's unit (MAdds or ms), if any."""
        return self.budget_madds if self.budget_madds is not None else self.budget_latency_ms


@dataclass
class SearchResult:
    """What a search produced (also written to the run directory)."""

    arch: Arch
    path: SinglePath
    alphas: dict[str, list]
    cost: dict[str, Any]
    lambdas: list[float]
    run_dir: Path


# -- helpers -------------------------------------------------------------------------------------

def entropy(p: torch.Tensor) -> float:
    """Entropy (nats) of a probability vector."""
    return float(-(p * p.clamp_min(1e-12).log()).sum())


def _lr_factor(cfg: SearchConfig, iters_per_epoch: int) -> Callable[[int], float]:
    total = cfg.epochs * iters_per_epoch

    def factor(it: int) -> float:
        if cfg.lr_schedule == "multistep":
            f = cfg.lr_gamma ** sum(it >= m * iters_per_epoch for m in cfg.lr_milestones)
        elif cfg.lr_schedule == "poly":
            f = (1 - min(it, total - 1) / total) ** cfg.poly_power
        else:
            f = 1.0
        if it < cfg.warmup_iters:
            f *= cfg.warmup_ratio + (1 - cfg.warmup_ratio) * it / cfg.warmup_iters
        return f
    return factor


class _Dist:
    """This process's place in a ``torchrun`` launch (or a single process)."""

    def __init__(self, device: str) -> None:
        self.device = fdist.resolve_device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.owns_group = not dist.is_initialized()
        self.rank, self.world = fdist.init_from_env(self.device)
        self.owns_group = self.owns_group and dist.is_initialized()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def average_grads(self, params: Sequence[nn.Parameter]) -> None:
        """All-reduce (mean) the gradients that exist; every rank has the same set (same path)."""
        grads = [p.grad for p in params if p.grad is not None]
        if self.world == 1 or not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], device=self.device, dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def broadcast_module(self, module: nn.Module) -> None:
        """Make every rank start from rank 0's parameters and buffers."""
        if self.world > 1:
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, 0)

    def close(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()


# -- the search ----------------------------------------------------------------------------------

class Search:
    """One search run: model, optimisers, data order and bookkeeping; :meth:`run` executes it.

    ``seed`` is a loaded :class:`~fna.seeds.Seed` (default: ``load_seed(config.seed, config.seed_weights)``).
    ``on_step`` is called after every weight step with a small dict (epoch, step, global_step, losses).
    ``resume`` continues from ``run_dir/checkpoint.pt`` (with the config's learning rates) or, when the
    search was stopped before its first checkpoint, starts it over; without ``resume`` a ``run_dir``
    that already holds a search is refused.
    """

    def __init__(self, config: SearchConfig, dataset: Dataset, collate_fn: Callable | None, run_dir: str | Path,
                 resume: bool = False, seed: Any = None, on_step: Callable[[dict], None] | None = None) -> None:
        self.cfg = config
        self.run_dir = Path(run_dir)
        self.on_step = on_step
        self.dist = _Dist(config.device)
        self.spec = get_task(config.task)
        if seed is None:
            from fna.seeds import load_seed
            seed = load_seed(config.seed, config.seed_weights)
        self.seed = seed
        self.space = SearchSpace.get(config.space)
        self.ckpt_path = self.run_dir / "checkpoint.pt"
        if not resume and any((self.run_dir / name).exists() for name in SEARCH_FILES):
            raise SearchError(f"{self.run_dir} already holds a search; pass --resume to continue it or choose "
                              "another --out")
        if self.dist.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        resume = resume and self.ckpt_path.is_file()  # stopped before the first checkpoint: start over

        seed_everything(config.random_seed)
        self.path_gen = torch.Generator().manual_seed(config.random_seed + 1)
        self.backbone = SuperBackbone.from_seed(seed, self.space, self.spec.taps(seed.arch), self.spec.output_stride,
                                                config.temperature)
        self.model = self.spec.head(self.backbone, config.num_classes or self.spec.num_classes,
                                    **config.model_kwargs).to(self.dist.device)
        arch_ids = {id(p) for p in self.backbone.arch_parameters()}
        self.arch_params = self.backbone.arch_parameters()
        self.weight_params = [p for p in self.model.parameters() if id(p) not in arch_ids]

        self.table = self._cost_table()
        self.table.check_fits(self.backbone.candidates)
        self.lam = config.lam
        self._check_budget()

        n = len(dataset)
        if n < 2:
            raise SearchError(f"the training set has {n} image(s); the search needs at least 2 to split in halves")
        self.weight_idx, self.arch_idx = split_by_image(n, config.split_seed)
        if config.batch_size % self.dist.world:
            raise SearchError(f"batch_size {config.batch_size} (total) is not divisible by the "
                              f"{self.dist.world} processes")
        self.per_rank = config.batch_size // self.dist.world
        self.weight_set, self.arch_set = Subset(dataset, self.weight_idx), Subset(dataset, self.arch_idx)
        self.collate_fn = collate_fn
        self.iters_per_epoch = len(self.weight_set) // self.dist.world // self.per_rank
        if self.iters_per_epoch == 0 or len(self.arch_set) // self.dist.world // self.per_rank == 0:
            raise SearchError(f"each half of the {n} training images must fill at least one batch of "
                              f"{config.batch_size}; lower batch_size")

        if config.optimizer == "sgd":
            self.opt_w = torch.optim.SGD(self.weight_params, config.lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay)
        else:
            self.opt_w = torch.optim.RMSprop(self.weight_params, config.lr, eps=config.rms_eps,
                                             momentum=config.momentum, weight_decay=config.weight_decay)
        self.sched_w = torch.optim.lr_scheduler.LambdaLR(self.opt_w, _lr_factor(config, self.iters_per_epoch))
        self.opt_a = torch.optim.Adam(self.arch_params, config.arch_lr, betas=config.arch_betas,
                                      weight_decay=config.arch_weight_decay)

        self.epoch = self.step = self.global_step = 0
        self.arch_epoch = self.arch_pos = 0
        self.lambdas: list[dict[str, float]] = []
        self.alpha_history: list[dict[str, Any]] = []
        self.log: list[dict[str, Any]] = []
        self.epoch_losses: dict[str, list] = {"weight": [], "arch": []}  # of the current epoch so far
        self.guards = {"weight": LossGuard(config.divergence_factor), "arch": LossGuard(config.divergence_factor)}
        self._arch_iter: Iterator | None = None
        if resume:
            self._load_checkpoint()
        self.dist.broadcast_module(self.model)

    # -- cost ---------------------------------------------------------------------------------
    def _cost_table(self) -> CostTable:
        cfg = self.cfg
        if cfg.latency_table:
            table = CostTable.load(cfg.latency_table)
            if table.key.get("task", cfg.task) != cfg.task:
                raise SearchError(f"{cfg.latency_table} was measured for task {table.key['task']}, not {cfg.task}")
            # the table's settings against the search's (a field the table lacks is not checked)
            key, mine = table.key, cost_table_key(cfg.task, self.seed.arch, self.space, cfg.cost_size, cfg.num_classes)

            def same(parse: Callable[[Any], Any], stored: Any, ours: Any) -> bool:
                try:
                    return parse(stored) == ours
                except (FnaError, KeyError, TypeError, ValueError, AttributeError):
                    return False

            differs = []
            if "size" in key and list(key["size"]) != mine["size"]:
                differs.append(f"input size {'×'.join(map(str, key['size']))} in the table, "
                               f"{'×'.join(map(str, mine['size']))} in the search (cost_size)")
            if "num_classes" in key and key["num_classes"] != mine["num_classes"]:
                differs.append(f"{key['num_classes']} classes in the table, {mine['num_classes']} in the search")
            if "seed_arch" in key and not same(Arch.from_dict, key["seed_arch"], self.seed.arch):
                differs.append(f"another seed architecture in the table than the search's "
                               f"({self.seed.arch.name or 'seed'})")
            if "space" in key and not same(lambda d: SearchSpace.get(d).stages, key["space"], self.space.stages):
                name = key["space"].get("name", "?") if isinstance(key["space"], dict) else key["space"]
                differs.append(f"the table's search space {name!r} has other stages than the search's "
                               f"{self.space.name!r}")
            if differs:
                raise SearchError(f"{cfg.latency_table} does not fit this search: {'; '.join(differs)}; build a table "
                                  "with the search's settings (`fna latency build`) or change the search's")
            return table
        key = cost_table_key(cfg.task, self.seed.arch, self.space, cfg.cost_size, cfg.num_classes)
        cached = self.run_dir / "cost_table.json"
        if cached.is_file():
            old = CostTable.load(cached)
            if old.key == key:
                return old
        table = task_cost_table(cfg.task, self.seed.arch, self.space, cfg.cost_size, cfg.num_classes)
        if self.dist.main:
            write_text_atomic(cached, json.dumps(table.to_dict()))
        return table

    def _check_budget(self) -> None:
        budget = self.cfg.budget
        if budget is None:
            return
        unit = "MAdds" if self.table.unit == "madds" else "ms"
        lo, hi = self.table.bounds()
        tol = self.cfg.budget_tolerance
        if lo > budget * (1 + tol):
            raise SearchError(f"budget {budget:,.6g} {unit} is below the smallest network of this search space "
                              f"({lo:,.6g} {unit}, every layer at its cheapest op)")
        if hi < budget * (1 - tol):
            raise SearchError(f"budget {budget:,.6g} {unit} is above the largest network of this search space "
                              f"({hi:,.6g} {unit})")
        if self._budget_path(uniform=True) is None:
            raise SearchError(f"no architecture of this search space costs within ±{tol:.0%} of {budget:,.6g} {unit}")

    def _budget_path(self, uniform: bool = False) -> SinglePath | None:
        budget, tol = self.cfg.budget, self.cfg.budget_tolerance
        logp = [[[0.0] * len(p) if uniform else torch.log(p.detach().double().cpu()).tolist() for p in stage]
                for stage in self.backbone.layer_probs()]
        return best_path_within(self.table, logp, budget * (1 - tol), budget * (1 + tol))

    def expected_cost(self) -> torch.Tensor:
        """Expected whole-network cost under softmax(α) in the loss unit (GMAdds or ms)."""
        return self.table.expected(self.backbone.layer_probs())

    # -- data ---------------------------------------------------------------------------------
    def _loader(self, subset: Subset, epoch: int, start: int) -> DataLoader:
        sampler = DistributedSampler(subset, num_replicas=self.dist.world, rank=self.dist.rank, shuffle=True,
                                     seed=self.cfg.random_seed, drop_last=True)
        sampler.set_epoch(epoch)
        order = list(sampler)[start * self.per_rank:]
        return DataLoader(subset, batch_size=self.per_rank, sampler=order, collate_fn=self.collate_fn,
                          num_workers=self.cfg.num_workers, drop_last=True,
                          generator=torch.Generator().manual_seed(self.cfg.random_seed * 1000 + epoch))

    def _arch_batch(self) -> Any:
        while True:
            if self._arch_iter is None:
                self._arch_iter = iter(self._loader(self.arch_set, self.arch_epoch, self.arch_pos))
            try:
                batch = next(self._arch_iter)
                self.arch_pos += 1
                return batch
            except StopIteration:
                self._arch_iter = None
                self.arch_epoch, self.arch_pos = self.arch_epoch + 1, 0

    # -- steps --------------------------------------------------------------------------------
    def _check_loss(self, loss: torch.Tensor, kind: str) -> None:
        """Stop every rank when the ``kind`` (weight / arch) loss is non-finite or diverging."""
        problem = self.guards[kind].problem(float(loss.detach()))
        if self.dist.any(problem is not None):
            raise self._stop(f"the {'architecture' if kind == 'arch' else 'weight'}-step loss "
                             f"{problem or 'is not finite on another process'}")

    def _check_grads(self, params: list[nn.Parameter], clip: float | None, kind: str) -> None:
        """Clip; stop before the update when the gradients are not finite (same on every rank: averaged)."""
        norm = clip_grads(params, clip)
        if not math.isfinite(norm):
            raise self._stop(f"the {kind}-step gradient norm is {norm}")

    def _stop(self, reason: str) -> SearchError:
        last = (f"the last checkpoint {self.ckpt_path} holds finite weights: lower the learning rate "
                "(search.lr / search.arch_lr) or check the data, then --resume" if self.ckpt_path.is_file()
                else "no checkpoint was written yet: lower the learning rate or check the data and run again")
        return SearchError(f"the search stopped at epoch {self.epoch} step {self.step}: {reason}; {last}")

    def weight_step(self, batch: Any) -> float:
        """One single-path weight step (path uniform during warm-up, else from softmax(α))."""
        self.model.train()
        path = self.backbone.sample_path(self.path_gen, uniform=self.epoch < self.cfg.arch_start_epoch)
        self.backbone.set_path(path)
        loss = self.spec.loss(self.model, to_device(batch, self.dist.device))
        self._check_loss(loss, "weight")
        self.opt_w.zero_grad(set_to_none=True)
        self.opt_a.zero_grad(set_to_none=True)
        loss.backward()
        self.dist.average_grads(self.weight_params)
        self._check_grads(self.weight_params, self.cfg.clip_grad, "weight")
        self.opt_w.step()
        self.sched_w.step()
        return float(loss.detach())

    def arch_step(self, batch: Any) -> tuple[float, float]:
        """One all-candidate step on α with the weights frozen; returns (task loss, expected cost)."""
        self.model.train()
        self.backbone.set_path(None)
        for p in self.weight_params:
            p.requires_grad_(False)
        try:
            task_loss = self.spec.loss(self.model, to_device(batch, self.dist.device))
            cost = self.expected_cost()
            loss = task_loss + self.lam * torch.log(cost) / math.log(self.cfg.log_base)
            self._check_loss(loss, "arch")
            self.opt_a.zero_grad(set_to_none=True)
            self.opt_w.zero_grad(set_to_none=True)
            loss.backward()
        finally:
            for p in self.weight_params:
                p.requires_grad_(True)
        self.dist.average_grads(self.arch_params)
        self._check_grads(self.arch_params, self.cfg.arch_clip_grad, "architecture")
        self.opt_a.step()
        if self.cfg.budget is not None:
            derived = self.table.path_cost(self.backbone.argmax_path())
            self.lam += self.cfg.lambda_gain * (derived / self.cfg.budget - 1)
            self.lambdas.append({"global_step": self.global_step, "lambda": self.lam, "derived_cost": derived})
        return float(task_loss.detach()), float(cost.detach())

    # -- run ----------------------------------------------------------------------------------
    def run(self, until_epoch: int | None = None) -> SearchResult | None:
        """Search until ``epochs``, checkpointing on the way; derive and write the architecture.

        With ``until_epoch``, stop (checkpointed) once that many epochs are done and return ``None``
        unless that is the end: a Pareto search branches the architecture phase from there.
        """
        stop = self.cfg.epochs if until_epoch is None else min(until_epoch, self.cfg.epochs)
        writer = self._writer()
        try:
            with self._progress() as progress:
                while self.epoch < stop:
                    self._run_epoch(writer, progress)
            result = self.finish() if self.epoch == self.cfg.epochs else None
        finally:
            if writer is not None:
                writer.close()
            self.dist.close()
        return result

    def _writer(self) -> Any:
        if not (self.cfg.tensorboard and self.dist.main):
            return None
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    def _progress(self) -> Progress:
        return Progress("search", self.cfg.epochs * self.iters_per_epoch, self.global_step,
                        enabled=self.cfg.progress and self.dist.main)

    def _run_epoch(self, writer: Any, progress: Progress) -> None:
        cfg = self.cfg
        searching = self.epoch >= cfg.arch_start_epoch
        w_losses, a_losses = self.epoch_losses["weight"], self.epoch_losses["arch"]
        for batch in self._loader(self.weight_set, self.epoch, self.step):
            arch_now = searching and self.step % cfg.weight_steps_per_arch_step == 0
            if arch_now:
                a_losses.append(self.arch_step(self._arch_batch()))
            w_losses.append(self.weight_step(batch))
            self.step += 1
            self.global_step += 1
            if writer is not None:
                writer.add_scalar("loss/weight_step", w_losses[-1], self.global_step)
                writer.add_scalar("lr", self.sched_w.get_last_lr()[0], self.global_step)
                if arch_now:
                    writer.add_scalar("loss/arch_step_task", a_losses[-1][0], self.global_step)
                    writer.add_scalar("lambda", self.lam, self.global_step)
            progress.update(self.global_step, epoch=self.epoch + 1, loss=w_losses[-1])
            if self.step == self.iters_per_epoch:
                self._end_epoch(w_losses, a_losses, writer)
            elif cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0:
                self._save_checkpoint()
            if self.on_step is not None:
                self.on_step({"epoch": self.epoch, "step": self.step, "global_step": self.global_step})

    def _end_epoch(self, w_losses: list[float], a_losses: list[tuple[float, float]], writer: Any) -> None:
        record = self.summary()
        record.update(epoch=self.epoch, weight_loss=self.dist.mean(float(np.mean(w_losses))),
                      arch_loss=self.dist.mean(float(np.mean([a for a, _ in a_losses]))) if a_losses else None,
                      lam=self.lam)
        self.log.append(record)
        self.alpha_history.append({"epoch": self.epoch, "alpha": self.alphas()})
        if writer is not None:
            writer.add_scalar("cost/expected", record["expected_cost"], self.epoch)
            writer.add_scalar("cost/derived", record["derived_cost"], self.epoch)
            writer.add_scalar("alpha/mean_entropy", float(np.mean(sum(record["entropy"], []))), self.epoch)
            writer.add_scalar("alpha/skip_share", record["skip_share"], self.epoch)
            writer.add_scalar("alpha/skip_prob", record["skip_prob"], self.epoch)
        self.epoch, self.step = self.epoch + 1, 0
        self.epoch_losses = {"weight": [], "arch": []}
        self._save_checkpoint()
        if self.dist.main:  # rewritten from the checkpointed state: a resumed run never repeats a line
            write_text_atomic(self.run_dir / "search_log.jsonl", "".join(json.dumps(r) + "\n" for r in self.log))
            write_text_atomic(self.run_dir / "alpha_history.json", json.dumps(self.alpha_history))

    def summary(self) -> dict[str, Any]:
        """The current derived arch, α entropy per layer, share of skip and expected cost."""
        with torch.no_grad():
            probs = self.backbone.layer_probs()
            path = self.backbone.argmax_path()
            skip_layers = [(names, p) for stage, pr in zip(self.backbone.candidates, probs)
                           for names, p in zip(stage, pr) if SKIP in names]
            return {
                "arch": [[names[k] for k, names in zip(p, layers)] for p, layers in zip(path, self.backbone.candidates)],
                "entropy": [[round(entropy(p), 5) for p in stage] for stage in probs],
                "skip_share": float(np.mean([names[k] == SKIP for p, layers in zip(path, self.backbone.candidates)
                                             for k, names in zip(p, layers)])),
                "skip_prob": float(np.mean([float(p[-1]) for _, p in skip_layers])) if skip_layers else 0.0,
                "expected_cost": float(self.expected_cost()),
                "derived_cost": self.table.path_cost(path),
                "cost_unit": self.table.unit,
            }

    def alphas(self) -> dict[str, list]:
        """α as plain lists, by parameter name."""
        return {k: v.detach().cpu().tolist() for k, v in self.backbone.alpha.items()}

    # -- checkpoint ---------------------------------------------------------------------------
    def _save_checkpoint(self) -> None:
        bad = non_finite(self.model)
        if bad:
            raise self._stop(f"the weights became non-finite ({', '.join(bad[:3])})")
        if self.epoch < self.cfg.epochs and not all(g.healthy() for g in self.guards.values()):
            return  # a loss that has run away: keep the last good checkpoint
        if not self.dist.main:
            return
        state = {
            "config": self.cfg.model_dump(), "model": self.model.state_dict(), "opt_w": self.opt_w.state_dict(),
            "opt_a": self.opt_a.state_dict(), "sched_w": self.sched_w.state_dict(),
            "position": {"epoch": self.epoch, "step": self.step, "global_step": self.global_step,
                         "arch_epoch": self.arch_epoch, "arch_pos": self.arch_pos},
            "split": {"weights": self.weight_idx, "arch": self.arch_idx},
            "lam": self.lam, "lambdas": self.lambdas, "alpha_history": self.alpha_history, "log": self.log,
            "epoch_losses": self.epoch_losses, "guards": {k: g.state_dict() for k, g in self.guards.items()},
            "rng": rng_state(), "path_rng": self.path_gen.get_state(),
        }
        save_atomic(state, self.ckpt_path)

    def _load_checkpoint(self) -> None:
        state = load_checkpoint(self.ckpt_path)
        if state["split"] != {"weights": self.weight_idx, "arch": self.arch_idx}:
            raise SearchError(f"{self.ckpt_path}: the checkpoint was made on different data (the split differs)")
        self.model.load_state_dict(state["model"])
        self.opt_w.load_state_dict(state["opt_w"])
        self.opt_a.load_state_dict(state["opt_a"])
        self.sched_w.load_state_dict(state["sched_w"])
        set_base_lr(self.opt_w, self.sched_w, self.cfg.lr)  # a lower lr after a divergence
        for group in self.opt_a.param_groups:
            group["lr"] = self.cfg.arch_lr
        pos = state["position"]
        self.epoch, self.step, self.global_step = pos["epoch"], pos["step"], pos["global_step"]
        self.arch_epoch, self.arch_pos = pos["arch_epoch"], pos["arch_pos"]
        self.lam, self.lambdas = state["lam"], state["lambdas"]
        self.alpha_history, self.log = state["alpha_history"], state["log"]
        self.epoch_losses = state["epoch_losses"]
        for kind, guard_state in state.get("guards", {}).items():
            self.guards[kind].load_state_dict(guard_state)
        set_rng_state(state["rng"])
        self.path_gen.set_state(state["path_rng"])

    # -- derive -------------------------------------------------------------------------------
    def finish(self) -> SearchResult:
        """Derive the architecture (budget-constrained if needed) and write it with its cost."""
        path, how = self.backbone.argmax_path(), "argmax"
        budget, tol = self.cfg.budget, self.cfg.budget_tolerance
        if budget is not None and abs(self.table.path_cost(path) / budget - 1) > tol:
            path, how = self._budget_path(), f"most probable path within ±{tol:.0%} of the budget"
        arch = self.backbone.path_arch(path)
        arch = replace(arch, name=f"fna_{self.cfg.task}_searched")
        size = self.cfg.cost_size or self.spec.paper_size
        counted = model_cost(self.cfg.task, arch, size, self.cfg.num_classes, device="meta")
        cost = {"madds": counted.madds, "params": counted.params, "size": list(size),
                "table_cost": self.table.path_cost(path), "table_unit": self.table.unit, "budget": budget}
        result = SearchResult(arch, path, self.alphas(), cost, [x["lambda"] for x in self.lambdas], self.run_dir)
        if self.dist.main:
            write_text_atomic(self.run_dir / "arch.json",
                              json.dumps({"arch": arch.to_dict(), "task": self.cfg.task, "seed": self.seed.name,
                                          "derive": how, "path": path, "cost": cost}, indent=2))
            save_arch(arch, self.run_dir / "arch.net_config.txt")
            write_text_atomic(self.run_dir / "lambda.json", json.dumps(self.lambdas))
            write_text_atomic(self.run_dir / "config.json", json.dumps(self.cfg.model_dump(), indent=2))
        if self.cfg.debug_rank_files:
            debug = self.run_dir / "debug"
            debug.mkdir(parents=True, exist_ok=True)
            torch.save(dict(self.backbone.alpha.items()), debug / f"alpha_rank{self.dist.rank}.pt")
            (debug / f"arch_rank{self.dist.rank}.json").write_text(arch.to_json())
        return result


def search(config: SearchConfig, dataset: Dataset, collate_fn: Callable | None, run_dir: str | Path,
           resume: bool = False, seed: Any = None, on_step: Callable[[dict], None] | None = None) -> SearchResult:
    """Run (or with ``resume`` continue) an architecture search on ``dataset`` and write ``run_dir``."""
    return Search(config, dataset, collate_fn, run_dir, resume, seed, on_step).run()

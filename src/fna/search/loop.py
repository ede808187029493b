"""The search loop (SPEC §4): weight steps on single paths, architecture steps on all candidates.

Per epoch over the weight half of the data:

* before ``arch_start_epoch`` (warm-up): weight steps on uniformly sampled single paths — the first
  ``seed_path_epochs`` of them on the seed's own path, which holds the seed's weights unchanged and so
  learns the task as fast as the seed, before the other candidates share the training;
* afterwards: one architecture step (every candidate, softmax(α)-weighted, weights frozen, Adam on α)
  before every ``weight_steps_per_arch_step`` weight steps on paths sampled from softmax(α).

The architecture loss is ``L_task + λ·log_τ(C)`` with ``C`` the searched layers' expected cost from the
per-candidate cost table (GMAdds, or ms with a latency table; the fixed parts are left out, SPEC §4);
with a hard budget λ is steered by the whole network's expected cost (:mod:`fna.search.budget`). The training data is split 50/50 by image with a fixed seed;
``batch_size`` is the *total* batch over all processes, so a run's schedule does not change with the
number of processes.

Under ``torchrun`` every process holds the whole super network and every rank samples the same paths
(same generator); every BatchNorm normalises by the statistics of the whole batch over all
processes (:meth:`Processes.sync_batch_norm`), as a single process does. Gradients are averaged
with one flat all-reduce per step (:meth:`Processes.average_grads`) rather than DDP: a single-path
step uses another subgraph every time, which DDP could only follow with ``find_unused_parameters``
(a graph walk per step), and DDP would hand unsampled candidates zero gradients, while SPEC §4
requires them to stay ``None`` so weight decay and momentum do not drift them. Only rank 0 writes.

Segmentation defaults (not published, SPEC §2): the optimiser and poly schedule of DeepLabv3
fine-tuning (SPEC §5); warm-up for the first half of the epochs as in both published schedules
(8/14, 15/30); 1 architecture : 1 weight step as for RetinaNet, since a dense per-pixel loss gives a
low-variance α gradient per batch. λ: with ``C`` over the searched layers only, the pull of
``λ·log_τ C`` on candidate k of a layer is ``λ·(c_k − E_layer[c]) / (C·ln τ)``, so what a unit of λ does
depends only on how the searched cost spreads over layers and candidates — and that is alike for the
three tasks at the paper's sizes (a layer's cost spread ÷ C averages 0.059 for DeepLabv3 OS16, 0.073
for RetinaNet, 0.071 for SSDLite). The paper's two values (0.02, 0.15) then differ by the scale of the
task losses' α gradients, which it does not report. We take SSDLite's 0.15: like DeepLabv3's per-pixel
cross-entropy it is a mean over many O(1) terms, while RetinaNet's focal loss is normalised by its few
positive anchors. This is a reasoned default, not a measured one; ``bench/search_quality.py`` measures
what a given λ finds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch import nn
from torch.utils.data import Dataset, Subset
from torch.utils.tensorboard import SummaryWriter

from fna.checkpoint import seed_everything
from fna.cost import COST_UNITS
from fna.data.split import split_by_image
from fna.dist import Processes
from fna.progress import Progress
from fna.rundir import SearchDir
from fna.search import memory, outputs, state
from fna.search.budget import Budget, load_cost_table
from fna.search.config import SearchConfig, SearchError
from fna.search.diagnostics import ArchGradients, layer_gradients, supernet_state
from fna.search.outputs import SearchResult
from fna.seeds import Seed, load_seed
from fna.supernet import MixedLayer, SearchSpace, SearchSpaceError, SuperBackbone
from fna.tasks import get_task
from fna.training import (LossGuard, autocast, batches, batches_per_epoch, channels_last, clip_grads, make_optimizer,
                          make_scheduler, num_workers, to_device)


class Search:
    """One search run: model, optimisers, data order and bookkeeping; :meth:`run` executes it.

    ``seed`` is a loaded :class:`~fna.seeds.Seed` (default: ``load_seed(config.seed, config.seed_weights)``).
    ``on_step`` is called after every weight step with a small dict (epoch, step, global_step).
    ``resume`` continues from ``run_dir/checkpoint.pt`` (with the config's learning rates) or, when the
    search was stopped before its first checkpoint, starts it over; without ``resume`` a ``run_dir``
    that already holds a search is refused. ``plain_dataset`` holds the same items as ``dataset`` with
    the training pipeline minus its augmentation; ``config.augment`` says which half uses which
    (without it both halves use ``dataset``).
    """

    def __init__(self, config: SearchConfig, dataset: Dataset, collate_fn: Callable | None, run_dir: str | Path,
                 resume: bool = False, seed: Seed | None = None, on_step: Callable[[dict], None] | None = None,
                 plain_dataset: Dataset | None = None) -> None:
        self.cfg = config
        self.run_dir = Path(run_dir)
        self.files = SearchDir(self.run_dir)
        self.ckpt_path = self.files.checkpoint
        self.on_step = on_step
        if not resume and self.files.holds_a_search():
            raise SearchError(f"{self.run_dir} already holds a search; pass --resume to continue it or choose "
                              "another --out")
        self.dist = Processes(config.device)
        if self.dist.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.spec = get_task(config.task)
        self.seed = seed if seed is not None else load_seed(config.seed, config.seed_weights)
        self.space = SearchSpace.get(config.space, self.seed.arch)

        # the super network, remapped from the seed (SPEC §3), and its two parameter sets
        seed_everything(config.random_seed)
        self.path_gen = torch.Generator().manual_seed(config.random_seed + 1)
        self.backbone = SuperBackbone.from_seed(self.seed, self.space, self.spec.taps(self.seed.arch),
                                                self.spec.output_stride, config.temperature)
        # BN statistics over every process's share: the search must not change with the number of processes
        model = self.spec.head(self.backbone, config.num_classes or self.spec.num_classes, **config.model_kwargs)
        self.channels_last = channels_last(self.dist.device, config)
        model.to(self.dist.device, memory_format=torch.channels_last if self.channels_last else torch.preserve_format)
        self.model = self.dist.sync_batch_norm(model)
        self.arch_params = self.backbone.arch_parameters()
        for layer in self.backbone.modules():
            if isinstance(layer, MixedLayer):
                layer.recompute = config.arch_recompute
        self.seed_path = None
        if config.seed_path_epochs:
            try:
                self.seed_path = self.backbone.arch_path(self.seed.arch)
            except SearchSpaceError as e:
                raise SearchError(f"seed_path_epochs: the seed's own architecture is not a path of the search "
                                  f"space ({e})") from None
        arch_ids = {id(p) for p in self.arch_params}
        self.weight_params = [p for p in self.model.parameters() if id(p) not in arch_ids]

        # costs and the budget
        self.table = load_cost_table(config, self.seed.arch, self.space, self.files.cost_table,
                                     write=self.dist.main)
        self.table.check_fits(self.backbone.candidates)
        self.budget = (Budget(self.table, config.budget, config.budget_tolerance, config.lambda_gain, config.lam,
                              config.lambda_max) if config.budget is not None else None)
        self.lam = config.lam

        # the data: two halves by image, batches of batch_size / processes
        n = len(dataset)
        if n < 2:
            raise SearchError(f"the training set has {n} image(s); the search needs at least 2 to split in halves")
        self.weight_idx, self.arch_idx = split_by_image(n, config.split_seed)
        if config.batch_size % self.dist.world:
            raise SearchError(f"batch_size {config.batch_size} (total) is not divisible by the "
                              f"{self.dist.world} processes")
        self.per_rank = config.batch_size // self.dist.world
        plain = dataset if plain_dataset is None else plain_dataset
        self.weight_set = Subset(dataset if config.augment in ("weights", "both") else plain, self.weight_idx)
        self.arch_set = Subset(dataset if config.augment in ("arch", "both") else plain, self.arch_idx)
        self.collate_fn = collate_fn
        self.iters_per_epoch = batches_per_epoch(len(self.weight_set), self.per_rank, self.dist.world)
        if self.iters_per_epoch == 0 or batches_per_epoch(len(self.arch_set), self.per_rank, self.dist.world) == 0:
            raise SearchError(f"each half of the {n} training images must fill at least one batch of "
                              f"{config.batch_size}; lower batch_size")

        # optimisers: the weights' as in fine-tuning, Adam on α
        self.opt_w = make_optimizer(self.weight_params, config)
        self.sched_w = make_scheduler(self.opt_w, config, config.epochs * self.iters_per_epoch)
        self.opt_a = torch.optim.Adam(self.arch_params, config.arch_lr, betas=config.arch_betas,
                                      weight_decay=config.arch_weight_decay)

        # position and records
        self.epoch = self.step = self.global_step = self.arch_batches = 0
        self.lambdas: list[dict[str, float]] = []
        self.alpha_history: list[dict[str, Any]] = []
        self.log: list[dict[str, Any]] = []
        self.epoch_losses: dict[str, list] = {"weight": [], "arch": []}  # of the current epoch so far
        self.guards = {"weight": LossGuard(config.divergence_factor), "arch": LossGuard(config.divergence_factor)}
        self.grad_stats = ArchGradients([len(names) for stage in self.backbone.candidates for names in stage])
        self.supernet_at_arch_start: dict[str, Any] | None = None
        if resume and self.ckpt_path.is_file():  # stopped before the first checkpoint: start over
            state.load(self)
        self.dist.broadcast_module(self.model)

    # -- the two steps (SPEC §4) ----------------------------------------------------------------
    def weight_step(self, batch: Any) -> float:
        """One single-path weight step: the seed's own path in the first ``seed_path_epochs``, then a
        uniform path during the warm-up, then a path from softmax(α)."""
        self.model.train()
        path = self.backbone.sample_path(self.path_gen, uniform=self.epoch < self.cfg.arch_start_epoch)
        if self.epoch < self.cfg.seed_path_epochs:  # sampled all the same: the path RNG's order stays put
            path = self.seed_path
        self.backbone.set_path(path)
        loss = self.task_loss(batch)
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
        """One all-candidate step on α with the weights frozen, on ``L_task + λ·log_τ(C)`` with ``C`` the
        searched layers' expected cost; returns (task loss, C)."""
        self.model.train()
        self.backbone.set_path(None)
        for p in self.weight_params:
            p.requires_grad_(False)
        try:
            task_loss = self.task_loss(batch)
            cost = self.searched_cost()
            cost_term = self.lam * torch.log(cost) / math.log(self.cfg.log_base)
            loss = task_loss + cost_term
            self._check_loss(loss, "arch")
            self.opt_a.zero_grad(set_to_none=True)
            self.opt_w.zero_grad(set_to_none=True)
            cost_grads = torch.autograd.grad(cost_term, self.arch_params, retain_graph=True, allow_unused=True)
            loss.backward()
        finally:
            for p in self.weight_params:
                p.requires_grad_(True)
        self.dist.average_grads(self.arch_params)
        self.grad_stats.add(*layer_gradients(self, cost_grads))  # before clipping: what the diagnostics test
        self._check_grads(self.arch_params, self.cfg.arch_clip_grad, "architecture")
        self.opt_a.step()
        if self.budget is not None:
            with torch.no_grad():
                expected = float(self.expected_cost()) / COST_UNITS[self.table.unit]  # table unit
            self.lam = self.budget.update(self.lam, expected)
            self.lambdas.append({"global_step": self.global_step, "lambda": self.lam, "expected_cost": expected,
                                 "derived_cost": self.table.path_cost(self.backbone.argmax_path())})
        return float(task_loss.detach()), float(cost.detach())

    def task_loss(self, batch: Any) -> torch.Tensor:
        """The task loss of the super network in its current mode on ``batch`` (bf16 autocast on CUDA)."""
        with autocast(self.dist.device, self.cfg):
            return self.spec.loss(self.model, self.to_device(batch))

    def searched_cost(self) -> torch.Tensor:
        """``C``: the searched layers' expected cost under softmax(α) in the loss unit (GMAdds or ms)."""
        return self.table.expected(self.backbone.layer_probs())

    def expected_cost(self) -> torch.Tensor:
        """The whole network's expected cost under softmax(α) in the loss unit (what a budget constrains)."""
        return self.table.expected(self.backbone.layer_probs(), whole=True)

    # -- the loop ---------------------------------------------------------------------------------
    def run(self, until_epoch: int | None = None) -> SearchResult | None:
        """Search until ``epochs``, checkpointing on the way; derive and write the architecture.

        With ``until_epoch``, stop (checkpointed) once that many epochs are done and return ``None``
        unless that is the end: a Pareto search branches the architecture phase from there.
        """
        stop = self.cfg.epochs if until_epoch is None else min(until_epoch, self.cfg.epochs)
        writer = SummaryWriter(str(self.files.tensorboard)) if self.cfg.tensorboard and self.dist.main else None
        try:
            if self.epoch < stop:  # not for a search resumed after its last step
                self.report_memory()
            with Progress("search", self.cfg.epochs * self.iters_per_epoch, self.global_step,
                          enabled=self.cfg.progress and self.dist.main) as progress:
                # one stream of batches per half for the whole run (its loader's workers live as long)
                streams = {"weight": self.batches_of(self.weight_set, self.epoch * self.iters_per_epoch + self.step)}
                while self.epoch < stop:
                    self._run_epoch(writer, progress, streams)
            return outputs.finish(self) if self.epoch == self.cfg.epochs else None
        finally:
            if writer is not None:
                writer.close()
            self.dist.close()

    def report_memory(self) -> None:
        """Measure the two steps' peak memory at this search's batch (every rank: BN statistics are
        gathered) and print it on rank 0; a step that does not fit stops the search before it starts."""
        try:
            peaks = memory.step_peaks(self, self.per_rank)
        except torch.OutOfMemoryError:
            raise SearchError(f"a search step at batch_size {self.cfg.batch_size} ({self.per_rank} per process) "
                              "does not fit in the device's memory: lower batch_size (`fna search --probe-batch` "
                              "finds the largest that fits)") from None
        if self.dist.main:
            Console().print(memory.describe(self, peaks), markup=False, highlight=False)

    def to_device(self, batch: Any) -> Any:
        return to_device(batch, self.dist.device, self.channels_last)

    def batches_of(self, subset: Subset, start: int) -> Any:
        """Endless batches of ``subset`` for this rank from global batch ``start`` (the search's order).

        The weight half's augmentations draw from a stream of their own: with ``augment=both``, sample k
        of each half would otherwise get the same random transforms.
        """
        stream = 1 if subset is self.weight_set else 0
        return batches(subset, self.collate_fn, self.per_rank, self.cfg.random_seed, start,
                       num_workers(self.cfg.num_workers, loaders=2), rank=self.dist.rank, world=self.dist.world,
                       pin_memory=self.dist.device.type == "cuda", stream=stream)

    def _run_epoch(self, writer: SummaryWriter | None, progress: Progress, streams: dict[str, Any]) -> None:
        cfg = self.cfg
        searching = self.epoch >= cfg.arch_start_epoch
        w_losses, a_losses = self.epoch_losses["weight"], self.epoch_losses["arch"]
        if searching and self.supernet_at_arch_start is None:
            self.supernet_at_arch_start = supernet_state(self)
        if searching and "arch" not in streams:
            streams["arch"] = self.batches_of(self.arch_set, self.arch_batches)
        weight_batches, arch_batches = streams["weight"], streams.get("arch")
        for _ in range(self.step, self.iters_per_epoch):  # _end_epoch moves self.epoch on after the last
            arch_now = searching and self.step % cfg.weight_steps_per_arch_step == 0
            batch = next(weight_batches)  # drawn first: the augmentations take the global RNG in this order
            if arch_now:
                a_losses.append(self.arch_step(next(arch_batches)))
                self.arch_batches += 1
            w_losses.append(self.weight_step(batch))
            self.step += 1
            self.global_step += 1
            if writer is not None:
                writer.add_scalar("loss/weight_step", w_losses[-1], self.global_step)
                writer.add_scalar("lr", self.opt_w.param_groups[0]["lr"], self.global_step)
                if arch_now:
                    writer.add_scalar("loss/arch_step_task", a_losses[-1][0], self.global_step)
                    writer.add_scalar("lambda", self.lam, self.global_step)
            progress.update(self.global_step, epoch=self.epoch + 1, loss=w_losses[-1])
            if self.step == self.iters_per_epoch:
                self._end_epoch(w_losses, a_losses, writer)
            elif cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0:
                state.save(self)
            if self.on_step is not None:
                self.on_step({"epoch": self.epoch, "step": self.step, "global_step": self.global_step})

    def _end_epoch(self, w_losses: list[float], a_losses: list[tuple[float, float]],
                   writer: SummaryWriter | None) -> None:
        record = outputs.epoch_record(self)
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
        state.save(self)
        if self.dist.main:
            outputs.write_epoch_files(self)

    def alphas(self) -> dict[str, list]:
        """α as plain lists, by parameter name."""
        return {k: v.detach().cpu().tolist() for k, v in self.backbone.alpha.items()}

    # -- stopping on bad numbers ------------------------------------------------------------------
    def _check_loss(self, loss: torch.Tensor, kind: str) -> None:
        """Stop every rank when the ``kind`` (weight / arch) loss is non-finite or diverging."""
        problem = self.guards[kind].problem(float(loss.detach()))
        if self.dist.any(problem is not None):
            raise self.stopped(f"the {'architecture' if kind == 'arch' else 'weight'}-step loss "
                               f"{problem or 'is not finite on another process'}")

    def _check_grads(self, params: list[nn.Parameter], clip: float | None, kind: str) -> None:
        """Clip; stop before the update when the gradients are not finite (same on every rank: averaged)."""
        norm = clip_grads(params, clip)
        if not math.isfinite(norm):
            raise self.stopped(f"the {kind}-step gradient norm is {norm}")

    def stopped(self, reason: str) -> SearchError:
        """The error that stops the search for ``reason``, saying where to continue from."""
        last = (f"the last checkpoint {self.ckpt_path} holds finite weights: lower the learning rate "
                "(search.lr / search.arch_lr) or check the data, then --resume" if self.ckpt_path.is_file()
                else "no checkpoint was written yet: lower the learning rate or check the data and run again")
        return SearchError(f"the search stopped at epoch {self.epoch} step {self.step}: {reason}; {last}")


def search(config: SearchConfig, dataset: Dataset, collate_fn: Callable | None, run_dir: str | Path,
           resume: bool = False, seed: Seed | None = None, on_step: Callable[[dict], None] | None = None,
           plain_dataset: Dataset | None = None) -> SearchResult:
    """Run (or with ``resume`` continue) an architecture search on ``dataset`` and write ``run_dir``."""
    return Search(config, dataset, collate_fn, run_dir, resume, seed, on_step, plain_dataset).run()

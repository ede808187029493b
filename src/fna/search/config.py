"""Every number of a search (:class:`SearchConfig`; the task defaults of SPEC §4 are each task's
``search_defaults``) and the search's errors."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PositiveInt, ValidationError, field_validator, model_validator

from fna.errors import FnaError
from fna.tasks import TASKS
from fna.training import CudaSpeedConfig, NumWorkers, OptimConfig


class SearchError(FnaError):
    """A search cannot start or continue (bad config, impossible budget, non-finite loss)."""


class SearchConfig(OptimConfig, CudaSpeedConfig):
    """Every number of a search: the weights' optimiser and schedule (:class:`~fna.training.OptimConfig`,
    over all ``epochs``), the architecture step, the budget, the data split, bf16 and channels-last on
    CUDA (:class:`~fna.training.CudaSpeedConfig`). :meth:`for_task` fills the task's defaults (SPEC §4)."""

    task: str  # a registered task with search defaults (fna.tasks)
    seed: str = "mobilenet_v2"
    seed_weights: str | None = None
    space: str | dict[str, Any]
    num_classes: int | None = Field(None, ge=1)
    cost_size: tuple[PositiveInt, PositiveInt] | None = None  # input size of the cost table; default: the paper's
    model_kwargs: dict[str, Any] = {}  # to the task model (e.g. min_size/max_size, size)
    # schedule
    epochs: int = Field(ge=1)
    arch_start_epoch: int = Field(ge=0)
    seed_path_epochs: int = Field(0, ge=0)  # first epochs of the warm-up train the seed's own path only
    weight_steps_per_arch_step: int = Field(ge=1)
    batch_size: int = Field(ge=1)  # total over all processes
    num_workers: NumWorkers = "auto"  # per half's loader; see fna.training.num_workers
    warmup_factor: float = Field(1 / 3, gt=0, le=1)
    # architecture
    arch_lr: float = Field(3e-4, gt=0)
    arch_betas: tuple[float, float] = (0.5, 0.999)
    arch_weight_decay: float = Field(1e-3, ge=0)
    arch_clip_grad: float | None = Field(35.0, gt=0)
    # architecture steps recompute each layer's candidates in the backward pass: memory bounded by one
    # layer's candidates (below a weight step's), ~1.6x the step time (docs/benchmarks.md)
    arch_recompute: bool = True
    lam: float = Field(ge=0)  # a negative λ would reward expensive ops
    log_base: float = 10.0
    temperature: float
    # hard budget
    budget_madds: float | None = Field(None, gt=0)
    budget_latency_ms: float | None = Field(None, gt=0)
    latency_table: str | None = None
    budget_tolerance: float = 0.05
    lambda_gain: float = Field(1.0, ge=0)  # λ moves by at most gain × 0.1 × max(λ₀, 0.01) per arch step
    lambda_max: float = Field(10.0, gt=0)  # the bound of λ under a budget
    # data: which half's batches get the task's training augmentation; the other half gets the training
    # pipeline without it (the original code: architecture batches augmented, weight batches plain)
    augment: Literal["arch", "weights", "both", "none"] = "arch"
    # reproducibility, output
    split_seed: int = 0
    random_seed: int = 0
    checkpoint_every: int = Field(0, ge=0)  # weight steps; 0: at the end of every epoch only
    device: str = "auto"
    progress: bool = True
    tensorboard: bool = True
    debug_rank_files: bool = False  # every rank writes its α and arch under debug/ (tests)

    @field_validator("task")
    @classmethod
    def _searchable(cls, v: str) -> str:
        if v not in TASKS or TASKS[v].search_defaults is None:
            raise ValueError(f"task {v!r} cannot be searched: expected one of "
                             f"{', '.join(n for n, t in TASKS.items() if t.search_defaults is not None)}")
        return v

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
        if self.seed_path_epochs > self.arch_start_epoch:
            raise ValueError(f"seed_path_epochs ({self.seed_path_epochs}) is part of the warm-up: at most "
                             f"arch_start_epoch ({self.arch_start_epoch})")
        if self.log_base <= 1 or self.temperature <= 0 or not 0 < self.budget_tolerance < 1:
            raise ValueError("log_base must be > 1, temperature > 0, budget_tolerance in (0, 1)")
        if not all(0 <= b < 1 for b in self.arch_betas):
            raise ValueError(f"arch_betas must lie in [0, 1), got {list(self.arch_betas)}")
        return self

    @classmethod
    def for_task(cls, task: str, **overrides: Any) -> SearchConfig:
        """The task's defaults (``Task.search_defaults``) with ``overrides``; :class:`SearchError` on unknown
        keys or bad values."""
        defaults = TASKS[task].search_defaults if task in TASKS else None
        if defaults is None:
            searchable = [name for name, t in TASKS.items() if t.search_defaults is not None]
            raise SearchError(f"unknown search task {task!r}: expected one of {', '.join(searchable)}")
        try:
            return cls(task=task, **{**defaults, **overrides})
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "config"
            raise SearchError(f"search config: {where}: {first['msg']}") from None

    @property
    def budget(self) -> float | None:
        """The hard budget in the cost table's unit (MAdds or ms), if any."""
        return self.budget_madds if self.budget_madds is not None else self.budget_latency_ms

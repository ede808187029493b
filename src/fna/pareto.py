"""A Pareto set from one search (issue 8): one shared warm-up, then one architecture phase per budget.

The warm-up (uniform single paths, weights only) does not depend on the budget, so it runs once and
its checkpoint is copied into one branch directory per budget; each branch resumes from there as an
ordinary budgeted search (MAdds, or ms with a latency table) and derives its architecture. Every
branch keeps its own checkpoint, so an interrupted Pareto search continues where it stopped.

Each derived path is then scored with the super network's weights: the path becomes a standalone task
model (the chosen candidates' weights, the shared stem/head weights), its BatchNorm statistics are
recalibrated on a few training batches (searched candidates never kept running statistics), and the
task metric (mIoU or COCO AP) is computed on held-out images. ``pareto.json`` and ``pareto.png`` hold
cost vs metric per budget; each ``arch_<budget>.json`` can be fine-tuned with ``fna train --arch``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fna.arch import Arch, save_arch
from fna.cost import CostTable
from fna.evaluate import EvalConfig
from fna.rundir import ParetoDir, write_json
from fna.search import Search, SearchConfig, SearchError
from fna.seeds import load_seed
from fna.supernet import SearchSpaceError, SinglePath, arch_path
from fna.tasks import build_model
from fna.training import to_device


@dataclass
class ParetoPoint:
    """One budget's derived architecture, its cost (table unit) and its super-network metric."""

    label: str
    budget: float
    cost: float
    unit: str
    metric_name: str
    metric: float
    arch: Arch
    arch_file: Path

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "budget": self.budget, "cost": self.cost, "unit": self.unit,
                "metric_name": self.metric_name, "metric": self.metric, "arch_file": self.arch_file.name,
                "arch": self.arch.to_dict()}


def resolve_budgets(specs: list[str], table: CostTable, seed_arch: Arch) -> list[tuple[str, float]]:
    """``(label, budget)`` per spec, sorted by budget: a number in the table's unit, or ``0.75x`` for a
    fraction of the seed network's own cost in the table."""
    out = []
    for spec in specs:
        spec = spec.strip()
        try:
            value = float(spec[:-1] if spec.endswith("x") else spec)
        except ValueError:
            raise SearchError(f"Pareto budget {spec!r}: expected a number in the cost unit or a fraction of the "
                              "seed's cost such as 0.75x") from None
        if spec.endswith("x"):
            try:
                value *= table.path_cost(arch_path(seed_arch, seed_arch, table.candidates))
            except SearchSpaceError as e:  # e.g. MobileNetV3's e4 and e2.5 layers outside kernels x {e3, e6}
                raise SearchError(f"Pareto budget {spec!r} is a fraction of the seed's cost, but the seed's own "
                                  f"architecture is not in the search space ({e}); give the budget in the cost "
                                  "unit or a space that holds the seed's ops") from None
        out.append((spec, value))
    if len(out) < 2:
        raise SearchError("a Pareto set needs at least two budgets")
    return sorted(out, key=lambda x: x[1])


def derived_model(search: Search, path: SinglePath) -> nn.Module:
    """A standalone task model on ``path``'s architecture carrying the super network's weights.

    The backbone's weights are :meth:`~fna.supernet.SuperBackbone.derived_state_dict` (the chosen
    candidates' convs, fresh BN where the candidates had none); neck and head are the super network's.
    """
    cfg = search.cfg
    model = build_model(cfg.task, search.backbone.path_arch(path), cfg.num_classes or search.spec.num_classes,
                        **cfg.model_kwargs)
    prefix = next(name for name, m in search.model.named_modules() if m is search.backbone) + "."
    state = {k: v for k, v in search.model.state_dict().items() if not k.startswith(prefix)}
    state.update({prefix + k: v for k, v in search.backbone.derived_state_dict(path).items()})
    model.load_state_dict(state)
    return model.to(search.dist.device)


def recalibrate_bn(model: nn.Module, search: Search, batches: int) -> None:
    """Re-estimate every BatchNorm's running statistics on ``batches`` training batches (no gradients)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the batches
    loader = DataLoader(search.weight_set, batch_size=search.per_rank, shuffle=True, drop_last=True,
                        collate_fn=search.collate_fn, generator=torch.Generator().manual_seed(search.cfg.random_seed))
    model.train()
    with torch.no_grad():
        for n, batch in enumerate(loader):
            if n == batches:
                break
            search.spec.loss(model, to_device(batch, search.dist.device))
    for bn in norms:
        bn.momentum = 0.1
    model.eval()


def pareto_search(config: SearchConfig, budgets: list[str], dataset: Dataset, collate_fn: Any, val_set: Dataset,
                  run_dir: str | Path, class_names: tuple[str, ...] = (), resume: bool = False, seed: Any = None,
                  calib_batches: int = 4, plain_dataset: Dataset | None = None) -> list[ParetoPoint]:
    """Warm up once, branch the architecture phase per budget, score each derived net; write the set.

    ``budgets``: see :func:`resolve_budgets`. Writes a :class:`~fna.rundir.ParetoDir`.
    """
    if config.arch_start_epoch < 1:
        raise SearchError("a Pareto search branches after the warm-up: arch_start_epoch must be >= 1")
    if getattr(val_set, "items", None) and all(not getattr(item, "boxes", True) for item in val_set.items):
        raise SearchError(f"the {len(val_set)} held-out images have no annotated boxes: a Pareto set cannot be "
                          "scored on them; pass another --val-split")
    files = ParetoDir(Path(run_dir))
    seed = seed or load_seed(config.seed, config.seed_weights)
    shared = config.model_copy(update={"budget_madds": None, "budget_latency_ms": None})
    warm_dir = files.warmup
    warm = Search(shared, dataset, collate_fn, warm_dir.root, resume and warm_dir.checkpoint.is_file(), seed,
                  plain_dataset=plain_dataset)
    warm.run(until_epoch=config.arch_start_epoch)
    resolved = resolve_budgets(budgets, warm.table, seed.arch)
    field = "budget_latency_ms" if warm.table.unit == "ms" else "budget_madds"
    num_classes = config.num_classes or warm.spec.num_classes
    class_names = class_names or tuple(str(i) for i in range(num_classes))
    metric_name = warm.spec.metric
    points = []
    for label, budget in resolved:
        branch_dir = files.branch(label)
        branch_dir.root.mkdir(parents=True, exist_ok=True)
        if not branch_dir.checkpoint.is_file():
            shutil.copyfile(warm_dir.checkpoint, branch_dir.checkpoint)
        branch = Search(config.model_copy(update={field: budget}), dataset, collate_fn, branch_dir.root, True, seed,
                        plain_dataset=plain_dataset)
        result = branch.run()
        model = derived_model(branch, result.path)
        recalibrate_bn(model, branch, calib_batches)
        metrics = branch.spec.evaluate(model, val_set, EvalConfig(), branch.dist.device, class_names)
        if metrics[metric_name] is None:
            raise SearchError(f"{metric_name} is undefined on the {len(val_set)} held-out images (no annotated "
                              "boxes or labelled pixels): a Pareto set cannot be scored on them; pass another "
                              "--val-split")
        arch = replace(result.arch, name=f"fna_{config.task}_pareto_{label}")
        arch_file = files.arch(label)
        point = ParetoPoint(label, budget, result.cost["table_cost"], warm.table.unit, metric_name,
                            float(metrics[metric_name]), arch, arch_file)
        save_arch(arch, arch_file, task=config.task, seed=seed.name, source=f"pareto search, budget {label}",
                  budget=budget, cost=result.cost, **{metric_name: point.metric})
        points.append(point)
    write_json(files.index, {"task": config.task, "unit": warm.table.unit, "points": [p.to_dict() for p in points]})
    plot_pareto(points, files.plot)
    return points


def plot_pareto(points: list[ParetoPoint], path: Path) -> None:
    """Cost vs super-network metric, one labelled point per budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale, unit = (1e-9, "GMAdds") if points[0].unit == "madds" else (1.0, "ms")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs, ys = [p.cost * scale for p in points], [p.metric for p in points]
    ax.plot(xs, ys, "o-")
    for p, x, y in zip(points, xs, ys):
        ax.annotate(p.label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(f"cost ({unit})")
    ax.set_ylabel(f"{points[0].metric_name} (super network, BN recalibrated)")
    ax.set_title("Pareto set from one search")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""What a search writes into its directory (:class:`fna.rundir.SearchDir`) and hands back: per-epoch
records and the derived architecture (``arch.json`` holds how it was derived, its path and cost)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fna.arch import SKIP, Arch, save_arch
from fna.checkpoint import save_atomic, write_text_atomic
from fna.rundir import write_json, write_jsonl
from fna.search.diagnostics import diagnostics
from fna.cost import model_cost
from fna.supernet import SinglePath

if TYPE_CHECKING:
    from fna.search.loop import Search

@dataclass
class SearchResult:
    """What a search produced (also written to the run directory)."""

    arch: Arch
    path: SinglePath
    alphas: dict[str, list]
    cost: dict[str, Any]
    lambdas: list[float]
    run_dir: Path


def entropy(p: torch.Tensor) -> float:
    """Entropy (nats) of a probability vector."""
    return float(-(p * p.clamp_min(1e-12).log()).sum())


def epoch_record(search: Search) -> dict[str, Any]:
    """The current derived arch, α entropy per layer, share of skip and expected cost."""
    backbone, table = search.backbone, search.table
    with torch.no_grad():
        probs = backbone.layer_probs()
        path = backbone.argmax_path()
        skip_layers = [p for stage, pr in zip(backbone.candidates, probs) for names, p in zip(stage, pr)
                       if SKIP in names]
        chosen = [[names[k] for k, names in zip(p, layers)] for p, layers in zip(path, backbone.candidates)]
        return {
            "arch": chosen,
            "entropy": [[round(entropy(p), 5) for p in stage] for stage in probs],
            "skip_share": float(np.mean([op == SKIP for stage in chosen for op in stage])),
            "skip_prob": float(np.mean([float(p[-1]) for p in skip_layers])) if skip_layers else 0.0,
            "expected_cost": float(search.expected_cost()),  # whole network, loss unit
            "searched_cost": float(search.searched_cost()),  # C of the loss
            "derived_cost": table.path_cost(path),
            "cost_unit": table.unit,
        }


def write_epoch_files(search: Search) -> None:
    """``search_log.jsonl`` and ``alpha_history.json`` from the checkpointed state (so a resumed search
    never repeats a line)."""
    write_jsonl(search.files.log, search.log)
    write_json(search.files.alpha_history, search.alpha_history, indent=None)


def finish(search: Search) -> SearchResult:
    """Derive the architecture (inside the budget, if any) and write it with its cost."""
    cfg, backbone, table = search.cfg, search.backbone, search.table
    path, how = backbone.argmax_path(), "argmax"
    if search.budget is not None:
        path, how = search.budget.derive(path, backbone.layer_probs())
    arch = replace(backbone.path_arch(path), name=f"fna_{cfg.task}_searched")
    size = cfg.cost_size or search.spec.paper_size
    counted = model_cost(cfg.task, arch, size, cfg.num_classes, device="meta")
    cost = {"madds": counted.madds, "params": counted.params, "size": list(size),
            "table_cost": table.path_cost(path), "table_unit": table.unit, "budget": cfg.budget}
    result = SearchResult(arch, path, search.alphas(), cost, [x["lambda"] for x in search.lambdas], search.run_dir)
    if search.dist.main:
        save_arch(arch, search.files.arch, task=cfg.task, seed=search.seed.name, source="search", derive=how,
                  path=path, cost=cost)
        save_arch(arch, search.files.net_config)
        write_json(search.files.lambdas, search.lambdas, indent=None)
        write_json(search.files.config, cfg.model_dump())
        write_json(search.files.diagnostics, diagnostics(search))
    if cfg.debug_rank_files:
        debug = search.files.debug
        save_atomic(dict(backbone.alpha.items()), debug / f"alpha_rank{search.dist.rank}.pt")
        write_text_atomic(debug / f"arch_rank{search.dist.rank}.json", arch.to_json())
    return result

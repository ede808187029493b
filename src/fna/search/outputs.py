"""What a search writes into its directory and hands back: per-epoch records, the derived architecture.

Files: ``search_log.jsonl`` (one record per epoch), ``alpha_history.json``, ``arch.json`` (the derived
architecture with how it was derived, its path and cost), ``arch.net_config.txt``, ``lambda.json``,
``config.json``, ``cost_table.json``, ``checkpoint.pt``, ``tensorboard/``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fna.arch import SKIP, Arch, save_arch
from fna.checkpoint import save_atomic, write_text_atomic
from fna.cost import model_cost
from fna.supernet import SinglePath

if TYPE_CHECKING:
    from fna.search.loop import Search

SEARCH_FILES = ("checkpoint.pt", "arch.json", "search_log.jsonl", "alpha_history.json")  # a search's outputs


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
            "expected_cost": float(search.expected_cost()),
            "derived_cost": table.path_cost(path),
            "cost_unit": table.unit,
        }


def write_epoch_files(search: Search) -> None:
    """``search_log.jsonl`` and ``alpha_history.json`` from the checkpointed state (so a resumed search
    never repeats a line)."""
    write_text_atomic(search.run_dir / "search_log.jsonl", "".join(json.dumps(r) + "\n" for r in search.log))
    write_text_atomic(search.run_dir / "alpha_history.json", json.dumps(search.alpha_history))


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
        write_text_atomic(search.run_dir / "arch.json",
                          json.dumps({"arch": arch.to_dict(), "task": cfg.task, "seed": search.seed.name,
                                      "derive": how, "path": path, "cost": cost}, indent=2))
        save_arch(arch, search.run_dir / "arch.net_config.txt")
        write_text_atomic(search.run_dir / "lambda.json", json.dumps(search.lambdas))
        write_text_atomic(search.run_dir / "config.json", json.dumps(cfg.model_dump(), indent=2))
    if cfg.debug_rank_files:
        debug = search.run_dir / "debug"
        save_atomic(dict(backbone.alpha.items()), debug / f"alpha_rank{search.dist.rank}.pt")
        write_text_atomic(debug / f"arch_rank{search.dist.rank}.json", arch.to_json())
    return result

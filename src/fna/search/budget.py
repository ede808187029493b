"""What an architecture costs during a search: the per-candidate cost table (MAdds, or a measured
latency table), the hard budget's checks, λ's controller and the derivation inside the budget.

The architecture loss's ``C`` sums only the *searched* layers' candidates (SPEC §4): the fixed parts
(stem, first block, final conv, neck, heads) would only dilute its gradient — for RetinaNet at 800×1088
the searched layers are ≈ 3.5 % of the whole network, so a whole-network ``C`` would act ≈ 28× weaker.
The budget, which users give for the whole network, is compared with the whole network's cost.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fna.arch import Arch
from fna.cost import CostTable, best_path_within, cost_table_key, task_cost_table
from fna.errors import FnaError
from fna.search.config import SearchConfig, SearchError
from fna.supernet import SearchSpace, SinglePath


def load_cost_table(cfg: SearchConfig, seed_arch: Arch, space: SearchSpace, cache: Path | None,
                    write: bool = True) -> CostTable:
    """The search's cost table: ``cfg.latency_table`` (checked against the search's settings) or the MAdds
    table at ``cfg.cost_size``, cached in ``cache`` (rewritten when its key no longer matches)."""
    key = cost_table_key(cfg.task, seed_arch, space, cfg.cost_size, cfg.num_classes)
    if cfg.latency_table:
        table = CostTable.load(cfg.latency_table)
        check_latency_table(table, key, cfg, seed_arch, space)
        return table
    if cache is not None and cache.is_file():
        old = CostTable.load(cache)
        if old.key == key:
            return old
    table = task_cost_table(cfg.task, seed_arch, space, cfg.cost_size, cfg.num_classes)
    if cache is not None and write:
        table.save(cache)
    return table


def check_latency_table(table: CostTable, mine: dict[str, Any], cfg: SearchConfig, seed_arch: Arch,
                        space: SearchSpace) -> None:
    """:class:`SearchError` naming every setting in which ``table`` differs from the search (a field the
    table lacks is not checked)."""
    key = table.key
    if key.get("task", cfg.task) != cfg.task:
        raise SearchError(f"{cfg.latency_table} was measured for task {key['task']}, not {cfg.task}")

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
    if "seed_arch" in key and not same(Arch.from_dict, key["seed_arch"], seed_arch):
        differs.append(f"another seed architecture in the table than the search's ({seed_arch.name or 'seed'})")
    if "space" in key and not same(lambda d: SearchSpace.get(d).stages, key["space"], space.stages):
        name = key["space"].get("name", "?") if isinstance(key["space"], dict) else key["space"]
        differs.append(f"the table's search space {name!r} has other stages than the search's {space.name!r}")
    if differs:
        raise SearchError(f"{cfg.latency_table} does not fit this search: {'; '.join(differs)}; build a table "
                          "with the search's settings (`fna latency build`) or change the search's")


class Budget:
    """A hard budget ``budget ± tolerance`` (table unit) on the derived architecture's cost, held by a
    bounded multiplier on λ.

    After every architecture step λ follows the *expected* whole-network cost ``E[C]`` under softmax(α)
    (smooth in α, unlike the argmax path's cost): with ``e = ln(E[C] / budget)``,

    * inside the dead band ``|e| ≤ ln(1 + tolerance / 2)`` λ is held, so it does not dither once there;
    * otherwise ``λ ← clip(λ + gain · scale · clip(e, −0.1, 0.1), 0, λ_max)`` with ``scale = max(λ₀, 0.01)``:
      each step is bounded, λ never turns negative (that would reward expensive ops) and it cannot wind
      up past ``λ_max``, so a long search does not build up an oscillation.

    Without a budget no :class:`Budget` exists and λ stays the paper's fixed value. The final derivation
    takes the argmax path when it is inside the band, else the most probable path inside it.
    """

    STEP = 0.1  # the largest |ln(E[C] / budget)| one step acts on

    def __init__(self, table: CostTable, budget: float, tolerance: float, gain: float, lam0: float,
                 lam_max: float) -> None:
        self.table, self.budget, self.tolerance, self.gain = table, budget, tolerance, gain
        self.scale, self.lam_max = max(lam0, 0.01), lam_max
        unit = "MAdds" if table.unit == "madds" else "ms"
        lo, hi = table.bounds()
        if lo > budget * (1 + tolerance):
            raise SearchError(f"budget {budget:,.6g} {unit} is below the smallest network of this search space "
                              f"({lo:,.6g} {unit}, every layer at its cheapest op)")
        if hi < budget * (1 - tolerance):
            raise SearchError(f"budget {budget:,.6g} {unit} is above the largest network of this search space "
                              f"({hi:,.6g} {unit})")
        uniform = [[[0.0] * len(c) for c in stage] for stage in table.layers]
        if self.best_path(uniform) is None:
            raise SearchError(f"no architecture of this search space costs within ±{tolerance:.0%} of "
                              f"{budget:,.6g} {unit}")

    def contains(self, cost: float) -> bool:
        return abs(cost / self.budget - 1) <= self.tolerance

    def best_path(self, log_probs: list[list[list[float]]]) -> SinglePath | None:
        """The most probable path (under ``log_probs``) inside the band."""
        return best_path_within(self.table, log_probs, self.budget * (1 - self.tolerance),
                                self.budget * (1 + self.tolerance))

    def update(self, lam: float, expected: float) -> float:
        """λ after an architecture step that leaves the expected whole-network cost at ``expected``
        (table unit)."""
        e = math.log(max(expected, 1e-30) / self.budget)
        if abs(e) <= math.log1p(self.tolerance / 2):
            return lam
        return min(max(lam + self.gain * self.scale * max(-self.STEP, min(self.STEP, e)), 0.0), self.lam_max)

    def derive(self, argmax: SinglePath, probs: list[list[torch.Tensor]]) -> tuple[SinglePath, str]:
        """The final path and how it was derived."""
        if self.contains(self.table.path_cost(argmax)):
            return argmax, "argmax"
        log_probs = [[torch.log(p.detach().double().cpu()).tolist() for p in stage] for stage in probs]
        return self.best_path(log_probs), f"most probable path within ±{self.tolerance:.0%} of the budget"

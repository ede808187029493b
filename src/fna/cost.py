"""MAdds and parameter counting with the paper's conventions (SPEC §6).

MAdds come from ``Conv2d`` and ``Linear`` only: a conv costs ``kh·kw·(C_in/groups)·C_out·H_out·W_out``
(plus ``C_out·H_out·W_out`` with a bias), a linear layer ``in·out`` per sample. BatchNorm, activations,
pooling, additions and upsampling count 0. Params are all parameters. Counts are per image.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fna.checkpoint import write_text_atomic
from fna.errors import FnaError
from fna.supernet import SuperBackbone
from fna.tasks import build_model, get_task


@dataclass
class Cost:
    """MAdds and params of a model, with a breakdown by top-level part."""

    madds: int
    params: int
    parts: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"madds": self.madds, "params": self.params, "parts": self.parts}


def conv_madds(conv: nn.Conv2d, out_hw: tuple[int, int]) -> int:
    """MAdds of one conv producing an ``out_hw`` map (per image)."""
    kh, kw = conv.kernel_size
    pixels = out_hw[0] * out_hw[1]
    madds = kh * kw * (conv.in_channels // conv.groups) * conv.out_channels * pixels
    if conv.bias is not None:
        madds += conv.out_channels * pixels
    return madds


def _part_of(name: str, parts: dict[str, str]) -> str:
    for label, prefix in parts.items():
        if name == prefix or name.startswith(prefix + "."):
            return label
    return "other"


def count(model: nn.Module, example: torch.Tensor, forward: Callable[[torch.Tensor], object] | None = None,
          parts: dict[str, str] | None = None) -> Cost:
    """Count MAdds of one forward pass on ``example`` (batch of 1) and the params of ``model``.

    ``forward`` replaces ``model(example)`` (e.g. a detector's dense forward without pre/post
    processing). ``parts`` maps a label to a module-name prefix to break the counts down by
    (default: one part per top-level child); anything else counts as ``other``.
    """
    if example.shape[0] != 1:
        raise ValueError("count() expects a batch of one image")
    parts = parts or {name: name for name, _ in model.named_children()}
    madds: dict[str, int] = {p: 0 for p in (*parts, "other")}
    hooks = []

    def hook(name: str):
        def fn(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if isinstance(module, nn.Conv2d):
                m = conv_madds(module, tuple(output.shape[-2:]))
            else:
                m = module.in_features * module.out_features * (output.numel() // output.shape[-1])
            madds[_part_of(name, parts)] += m
        return fn

    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            hooks.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            (forward or model)(example)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    params = {p: 0 for p in madds}
    for name, p in model.named_parameters():
        params[_part_of(name, parts)] += p.numel()
    breakdown = {p: {"madds": madds[p], "params": params[p]} for p in madds if madds[p] or params[p]}
    return Cost(sum(madds.values()), sum(params.values()), breakdown)


def model_cost(task: str, arch, size: tuple[int, int] | None = None, num_classes: int | None = None,
               device: str = "meta") -> Cost:
    """MAdds/params of ``task``'s model on ``arch`` at ``size`` (default: the paper's size for the task).

    ``device="meta"`` counts from shapes alone, without computing anything (same numbers, much faster).
    """
    spec = get_task(task)
    with torch.device(device):
        model = build_model(task, arch, num_classes)
    h, w = size or spec.paper_size
    return count(model, torch.zeros(1, 3, h, w, device=device), forward=getattr(model, "dense_forward", None),
                 parts=getattr(model, "cost_parts", None))


# -- per-candidate cost tables for the search (SPEC §4) ------------------------------------------

COST_UNITS = {"madds": 1e-9, "ms": 1.0}  # table unit → factor to the loss unit (GMAdds, ms)


class CostTableError(FnaError):
    """A cost or latency table is unreadable or does not fit the search space."""


@dataclass
class CostTable:
    """Cost of every candidate of every searched layer, plus the cost of everything not searched.

    ``layers[s][l][k]`` is the cost of candidate ``k`` (``candidates[s][l][k]``) at layer ``l`` of
    searched stage ``s``; ``fixed`` is the rest of the task model (stem, first block, final conv, neck,
    head), so ``fixed + Σ chosen`` is the whole network's cost. ``unit`` is ``madds`` (integers) or
    ``ms`` (a measured latency table).
    """

    unit: str
    fixed: float
    layers: list[list[list[float]]]
    candidates: list[list[list[str]]]
    key: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.unit not in COST_UNITS:
            raise CostTableError(f"unknown cost unit {self.unit!r}: expected one of {', '.join(COST_UNITS)}")
        shape = [[len(c) for c in stage] for stage in self.candidates]
        if [[len(c) for c in stage] for stage in self.layers] != shape:
            raise CostTableError(f"cost table shape {[[len(c) for c in s] for s in self.layers]} does not match "
                                 f"its candidates {shape}")
        if self.fixed < 0 or any(c < 0 for stage in self.layers for layer in stage for c in layer):
            raise CostTableError("costs must be >= 0")

    def path_cost(self, path: list[list[int]]) -> float:
        """Whole-network cost of a single path (table unit)."""
        return self.fixed + sum(layer[k] for stage, p in zip(self.layers, path) for layer, k in zip(stage, p))

    def bounds(self) -> tuple[float, float]:
        """Cost of the cheapest and of the most expensive path (table unit)."""
        flat = [layer for stage in self.layers for layer in stage]
        return self.fixed + sum(min(c) for c in flat), self.fixed + sum(max(c) for c in flat)

    def expected(self, probs: list[list[torch.Tensor]], whole: bool = False) -> torch.Tensor:
        """``Σ_layers Σ_k p_k · cost_k`` over the searched layers — the ``C`` of the search's loss (SPEC §4)
        — in the loss unit (GMAdds or ms), differentiable in ``probs``; ``whole`` adds the fixed parts
        (the whole network's expected cost, which a budget constrains)."""
        scale = COST_UNITS[self.unit]
        total = torch.zeros((), dtype=probs[0][0].dtype, device=probs[0][0].device)
        if whole:
            total = total + self.fixed * scale
        for stage_p, stage_c in zip(probs, self.layers):
            for p, c in zip(stage_p, stage_c):
                total = total + (p * torch.tensor(c, dtype=p.dtype, device=p.device) * scale).sum()
        return total

    def check_fits(self, candidates: list[list[tuple[str, ...]]]) -> None:
        """Raise :class:`CostTableError` unless the table lists exactly ``candidates``."""
        if [[list(c) for c in s] for s in candidates] != self.candidates:
            raise CostTableError("the cost table was made for a different search space (candidates differ)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        write_text_atomic(path, json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> CostTable:
        """Read a table written by :meth:`save`, or a user latency table of the same shape."""
        try:
            d = json.loads(Path(path).read_text())
            if d.get("complete") is False:
                raise CostTableError(f"{path}: a partial latency table; finish it with `fna latency build ... "
                                     "--resume`")
            return cls(unit=str(d["unit"]), fixed=float(d["fixed"]),
                       layers=[[[float(c) for c in layer] for layer in stage] for stage in d["layers"]],
                       candidates=[[[str(o) for o in layer] for layer in stage] for stage in d["candidates"]],
                       key=dict(d.get("key", {})))
        except OSError as e:
            raise CostTableError(f"{path}: cannot read ({e.strerror})") from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise CostTableError(f"{path}: not a cost table ({type(e).__name__}: {e}); expected JSON with unit, "
                                 "fixed, layers [stage][layer][candidate] and candidates of the same shape") from None


def candidate_cost_table(model: nn.Module, backbone: nn.Module, example: torch.Tensor,
                         forward: Callable[[torch.Tensor], object] | None = None) -> CostTable:
    """MAdds of every candidate of ``backbone`` (a :class:`~fna.supernet.SuperBackbone` inside ``model``).

    One forward with every candidate running counts each candidate's convs at its position; all
    other convs of ``model`` are the fixed part. ``example`` may live on the ``meta`` device.
    """
    prefix = next(name for name, m in model.named_modules() if m is backbone)
    prefix = prefix + "." if prefix else ""
    labels = {}
    for i, layers in enumerate(backbone.candidates, start=1):
        for j in range(len(layers)):
            for k in range(len(backbone.stages[i][j].ops)):
                labels[f"{i}.{j}.{k}"] = f"{prefix}stages.{i}.{j}.ops.{k}"
    previous = backbone.path
    backbone.set_path(None)
    try:
        cost = count(model, example, forward, parts=labels)
    finally:
        backbone.set_path(previous)
    madds = {label: float(cost.parts.get(label, {}).get("madds", 0)) for label in labels}
    layers = [[[madds.get(f"{i}.{j}.{k}", 0.0) for k in range(len(names))] for j, names in enumerate(layers)]
              for i, layers in enumerate(backbone.candidates, start=1)]
    return CostTable("madds", float(cost.madds) - sum(madds.values()), layers,
                     [[list(names) for names in layers] for layers in backbone.candidates])


def task_cost_table(task: str, seed_arch, space, size: tuple[int, int] | None = None,
                    num_classes: int | None = None) -> CostTable:
    """The MAdds table of ``task``'s super network on ``seed_arch`` over ``space`` at ``size``.

    Built on the ``meta`` device: only shapes are computed, so the paper's sizes cost well under a second.
    """
    spec = get_task(task)
    h, w = size or spec.paper_size
    with torch.device("meta"):
        backbone = SuperBackbone(seed_arch, space, spec.taps(seed_arch), spec.output_stride)
        model = spec.head(backbone, num_classes or spec.num_classes)
    table = candidate_cost_table(model, backbone, torch.zeros(1, 3, h, w, device="meta"),
                                 getattr(model, "dense_forward", None))
    table.key = cost_table_key(task, seed_arch, space, size, num_classes)
    return table


def cost_table_key(task: str, seed_arch, space, size: tuple[int, int] | None = None,
                   num_classes: int | None = None) -> dict[str, Any]:
    """What a cached :func:`task_cost_table` depends on, as plain JSON data."""
    spec = get_task(task)
    key = {"task": task, "size": list(size or spec.paper_size), "num_classes": num_classes or spec.num_classes,
           "seed_arch": seed_arch.to_dict(), "space": space.to_dict()}
    return json.loads(json.dumps(key))


def best_path_within(table: CostTable, log_probs: list[list[list[float]]], low: float, high: float,
                     bins: int = 2000) -> list[list[int]] | None:
    """A most probable path whose cost lies in ``[low, high]`` (table unit), or ``None`` if none is found.

    Dynamic programming over the layers, keeping the best partial path per cost bin (``high / bins``
    wide); exact costs are carried along, so a returned path is always inside the band. It is an
    approximation: two partial paths in one bin keep only the more probable, so where the band's edge
    falls within a bin's width of the best paths, a slightly less probable path (or, for a band narrower
    than a bin, none) may be returned although a better one exists.
    """
    flat = [(c, lp) for sc, sl in zip(table.layers, log_probs) for c, lp in zip(sc, sl)]
    width = high / bins
    states: dict[int, tuple[float, float, tuple[int, ...]]] = {0: (0.0, table.fixed, ())}
    for costs, lps in flat:
        nxt: dict[int, tuple[float, float, tuple[int, ...]]] = {}
        for score, cost, chosen in states.values():
            for k, (c, lp) in enumerate(zip(costs, lps)):
                total = cost + c
                if total > high:  # costs are >= 0: no completion can come back into the band
                    continue
                b, s = int(total / width), score + lp
                if b not in nxt or s > nxt[b][0]:
                    nxt[b] = (s, total, chosen + (k,))
        states = nxt
    feasible = [v for v in states.values() if low <= v[1] <= high]
    if not feasible:
        return None
    chosen = iter(max(feasible, key=lambda v: v[0])[2])
    return [[next(chosen) for _ in stage] for stage in table.layers]

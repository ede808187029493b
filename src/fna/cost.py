"""MAdds and parameter counting with the paper's conventions (SPEC §6).

MAdds come from ``Conv2d`` and ``Linear`` only: a conv costs ``kh·kw·(C_in/groups)·C_out·H_out·W_out``
(plus ``C_out·H_out·W_out`` with a bias), a linear layer ``in·out`` per sample. BatchNorm, activations,
pooling, additions and upsampling count 0. Params are all parameters. Counts are per image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


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


def model_cost(task: str, arch, size: tuple[int, int] | None = None, num_classes: int | None = None) -> Cost:
    """MAdds/params of ``task``'s model on ``arch`` at ``size`` (default: the paper's size for the task)."""
    from fna.tasks import build_model, get_task

    spec = get_task(task)
    model = build_model(task, arch, num_classes)
    h, w = size or spec.paper_size
    return count(model, torch.zeros(1, 3, h, w), forward=getattr(model, "dense_forward", None),
                 parts=getattr(model, "cost_parts", None))

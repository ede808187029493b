"""Building blocks: conv-BN-activation, squeeze-excitation and the MBConv (inverted residual) layer.

Every MBConv has the same roles, in forward order, which the remapping walks by name: ``expand``
(1x1, absent when the expansion is 1), ``depthwise`` (KxK, carries stride and dilation), ``se``
(:class:`SqueezeExcite`, only in ``_se`` ops) and ``project`` (1x1, no activation). ``expand``,
``depthwise`` and ``project`` are :class:`ConvBNAct` with children ``conv``, ``bn`` and (except
``project``) ``act``.
"""

from __future__ import annotations

import torch
from torch import nn

from fna.arch import Op, SqueezeExcite as SESpec

_ACTIVATIONS = {"relu6": lambda: nn.ReLU6(inplace=True), "relu": lambda: nn.ReLU(inplace=True),
                "hswish": lambda: nn.Hardswish(inplace=True), "silu": lambda: nn.SiLU(inplace=True),
                "sigmoid": nn.Sigmoid, "hardsigmoid": nn.Hardsigmoid}


def make_activation(name: str) -> nn.Module:
    """An activation or SE gate by name (``relu6``, ``relu``, ``hswish``, ``silu``, ``sigmoid``, ``hardsigmoid``)."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}")
    return _ACTIVATIONS[name]()


class ConvBNAct(nn.Sequential):
    """Bias-free conv → BatchNorm → optional activation, with 'same' padding for odd kernels.

    ``bn_affine=False`` gives the searched-candidate BN of the super network: no affine parameters
    and no running statistics (always batch statistics).
    """

    def __init__(self, c_in: int, c_out: int, kernel: int = 1, stride: int = 1, dilation: int = 1,
                 groups: int = 1, activation: str | None = "relu6", bn_affine: bool = True,
                 bn_eps: float = 1e-5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding=dilation * (kernel - 1) // 2,
                              dilation=dilation, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=bn_eps, affine=bn_affine, track_running_stats=bn_affine)
        if activation is not None:
            self.act = make_activation(activation)


class SqueezeExcite(nn.Module):
    """Global average pool → ``reduce`` (linear) → activation → ``expand`` (linear) → gate → scale the input.

    The two fully connected layers are :class:`~torch.nn.Linear` on the pooled vector (what
    torchvision's and timm's 1x1 convs on a 1x1 map compute), so they count as linear layers (SPEC §6).
    """

    def __init__(self, channels: int, reduced: int, activation: str, gate: str) -> None:
        super().__init__()
        self.reduce = nn.Linear(channels, reduced)
        self.act = make_activation(activation)
        self.expand = nn.Linear(reduced, channels)
        self.gate = make_activation(gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.gate(self.expand(self.act(self.reduce(x.mean((2, 3))))))
        return x * scale[:, :, None, None]


class MBConv(nn.Module):
    """Inverted residual layer ``k{K}_e{E}[_se][_{act}]``: expand 1x1 → depthwise KxK → [SE] → project 1x1
    (+ identity). ``activation`` is the network's, used unless the op names its own; ``se`` says how
    an ``_se`` op squeezes."""

    def __init__(self, c_in: int, c_out: int, op: Op, stride: int = 1, dilation: int = 1,
                 activation: str = "relu6", bn_affine: bool = True, bn_eps: float = 1e-5,
                 se: SESpec | None = None) -> None:
        super().__init__()
        if op.se and se is None:
            raise ValueError(f"op {op.name} has squeeze-excitation, but no SE description was given")
        hidden = op.hidden(c_in)
        self.op = op
        self.stride = stride
        norm = dict(activation=op.activation or activation, bn_affine=bn_affine, bn_eps=bn_eps)
        self.expand = ConvBNAct(c_in, hidden, 1, **norm) if op.expansion != 1 else None
        self.depthwise = ConvBNAct(hidden, hidden, op.kernel, stride, dilation, groups=hidden, **norm)
        self.se = SqueezeExcite(hidden, se.reduced(c_in, hidden), se.activation, se.gate) if op.se else None
        self.project = ConvBNAct(hidden, c_out, 1, **{**norm, "activation": None})
        self.use_residual = c_in == c_out and stride == 1

    def forward_with_hidden(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Output and the expanded activation (the SSDLite tap inside a layer)."""
        hidden = self.expand(x) if self.expand is not None else x
        out = self.depthwise(hidden)
        out = self.project(self.se(out) if self.se is not None else out)
        return (out + x if self.use_residual else out), hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_hidden(x)[0]

    def extra_repr(self) -> str:
        return f"{self.op.name}, stride={self.stride}, residual={self.use_residual}"

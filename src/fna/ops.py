"""Building blocks: conv-BN-activation and the MBConv (inverted residual) layer.

Every MBConv has the same three roles, in forward order, which the remapping walks by name:
``expand`` (1x1, absent when the expansion is 1), ``depthwise`` (KxK, carries stride and dilation)
and ``project`` (1x1, no activation). Each role is a :class:`ConvBNAct` with children ``conv``,
``bn`` and (except ``project``) ``act``.
"""

from __future__ import annotations

import torch
from torch import nn

from fna.arch import Op


def make_activation(name: str) -> nn.Module:
    """``relu6`` or ``relu`` as a module."""
    if name == "relu6":
        return nn.ReLU6(inplace=True)
    if name == "relu":
        return nn.ReLU(inplace=True)
    raise ValueError(f"unknown activation {name!r}")


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


class MBConv(nn.Module):
    """Inverted residual layer ``k{K}_e{E}``: expand 1x1 → depthwise KxK → project 1x1 (+ identity)."""

    def __init__(self, c_in: int, c_out: int, op: Op, stride: int = 1, dilation: int = 1,
                 activation: str = "relu6", bn_affine: bool = True, bn_eps: float = 1e-5) -> None:
        super().__init__()
        hidden = c_in * op.expansion
        self.op = op
        self.stride = stride
        norm = dict(activation=activation, bn_affine=bn_affine, bn_eps=bn_eps)
        self.expand = ConvBNAct(c_in, hidden, 1, **norm) if op.expansion != 1 else None
        self.depthwise = ConvBNAct(hidden, hidden, op.kernel, stride, dilation, groups=hidden, **norm)
        self.project = ConvBNAct(hidden, c_out, 1, **{**norm, "activation": None})
        self.use_residual = c_in == c_out and stride == 1

    def forward_with_hidden(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Output and the expanded activation (the SSDLite tap inside a layer)."""
        hidden = self.expand(x) if self.expand is not None else x
        out = self.project(self.depthwise(hidden))
        return (out + x if self.use_residual else out), hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_hidden(x)[0]

    def extra_repr(self) -> str:
        return f"{self.op.name}, stride={self.stride}, residual={self.use_residual}"

"""Building blocks: conv-BN-activation, squeeze-excitation, the MBConv (inverted residual) layer and the
ResNet basic / bottleneck block.

Every MBConv has the same roles, in forward order, which the remapping walks by name: ``expand``
(1x1, absent when the expansion is 1), ``depthwise`` (KxK, carries stride and dilation), ``se``
(:class:`SqueezeExcite`, only in ``_se`` ops) and ``project`` (1x1, no activation). ``expand``,
``depthwise`` and ``project`` are :class:`ConvBNAct` with children ``conv``, ``bn`` and (except
``project``) ``act``.

A :class:`ResBlock` has the roles ``conv1``, ``conv2`` (the KxK convs of a basic block; a bottleneck's
1x1 reduce and KxK conv), ``conv3`` (a bottleneck's 1x1 expand) and ``downsample`` (1x1 conv + BN on the
identity path, where the layer changes shape), torchvision's names. Every block class lists its roles
in ``roles`` (a class attribute), in forward order; a role the layer does not have is ``None``.
"""

from __future__ import annotations

import torch
from torch import nn

from fna.arch import Op, ResOp, SqueezeExcite as SESpec

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

    roles = ("expand", "depthwise", "se", "project")

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


class ResBlock(nn.Module):
    """ResNet block ``basic_k{K}_g{G}`` / ``bottle_k{K}_g{G}`` (see :mod:`fna.arch`): its convs → BN, then the
    identity (or ``downsample``: 1x1 conv with the layer's stride + BN, where the shape changes) is added
    and the activation applied. The stride sits in the first KxK conv (ResNet v1.5).

    ``stride`` and ``dilation`` are the block's after the output-stride conversion; the strided KxK conv
    has ``first_dilation`` instead (default ``dilation``: in a block whose stride became dilation, the
    dilation before it, torchvision's ``replace_stride_with_dilation``). ``arch_stride`` is the block's
    stride in the architecture (default ``stride``): it has a ``downsample`` where it changes width or
    ``arch_stride`` is not 1, so it computes the same function at any output stride.
    """

    roles = ("conv1", "conv2", "conv3", "downsample")

    def __init__(self, c_in: int, c_out: int, op: ResOp, stride: int = 1, dilation: int = 1,
                 activation: str = "relu", bn_affine: bool = True, bn_eps: float = 1e-5,
                 first_dilation: int | None = None, arch_stride: int | None = None) -> None:
        super().__init__()
        self.op = op
        self.stride = stride
        norm = dict(activation=activation, bn_affine=bn_affine, bn_eps=bn_eps)
        last = {**norm, "activation": None}
        k, g = op.kernel, op.groups
        d0 = dilation if first_dilation is None else first_dilation
        if op.kind == "basic":
            self.conv1 = ConvBNAct(c_in, c_out, k, stride, d0, groups=g, **norm)
            self.conv2 = ConvBNAct(c_out, c_out, k, 1, dilation, groups=g, **last)
            self.conv3 = None
        else:
            width = op.width(c_out)
            self.conv1 = ConvBNAct(c_in, width, 1, **norm)
            self.conv2 = ConvBNAct(width, width, k, stride, d0, groups=g, **norm)
            self.conv3 = ConvBNAct(width, c_out, 1, **last)
        shape_changes = c_in != c_out or (stride if arch_stride is None else arch_stride) != 1
        self.downsample = ConvBNAct(c_in, c_out, 1, stride, **last) if shape_changes else None
        self.act = make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        if self.conv3 is not None:
            out = self.conv3(out)
        return self.act(out + (self.downsample(x) if self.downsample is not None else x))

    def forward_with_hidden(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Output and ``None``: a residual block has no expand activation to tap."""
        return self(x), None

    def extra_repr(self) -> str:
        return f"{self.op.name}, stride={self.stride}, downsample={self.downsample is not None}"


BLOCKS = (MBConv, ResBlock)  # the layer classes a plain backbone is built of

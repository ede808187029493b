"""Backbone builder: an :class:`~fna.arch.Arch` becomes an ``nn.Module``.

One builder serves every use. The backbone returns an ordered dict of the feature *taps* asked for:

* ``"stage{i}"`` — the output of stage ``i`` (``stages[0]`` is the fixed first block);
* ``"expand{i}"`` — inside the first layer of stage ``i``: its expand conv + BN + activation
  (the SSDLite tap, 576 channels at stride 16 on MobileNetV2);
* ``"final"`` — the final 1x1 conv (1280 channels on MobileNetV2).

The final 1x1 conv is built only when ``"final"`` is tapped. ``output_stride`` turns strides beyond it
into dilation (DeepLabv3 OS16: the 160 and 320 stages run at stride 1, dilation 2).
Modules are registered in forward order: ``stem``, ``stages[i][j]`` (expand → depthwise → project),
``final``. Skip layers are identities and are not built.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from fna.arch import SKIP, Arch, ArchError, parse_op
from fna.ops import ConvBNAct, MBConv

_TAP_RE = re.compile(r"^(stage|expand)(\d+)$")


def stage_dilations(arch: Arch, output_stride: int | None) -> list[tuple[int, int]]:
    """Per stage ``(stride, dilation)`` after converting strides beyond ``output_stride`` to dilation."""
    out, current, dilation = [], arch.stem_stride, 1
    for stage in arch.stages:
        stride = stage.stride
        if output_stride is not None and current * stride > output_stride:
            dilation *= stride
            stride = 1
        current *= stride
        out.append((stride, dilation * stage.dilation))
    return out


def init_weights(module: nn.Module) -> None:
    """torchvision's MobileNetV2 initialisation (kaiming fan-out convs, unit BN, small linear)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def parse_taps(arch: Arch, taps: Sequence[str]) -> None:
    """Check that every tap names something this arch has."""
    for tap in taps:
        if tap == "final":
            if not arch.final_channels:
                raise ArchError("tap 'final' asked for, but the architecture has no final 1x1 conv")
            continue
        m = _TAP_RE.match(tap)
        if not m or int(m.group(2)) >= len(arch.stages):
            raise ArchError(f"unknown tap {tap!r}: expected 'stage<i>' or 'expand<i>' with i < "
                            f"{len(arch.stages)}, or 'final'")
        if m.group(1) == "expand":
            first = parse_op(arch.stages[int(m.group(2))].ops[0])
            if first is None or first.expansion == 1:
                raise ArchError(f"tap {tap!r}: the first layer of stage {m.group(2)} has no expand conv")


def tap_channels(arch: Arch, tap: str) -> int:
    """Channels of a tap's feature map."""
    if tap == "final":
        return arch.final_channels
    kind, i = _TAP_RE.match(tap).groups()  # type: ignore[union-attr]
    stage = arch.stages[int(i)]
    if kind == "stage":
        return stage.c_out
    return stage.c_in * parse_op(stage.ops[0]).expansion  # type: ignore[union-attr]


class Backbone(nn.Module):
    """MBConv backbone built from an :class:`Arch`; ``forward`` returns the requested taps."""

    def __init__(self, arch: Arch, taps: Sequence[str] = ("final",), output_stride: int | None = None) -> None:
        super().__init__()
        parse_taps(arch, taps)
        self.arch = arch
        self.taps = tuple(taps)
        self.out_channels = OrderedDict((t, tap_channels(arch, t)) for t in self.taps)
        norm = dict(activation=arch.activation, bn_eps=arch.bn_eps)
        self.stem = ConvBNAct(arch.in_channels, arch.stem_channels, 3, arch.stem_stride, **norm)
        last_needed = max((self._stage_of(t) for t in self.taps), default=len(arch.stages) - 1)
        stages = []
        for stage, (stride, dilation) in list(zip(arch.stages, stage_dilations(arch, output_stride)))[:last_needed + 1]:
            layers, c_in = [], stage.c_in
            for j, name in enumerate(o for o in stage.ops if o != SKIP):
                layers.append(MBConv(c_in, stage.c_out, parse_op(name), stride if j == 0 else 1, dilation, **norm))
                c_in = stage.c_out
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.final = (ConvBNAct(arch.stages[-1].c_out, arch.final_channels, 1, **norm)
                      if "final" in self.taps else None)
        init_weights(self)

    def _stage_of(self, tap: str) -> int:
        return len(self.arch.stages) - 1 if tap == "final" else int(_TAP_RE.match(tap).group(2))  # type: ignore

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats: OrderedDict[str, torch.Tensor] = OrderedDict()
        x = self.stem(x)
        for i, stage in enumerate(self.stages):
            for j, layer in enumerate(stage):
                if j == 0 and f"expand{i}" in self.taps:
                    x, feats[f"expand{i}"] = layer.forward_with_hidden(x)
                else:
                    x = layer(x)
            if f"stage{i}" in self.taps:
                feats[f"stage{i}"] = x
        if self.final is not None:
            feats["final"] = self.final(x)
        return OrderedDict((t, feats[t]) for t in self.taps)


class Classifier(nn.Module):
    """ImageNet-style classifier: backbone → global average pool → dropout → linear."""

    cost_parts = {"backbone": "backbone", "head": "classifier"}

    def __init__(self, backbone: nn.Module, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(backbone.out_channels["final"], num_classes)
        init_weights(self.classifier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.backbone(x)["final"]
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(self.dropout(x))


def stride_taps(arch: Arch, strides: Sequence[int]) -> tuple[str, ...]:
    """The output tap of the last stage at each cumulative stride (e.g. 8, 16, 32 for an FPN)."""
    at = {}
    for i, s in enumerate(arch.stage_strides()):
        at[s] = f"stage{i}"
    missing = [s for s in strides if s not in at]
    if missing:
        raise ArchError(f"the architecture has no stage at stride(s) {missing}; it reaches {sorted(at)}")
    return tuple(at[s] for s in strides)


def ssdlite_taps(arch: Arch) -> tuple[str, str]:
    """SSDLite taps: inside the first layer that reaches stride 32 (its expand output), and the final conv."""
    for i, s in enumerate(arch.stage_strides()):
        if s == 32 and arch.stages[i].stride == 2:
            return f"expand{i}", "final"
    raise ArchError("SSDLite needs a stage that downsamples to stride 32")

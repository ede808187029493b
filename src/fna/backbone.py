"""The one backbone builder: an :class:`~fna.arch.Arch` becomes an ``nn.Module`` returning feature taps.

:class:`TapBackbone` builds stem conv [→ max-pool] → stages → final 1x1 conv, asking a *layer factory* for the
module at each layer position: :class:`Backbone` makes a plain :class:`~fna.ops.MBConv` or
:class:`~fna.ops.ResBlock` per op,
:class:`~fna.supernet.SuperBackbone` a mixed layer per candidate list. While building it records, like
timm's ``feature_info``, one :class:`LayerInfo` per layer (module, channels, stride, dilation and the
cumulative stride of its input) and one :class:`FeatureInfo` per tap (module, channels, stride), so
shapes at any image size follow without a forward (every conv pads 'same': sizes round up). One
``forward`` serves both networks; a subclass only says how one layer runs (:meth:`TapBackbone._runner`).

Taps (parsed only by :func:`parse_tap`, written only by :attr:`Tap.name`):

* ``"stage{i}"`` — the output of stage ``i`` (``stages[0]`` is the fixed first block);
* ``"expand{i}"`` — inside the first layer of stage ``i``: its expand conv + BN + activation
  (the SSDLite tap, 576 channels at stride 16 on MobileNetV2);
* ``"final"`` — the final 1x1 conv (1280 channels on MobileNetV2), or the last stage's output in a network
  without one (a ResNet's C5).

Stages after the last tapped one are not built, the final 1x1 conv only when ``"final"`` is tapped.
``output_stride`` turns strides beyond it into dilation (DeepLabv3 OS16: the 160 and 320 stages run at
stride 1, dilation 2, the first layer's depthwise conv included, SPEC §2; a ResNet's last stage likewise,
except that the first block's formerly strided KxK conv keeps the dilation before the stage's — torchvision's
``replace_stride_with_dilation``, the exact à-trous equivalent: C5 at OS16 sampled ``[::2, ::2]`` is C5 at
OS32). Modules are registered in forward order: ``stem`` (conv, bn, act [, pool]),
``stages[i][j]`` (expand → depthwise → project, or conv1 → conv2 → [conv3] → downsample), ``final``. Skip
layers are identities and are not built.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fna.arch import SKIP, Arch, ArchError, Op, parse_op
from fna.ops import BLOCKS, ConvBNAct, MBConv, ResBlock, make_activation

_TAP_RE = re.compile(r"^(stage|expand)(\d+)$")


@dataclass(frozen=True)
class Tap:
    """A feature tap: ``kind`` ``stage``, ``expand`` or ``final``, in or after stage ``stage``
    (``final``: the last stage)."""

    kind: str
    stage: int

    @property
    def name(self) -> str:
        return "final" if self.kind == "final" else f"{self.kind}{self.stage}"


def parse_tap(name: str, n_stages: int) -> Tap:
    """The tap ``name`` of a network with ``n_stages`` stages; :class:`ArchError` for anything else."""
    if name == "final":
        return Tap("final", n_stages - 1)
    m = _TAP_RE.match(name)
    if not m or int(m.group(2)) >= n_stages:
        raise ArchError(f"unknown tap {name!r}: expected 'stage<i>' or 'expand<i>' with i < {n_stages}, or 'final'")
    return Tap(m.group(1), int(m.group(2)))


def _reduced(size: Sequence[int], stride: int) -> tuple[int, int]:
    """Spatial size after ``stride``: a 'same'-padded conv of stride s maps n to ceil(n / s)."""
    return -(-int(size[0]) // stride), -(-int(size[1]) // stride)


@dataclass(frozen=True)
class LayerInfo:
    """One built layer as recorded by the builder.

    ``module`` is its name in the backbone (``stem``, ``stages.{i}.{j}``, ``final``); ``position``
    ``(i, j)`` and ``ops`` (its op, or a mixed layer's candidates) are set for stage layers only.
    ``stride`` and ``dilation`` are its own (after the output-stride conversion), ``in_stride`` the
    cumulative stride of its input. ``first_dilation`` is the dilation of a ResNet block's strided KxK conv:
    in the first layer of a stage whose stride became dilation, the dilation before that stage's
    (``None``: ``dilation``); ``arch_stride`` the layer's stride in the architecture, before the conversion
    (``None``: ``stride``), which decides a ResNet block's downsample. MBConv layers use neither.
    """

    module: str
    c_in: int
    c_out: int
    stride: int
    dilation: int
    in_stride: int
    position: tuple[int, int] | None = None
    ops: tuple[str, ...] = ()
    first_dilation: int | None = None
    arch_stride: int | None = None

    def __post_init__(self) -> None:
        if self.first_dilation is None:
            object.__setattr__(self, "first_dilation", self.dilation)
        if self.arch_stride is None:
            object.__setattr__(self, "arch_stride", self.stride)

    def input_shape(self, size: Sequence[int], batch: int = 1) -> tuple[int, int, int, int]:
        """Shape of this layer's input for an image of ``size`` (H, W)."""
        return (batch, self.c_in, *_reduced(size, self.in_stride))


@dataclass(frozen=True)
class FeatureInfo:
    """One tap as recorded by the builder: its channels, its cumulative stride and the module giving it
    (for an ``expand`` tap the layer whose expand activation it is)."""

    tap: Tap
    module: str
    channels: int
    stride: int

    def shape(self, size: Sequence[int], batch: int = 1) -> tuple[int, int, int, int]:
        """Shape of the tapped map for an image of ``size`` (H, W)."""
        return (batch, self.channels, *_reduced(size, self.stride))


LayerFactory = Callable[[LayerInfo, Arch], nn.Module]  # (layer, its network) -> module
LayerRunner = Callable[[LayerInfo, nn.Module, torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor | None]]


def layer_module(stage: int, index: int) -> str:
    """Module name of layer ``index`` of stage ``stage`` in every backbone (and key prefix of its tensors)."""
    return f"stages.{stage}.{index}"


def make_layer(info: LayerInfo, op: str, arch: Arch, bn_affine: bool = True) -> MBConv | ResBlock:
    """The layer ``op`` (an MBConv or a ResNet block) at ``info``'s position of ``arch`` (its activation,
    BN eps and SE rule)."""
    parsed = parse_op(op)
    if isinstance(parsed, Op):
        return MBConv(info.c_in, info.c_out, parsed, info.stride, info.dilation, arch.activation,
                      bn_affine=bn_affine, bn_eps=arch.bn_eps, se=arch.se)
    return ResBlock(info.c_in, info.c_out, parsed, info.stride, info.dilation, arch.activation,
                    bn_affine=bn_affine, bn_eps=arch.bn_eps, first_dilation=info.first_dilation,
                    arch_stride=info.arch_stride)


def plain_layer(info: LayerInfo, arch: Arch) -> MBConv | ResBlock:
    """The layer factory of :class:`Backbone`: the layer of the position's one op."""
    (op,) = info.ops
    return make_layer(info, op, arch)


def run_plain(info: LayerInfo, layer: nn.Module, x: torch.Tensor, want_hidden: bool
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run a plain layer: its output and, when ``want_hidden``, its expand activation."""
    return layer.forward_with_hidden(x) if want_hidden else (layer(x), None)


def stage_dilations(arch: Arch, output_stride: int | None) -> list[tuple[int, int, int]]:
    """Per stage ``(stride, dilation, first_dilation)`` after converting strides beyond ``output_stride`` to
    dilation; ``first_dilation`` is the dilation before the stage's conversion (what the conv that carried
    the stride keeps in a ResNet block, see :class:`LayerInfo`)."""
    out, current, dilation = [], arch.input_stride, 1
    for stage in arch.stages:
        stride, before = stage.stride, dilation
        if output_stride is not None and current * stride > output_stride:
            dilation *= stride
            stride = 1
        current *= stride
        out.append((stride, dilation * stage.dilation, before * stage.dilation))
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


def _tap_feature(tap: Tap, arch: Arch, per_stage: Sequence[Sequence[LayerInfo]],
                 ends: Sequence[tuple[str, int]]) -> FeatureInfo:
    """Where ``tap`` is read, its channels and stride; :class:`ArchError` for an expand tap on a layer
    without an expand conv (or, in a mixed layer, with more than one width)."""
    if tap.kind == "final":
        if not arch.final_channels:
            return FeatureInfo(tap, ends[-1][0], arch.stages[-1].c_out, ends[-1][1])
        return FeatureInfo(tap, "final", arch.final_channels, ends[-1][1])
    if tap.kind == "stage":
        module, stride = ends[tap.stage]
        return FeatureInfo(tap, module, arch.stages[tap.stage].c_out, stride)
    first = per_stage[tap.stage][0] if per_stage[tap.stage] else None
    ops = [parse_op(o) for o in first.ops] if first is not None else []
    if not ops or any(not isinstance(op, Op) or op.expansion == 1 for op in ops):
        raise ArchError(f"tap {tap.name!r}: the first layer of stage {tap.stage} has no expand conv")
    widths = {op.hidden(first.c_in) for op in ops}
    if len(widths) > 1:
        raise ArchError(f"tap {tap.name!r}: the candidates of the first layer of stage {tap.stage} differ in "
                        "expansion, so the tap has no one width")
    return FeatureInfo(tap, first.module, widths.pop(), first.in_stride)


class TapBackbone(nn.Module):
    """Stem → stages → final conv of ``arch``, the layer positions made by ``factory``; returns the taps.

    ``stage_ops[i][j]`` is what layer ``j`` of stage ``i`` computes (one op, or a mixed layer's
    candidates; skips already dropped). Attributes: ``taps``, ``output_stride``, ``layer_info`` (forward
    order), ``feature_info`` and ``out_channels`` (both in tap order), ``head_channels`` and
    ``activation`` (what a classifier puts after pooling), modules ``stem``, ``stages``
    (``nn.Sequential`` of plain layers, else ``nn.ModuleList``) and ``final`` (``None`` unless tapped and the
    architecture has a final 1x1 conv).
    The weights are initialised (:func:`init_weights`).
    """

    def __init__(self, arch: Arch, taps: Sequence[str], output_stride: int | None,
                 stage_ops: Sequence[Sequence[Sequence[str]]], factory: LayerFactory) -> None:
        super().__init__()
        self.taps = tuple(taps)
        self.output_stride = output_stride
        parsed = [parse_tap(t, len(arch.stages)) for t in dict.fromkeys(self.taps)]
        built = max((t.stage for t in parsed), default=len(arch.stages) - 1) + 1
        has_final = any(t.kind == "final" for t in parsed) and arch.final_channels > 0

        # plan: every layer's info, and where each stage's output comes from (module, stride)
        stride = arch.input_stride
        per_stage: list[tuple[LayerInfo, ...]] = []
        ends: list[tuple[str, int]] = []
        last = "stem"
        for i, (stage, (s, d, d0), ops) in enumerate(zip(arch.stages[:built], stage_dilations(arch, output_stride),
                                                         stage_ops)):
            infos = []
            for j, names in enumerate(ops):
                first = j == 0
                infos.append(LayerInfo(layer_module(i, j), stage.c_in if first else stage.c_out, stage.c_out,
                                       s if first else 1, d, stride, (i, j), tuple(names), d0 if first else d,
                                       stage.stride if first else 1))
                stride *= s if first else 1
                last = infos[-1].module
            per_stage.append(tuple(infos))
            ends.append((last, stride))  # an empty (all-skip) stage passes the previous output on
        self.feature_info = tuple(_tap_feature(t, arch, per_stage, ends) for t in parsed)
        self.layer_info = (LayerInfo("stem", arch.in_channels, arch.stem_channels, arch.input_stride, 1, 1),
                           *(info for infos in per_stage for info in infos),
                           *([LayerInfo("final", arch.stages[-1].c_out, arch.final_channels, 1, 1, stride)]
                             if has_final else []))
        self.out_channels = OrderedDict((f.tap.name, f.channels) for f in self.feature_info)
        self.head_channels, self.activation = arch.head_channels, arch.activation
        self._stage_infos = tuple(per_stage)
        self._expand_taps = {f.tap.stage: f.tap.name for f in self.feature_info if f.tap.kind == "expand"}
        self._stage_taps = {f.tap.stage: f.tap.name for f in self.feature_info if f.tap.kind == "stage"}
        self._final_tap = next((f.tap.name for f in self.feature_info if f.tap.kind == "final"), None)

        # build, in forward order
        norm = dict(activation=arch.activation, bn_eps=arch.bn_eps)
        self.stem = ConvBNAct(arch.in_channels, arch.stem_channels, arch.stem_kernel, arch.stem_stride, **norm)
        if arch.stem_pool:
            self.stem.add_module("pool", nn.MaxPool2d(3, 2, 1))
        stages = []
        for infos in per_stage:
            made = [factory(info, arch) for info in infos]
            stages.append(nn.Sequential(*made) if all(isinstance(m, BLOCKS) for m in made) else nn.ModuleList(made))
        self.stages = nn.ModuleList(stages)
        self.final = ConvBNAct(arch.stages[-1].c_out, arch.final_channels, 1, **norm) if has_final else None
        init_weights(self)

    def _runner(self) -> LayerRunner:
        """How each layer runs in the coming forward (plain layers by default)."""
        return run_plain

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        run = self._runner()
        feats: OrderedDict[str, torch.Tensor] = OrderedDict()
        x = self.stem(x)
        for i, (stage, infos) in enumerate(zip(self.stages, self._stage_infos)):
            for j, (layer, info) in enumerate(zip(stage, infos)):
                tap = self._expand_taps.get(i) if j == 0 else None
                x, hidden = run(info, layer, x, tap is not None)
                if tap is not None:
                    feats[tap] = hidden
            if i in self._stage_taps:
                feats[self._stage_taps[i]] = x
        if self._final_tap is not None:
            feats[self._final_tap] = self.final(x) if self.final is not None else x
        return OrderedDict((t, feats[t]) for t in self.out_channels)


class Backbone(TapBackbone):
    """Backbone built from an :class:`Arch` (MBConv or ResNet); ``forward`` returns the requested taps."""

    def __init__(self, arch: Arch, taps: Sequence[str] = ("final",), output_stride: int | None = None) -> None:
        super().__init__(arch, taps, output_stride, [[(o,) for o in s.ops if o != SKIP] for s in arch.stages],
                         plain_layer)
        self.arch = arch


class Classifier(nn.Module):
    """ImageNet-style classifier: backbone → global average pool → [pre-logits linear → activation, when
    the backbone's architecture has ``head_channels`` (MobileNetV3)] → dropout → linear."""

    cost_parts = {"backbone": "backbone", "pre-logits": "pre_logits", "head": "classifier"}

    def __init__(self, backbone: nn.Module, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        self.backbone = backbone
        width = backbone.out_channels["final"]
        self.pre_logits = (nn.Sequential(nn.Linear(width, backbone.head_channels),
                                         make_activation(backbone.activation))
                           if backbone.head_channels else None)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(backbone.head_channels or width, num_classes)
        init_weights(self.classifier)
        if self.pre_logits is not None:
            init_weights(self.pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.backbone(x)["final"]
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        if self.pre_logits is not None:
            x = self.pre_logits(x)
        return self.classifier(self.dropout(x))


def stride_taps(arch: Arch, strides: Sequence[int]) -> tuple[str, ...]:
    """The output tap of the last stage at each cumulative stride (e.g. 8, 16, 32 for an FPN)."""
    at = {}
    for i, s in enumerate(arch.stage_strides()):
        at[s] = Tap("stage", i).name
    missing = [s for s in strides if s not in at]
    if missing:
        raise ArchError(f"the architecture has no stage at stride(s) {missing}; it reaches {sorted(at)}")
    return tuple(at[s] for s in strides)


def ssdlite_taps(arch: Arch) -> tuple[str, str]:
    """SSDLite taps: inside the first layer that reaches stride 32 (its expand output), and the final conv.

    A ResNet's first stride-32 layer has no expand conv: it taps the output of the last stride-16 stage
    (C4) and ``final``, the last stage's output (C5) — ours.
    """
    for i, s in enumerate(arch.stage_strides()):
        if s == 32 and arch.stages[i].stride == 2:
            if not isinstance(parse_op(arch.stages[i].ops[0]), Op):
                return stride_taps(arch, (16,))[0], Tap("final", len(arch.stages) - 1).name
            return Tap("expand", i).name, Tap("final", len(arch.stages) - 1).name
    raise ArchError("SSDLite needs a stage that downsamples to stride 32")

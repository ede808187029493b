"""Read the :class:`~fna.arch.Arch` of an MBConv-family classifier from its module tree.

Any library's model qualifies when its conv / BN / linear layers and activations, in registration
order, read::

    stem conv KxK → BN → act,
    blocks: [1x1 expand → BN → act] → depthwise KxK → BN → act → [SE] → 1x1 project → BN,
    [final 1x1 conv → BN → act], [pre-logits linear or 1x1 conv with bias → act], linear classifier,

where SE (squeeze-excitation) is two 1x1 convs with bias, hidden → R → hidden, with an activation and a
gate (sigmoid or hard-sigmoid) between and after them in either order (timm's and torchvision's). Body
convs are bias-free with symmetric padding; activations are ReLU, ReLU6, hard-swish or SiLU, each
block keeping its own; one BN eps; the SE widths follow one :class:`~fna.arch.SqueezeExcite` rule.
Blocks are grouped into stages the way :class:`~fna.arch.Stage` defines them: a block that changes
channels or stride starts a stage. The reading is checked numerically afterwards (see
``seed_from_model``), so residual and activation placement that differ from ours fail loudly instead
of converting silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from fna.arch import Arch, ArchError, Op, SqueezeExcite, Stage
from fna.errors import FnaError

EXPECTED = ("an MBConv network: stem conv → BN, inverted-residual blocks ([1x1 expand → BN] → depthwise → BN → "
            "[squeeze-excite] → 1x1 project → BN), optional final 1x1 conv → BN, optional pre-logits layer, linear "
            "classifier; bias-free convs, ReLU / ReLU6 / hard-swish / SiLU")
_ACTIVATIONS = {nn.ReLU6: "relu6", nn.ReLU: "relu", nn.Hardswish: "hswish", nn.SiLU: "silu",
                nn.Sigmoid: "sigmoid", nn.Hardsigmoid: "hardsigmoid"}
_PASSIVE = ("Identity", "Dropout", "AdaptiveAvgPool2d", "Flatten", "StochasticDepth", "DropPath")
# SE width rules tried in order: MobileNetV3's (expanded width, divisible by 8), EfficientNet's (input / 4)
_SE_RULES = ((False, 8), (True, 1), (False, 1), (True, 8))


class UnsupportedSeedError(FnaError, ValueError):
    """A model whose structure is not an MBConv network we can represent."""


@dataclass
class _Unit:
    """A conv or linear layer with the BN right after it and the activations up to the next layer."""

    name: str
    module: nn.Module
    bn: nn.BatchNorm2d | None = None
    acts: list[str] = field(default_factory=list)

    @property
    def conv(self) -> bool:
        return isinstance(self.module, nn.Conv2d)

    @property
    def c_in(self) -> int:
        return self.module.in_channels if self.conv else self.module.in_features

    @property
    def c_out(self) -> int:
        return self.module.out_channels if self.conv else self.module.out_features

    @property
    def kernel(self) -> int:
        return self.module.kernel_size[0] if self.conv else 1

    @property
    def stride(self) -> int:
        return self.module.stride[0] if self.conv else 1

    @property
    def groups(self) -> int:
        return self.module.groups if self.conv else 1

    @property
    def depthwise(self) -> bool:
        return self.groups == self.c_in == self.c_out and self.groups > 1

    @property
    def pointwise(self) -> bool:
        return self.kernel == 1 and self.groups == 1 and self.stride == 1

    @property
    def body(self) -> bool:
        """A bias-free conv followed by BN (stem, block or final conv)."""
        return self.conv and self.bn is not None and self.module.bias is None

    @property
    def fc(self) -> bool:
        """A fully connected layer: linear, or a 1x1 conv with bias and no BN (SE, pre-logits)."""
        return not self.conv or (self.pointwise and self.bn is None and self.module.bias is not None)

    @property
    def act(self) -> str | None:
        return self.acts[0] if len(self.acts) == 1 else None


def _unsupported(what: str, model_name: str) -> UnsupportedSeedError:
    return UnsupportedSeedError(f"{model_name}: {what}; expected {EXPECTED}")


def _read_units(model: nn.Module, model_name: str) -> list[_Unit]:
    """Conv / linear layers in registration order, each with its BN and activations."""
    units: list[_Unit] = []
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            if not units or units[-1].bn is not None or units[-1].acts or not units[-1].conv:
                raise _unsupported(f"BN {name} does not follow a conv", model_name)
            units[-1].bn = m
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            units.append(_Unit(name, m))
        elif type(m) in _ACTIVATIONS:
            if not units:
                raise _unsupported(f"activation {name} before any conv", model_name)
            units[-1].acts.append(_ACTIVATIONS[type(m)])
        elif not list(m.children()) and type(m).__name__ not in _PASSIVE:
            raise _unsupported(f"{name} is a {type(m).__name__}, which has no place in an MBConv network",
                               model_name)
    for u in units:
        if u.conv and not u.fc and not u.body:
            raise _unsupported(f"conv {u.name} " + ("has a bias" if u.module.bias is not None else
                                                     "is not followed by a BN"), model_name)
        if u.body:
            m = u.module
            kh, kw = m.kernel_size
            if kh != kw or kh % 2 == 0 or m.stride[0] != m.stride[1] or m.dilation != (1, 1) \
                    or m.padding != ((kh - 1) // 2,) * 2 or getattr(m, "padding_mode", "zeros") != "zeros":
                raise _unsupported(f"conv {u.name} ({type(m).__name__}, kernel {m.kernel_size}, stride {m.stride}, "
                                   f"padding {m.padding}, dilation {m.dilation}) is not a square odd-kernel conv "
                                   "with symmetric padding", model_name)
    return units


def _se_rule(found: list[tuple[int, int, int, tuple[str, ...]]], model_name: str) -> SqueezeExcite | None:
    """The :class:`SqueezeExcite` that gives every SE block's ``(c_in, hidden, R, (act, gate))``."""
    if not found:
        return None
    acts = {a for *_, a in found}
    if len(acts) != 1 or len(next(iter(acts))) != 2 or next(iter(acts))[1] not in ("sigmoid", "hardsigmoid"):
        raise _unsupported(f"squeeze-excite activations {sorted(acts)}, not one (activation, sigmoid or "
                           "hard-sigmoid gate) pair", model_name)
    activation, gate = acts.pop()
    for from_input, divisor in _SE_RULES:
        rule = SqueezeExcite(from_input, divisor, activation, gate)
        if all(rule.reduced(c_in, hidden) == r for c_in, hidden, r, _ in found):
            return rule
    raise _unsupported("squeeze-excite widths follow neither a quarter of the expanded width (divisible by 8) "
                       "nor a quarter of the block input", model_name)


def discover_arch(model: nn.Module, name: str) -> Arch:
    """The :class:`Arch` of ``model`` read from its conv / BN / linear layers (see the module doc).

    Raises :class:`UnsupportedSeedError` saying what was found and what structure was expected.
    """
    units = _read_units(model, name)
    linears = [u.name for u in units if not u.conv]
    if not linears or units[-1].conv or len(linears) > 2:
        raise _unsupported(f"found {len(linears)} linear layers ({', '.join(linears[:3]) or 'none'}), "
                           "not one final classifier (with at most one pre-logits layer)", name)
    head = units[-2] if len(units) > 1 and units[-2].fc else None
    body = units[:-2] if head is not None else units[:-1]
    eps = {u.bn.eps for u in body if u.bn is not None}
    if len(eps) != 1:
        raise _unsupported(f"BN layers use different eps values {sorted(eps)}", name)
    if not body or not body[0].body or body[0].groups != 1 or body[0].act is None:
        raise _unsupported("no stem conv → BN → activation", name)
    stem, activation = body[0], body[0].act
    blocks: list[tuple[int, int, int, Op]] = []  # (c_in, c_out, stride, op)
    se_found: list[tuple[int, int, int, tuple[str, ...]]] = []
    final, c, k = 0, stem.c_out, 1
    while k < len(body):
        unit = body[k]
        expand = None
        if unit.pointwise and unit.body and k + 1 < len(body) and body[k + 1].depthwise \
                and body[k + 1].c_in == unit.c_out:
            expand, k = unit, k + 1
        if expand is None and unit.pointwise and k == len(body) - 1:
            if unit.act != activation:
                raise _unsupported(f"final conv {unit.name} has activations {unit.acts}, the stem {activation}", name)
            final, c = unit.c_out, unit.c_out
            break
        dw = body[k]
        se = body[k + 1:k + 3] if k + 2 < len(body) and body[k + 1].fc and body[k + 2].fc else []
        if se and not (se[0].c_in == dw.c_out == se[1].c_out and se[0].c_out == se[1].c_in):
            raise _unsupported(f"squeeze-excite {se[0].name} does not map {dw.c_out} channels back to themselves",
                               name)
        k += 1 + len(se)
        if not dw.depthwise or k >= len(body) or not body[k].pointwise or not body[k].body:
            raise _unsupported(f"conv {unit.name} does not start an MBConv block (1x1 expand → depthwise → "
                               "1x1 project) nor is it the final 1x1 conv", name)
        project = body[k]
        c_in = expand.c_in if expand else dw.c_in
        if c_in != c or project.c_in != dw.c_out:
            raise _unsupported(f"block at {dw.name}: channels {c_in}→{dw.c_in}→{project.c_out} do not chain "
                               f"from {c}", name)
        act = dw.act
        if act is None or (expand is not None and expand.acts != [act]) or project.acts:
            raise _unsupported(f"block at {dw.name}: not one activation after its expand and depthwise convs "
                               "and none after its project conv", name)
        expansion = _expansion(c_in, dw.c_in)
        if expansion is None or (expand is None) != (dw.c_in == c_in):
            raise _unsupported(f"block at {dw.name}: expanded width {dw.c_in} is no decimal multiple of "
                               f"its input {c_in}", name)
        if se:
            se_found.append((c_in, dw.c_out, se[0].c_out, tuple(se[0].acts + se[1].acts)))
        blocks.append((c_in, project.c_out, dw.stride,
                       Op(dw.kernel, expansion, bool(se), None if act == activation else act)))
        c, k = project.c_out, k + 1
    if not blocks:
        raise _unsupported("no MBConv blocks found", name)
    if head is not None and head.acts != [activation]:
        raise _unsupported(f"pre-logits layer {head.name} has activations {head.acts}, not the stem's "
                           f"{activation}", name)
    stages: list[list] = []
    for c_in, c_out, stride, op in blocks:
        if c_in != c_out or stride != 1 or not stages:
            stages.append([c_in, c_out, stride, []])
        stages[-1][3].append(op.name)
    try:
        return Arch(stages=tuple(Stage(a, b, s, tuple(ops)) for a, b, s, ops in stages), stem_channels=stem.c_out,
                    stem_stride=stem.stride, final_channels=final, activation=activation, bn_eps=eps.pop(),
                    in_channels=stem.c_in, se=_se_rule(se_found, name), head_channels=head.c_out if head else 0,
                    name=name)
    except ArchError as e:
        raise _unsupported(str(e), name) from None


def _expansion(c_in: int, hidden: int) -> int | float | None:
    """The shortest decimal E (at most 3 places) with ``Op(.., E).hidden(c_in) == hidden``."""
    for places in range(4):
        e = round(hidden / c_in, places)
        e = int(e) if float(e).is_integer() else e
        if e >= 1 and Op(1, e).hidden(c_in) == hidden:
            return e
    return None

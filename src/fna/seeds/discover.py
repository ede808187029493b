"""Read the :class:`~fna.arch.Arch` of an MBConv-family classifier from its module tree.

Any library's model qualifies when its conv / BN / linear layers, in registration order, read::

    stem conv KxK → BN,
    blocks: [1x1 expand → BN] → depthwise KxK → BN → 1x1 project → BN,
    [final 1x1 conv → BN], linear classifier,

with bias-free convs, symmetric padding, one activation type (ReLU or ReLU6) and one BN eps. Blocks
are grouped into stages the way :class:`~fna.arch.Stage` defines them: a block that changes channels
or stride starts a stage. The reading is checked numerically afterwards (see ``seed_from_model``), so
residual and activation placement that differ from ours fail loudly instead of converting silently.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fna.arch import Arch, Op, Stage
from fna.errors import FnaError

EXPECTED = ("an MBConv network: stem conv → BN, inverted-residual blocks ([1x1 expand → BN] → depthwise → BN → "
            "1x1 project → BN, no squeeze-excite), optional final 1x1 conv → BN, linear classifier; "
            "bias-free convs, ReLU or ReLU6")
_ACTIVATIONS = {nn.ReLU6: "relu6", nn.ReLU: "relu"}


class UnsupportedSeedError(FnaError, ValueError):
    """A model whose structure is not an MBConv network we can represent."""


@dataclass(frozen=True)
class _Conv:
    name: str
    c_in: int
    c_out: int
    kernel: int
    stride: int
    groups: int

    @property
    def depthwise(self) -> bool:
        return self.groups == self.c_in == self.c_out and self.groups > 1

    @property
    def pointwise(self) -> bool:
        return self.kernel == 1 and self.groups == 1 and self.stride == 1


def _unsupported(what: str, model_name: str) -> UnsupportedSeedError:
    return UnsupportedSeedError(f"{model_name}: {what}; expected {EXPECTED}")


def _read_convs(model: nn.Module, model_name: str) -> tuple[list[_Conv], set[float], str]:
    """Conv layers in order (each checked to be followed by a BN), the BN eps values and the activation."""
    layers = [(n, m) for n, m in model.named_modules()
              if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)) or
              (not list(m.children()) and any(True for _ in m.parameters(recurse=False)))]
    convs, eps = [], set()
    linears = [n for n, m in layers if isinstance(m, nn.Linear)]
    if len(linears) != 1 or layers[-1][0] != linears[0]:
        raise _unsupported(f"found {len(linears)} linear layers ({', '.join(linears[:3]) or 'none'}), "
                           "not one final classifier", model_name)
    body = layers[:-1]
    for k, (name, m) in enumerate(body):
        if isinstance(m, nn.BatchNorm2d):
            if k == 0 or not isinstance(body[k - 1][1], nn.Conv2d):
                raise _unsupported(f"BN {name} does not follow a conv", model_name)
            eps.add(m.eps)
            continue
        if not isinstance(m, nn.Conv2d):
            raise _unsupported(f"layer {name} is a {type(m).__name__}", model_name)
        if m.bias is not None:
            raise _unsupported(f"conv {name} has a bias (a squeeze-excite or plain conv layer?)", model_name)
        if k + 1 >= len(body) or not isinstance(body[k + 1][1], nn.BatchNorm2d):
            raise _unsupported(f"conv {name} is not followed by a BN", model_name)
        kh, kw = m.kernel_size
        if kh != kw or kh % 2 == 0 or m.stride[0] != m.stride[1] or m.dilation != (1, 1) \
                or m.padding != ((kh - 1) // 2,) * 2 or getattr(m, "padding_mode", "zeros") != "zeros":
            raise _unsupported(f"conv {name} ({type(m).__name__}, kernel {m.kernel_size}, stride {m.stride}, "
                               f"padding {m.padding}, dilation {m.dilation}) is not a square odd-kernel conv "
                               "with symmetric padding", model_name)
        convs.append(_Conv(name, m.in_channels, m.out_channels, kh, m.stride[0], m.groups))
    acts = {type(m) for m in model.modules() if type(m).__module__ == nn.ReLU.__module__}
    if len(acts) != 1 or next(iter(acts)) not in _ACTIVATIONS:
        raise _unsupported(f"activations {sorted(a.__name__ for a in acts)}, not exactly one of ReLU / ReLU6",
                           model_name)
    return convs, eps, _ACTIVATIONS[next(iter(acts))]


def discover_arch(model: nn.Module, name: str) -> Arch:
    """The :class:`Arch` of ``model`` read from its conv / BN / linear layers (see the module doc).

    Raises :class:`UnsupportedSeedError` saying what was found and what structure was expected.
    """
    convs, eps, activation = _read_convs(model, name)
    if len(eps) != 1:
        raise _unsupported(f"BN layers use different eps values {sorted(eps)}", name)
    if not convs or convs[0].groups != 1:
        raise _unsupported("no stem conv", name)
    stem = convs[0]
    blocks: list[tuple[int, int, int, Op]] = []  # (c_in, c_out, stride, op)
    final, c, k = 0, stem.c_out, 1
    while k < len(convs):
        conv = convs[k]
        if conv.pointwise and k + 1 < len(convs) and convs[k + 1].depthwise and convs[k + 1].c_in == conv.c_out:
            expand, k = conv, k + 1
        else:
            expand = None
        dw = convs[k]
        if expand is None and conv.pointwise and k == len(convs) - 1:
            final, c = conv.c_out, conv.c_out
            break
        if not dw.depthwise or k + 1 >= len(convs) or not convs[k + 1].pointwise:
            raise _unsupported(f"conv {conv.name} does not start an MBConv block (1x1 expand → depthwise → "
                               "1x1 project) nor is it the final 1x1 conv", name)
        project = convs[k + 1]
        c_in = expand.c_in if expand else dw.c_in
        if c_in != c or project.c_in != dw.c_out or dw.c_in % c_in:
            raise _unsupported(f"block at {dw.name}: channels {c_in}→{dw.c_in}→{project.c_out} do not chain "
                               f"from {c} with an integer expansion", name)
        blocks.append((c_in, project.c_out, dw.stride, Op(dw.kernel, dw.c_in // c_in)))
        c, k = project.c_out, k + 2
    if not blocks:
        raise _unsupported("no MBConv blocks found", name)
    stages: list[list] = []
    for c_in, c_out, stride, op in blocks:
        if c_in != c_out or stride != 1 or not stages:
            stages.append([c_in, c_out, stride, []])
        stages[-1][3].append(op.name)
    return Arch(stages=tuple(Stage(a, b, s, tuple(ops)) for a, b, s, ops in stages), stem_channels=stem.c_out,
                stem_stride=stem.stride, final_channels=final, activation=activation, bn_eps=eps.pop(),
                in_channels=stem.c_in, name=name)

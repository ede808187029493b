"""Search space and super network (SPEC §2): mixed MBConv layers over the seed's searched stages.

A :class:`SearchSpace` says, per searched stage (``arch.stages[1:]`` of the seed), how many layers it
has and which ops each layer chooses from. :class:`SuperBackbone` builds it: the stem, the fixed first
block and the final 1x1 conv are ordinary layers (affine BN, running statistics); every searched
layer is a :class:`MixedLayer` of MBConv candidates whose BN has no affine parameters and no running
statistics, plus ``skip`` where allowed. It has :class:`~fna.backbone.Backbone`'s interface (``taps``,
``out_channels``, ``forward`` → ordered dict of taps) so every task head takes it unchanged.

Forward modes are state of the network, not wrappers swapped in per step:

* ``set_path(path)`` — one candidate per layer (single path; the rest do not run, so their
  gradients stay ``None``); :meth:`SuperBackbone.sample_path` draws a path uniformly or from the
  architecture distribution;
* ``set_path(None)`` — every candidate runs, outputs weighted by ``softmax(α / temperature)``.

A path is a list per searched stage of candidate indices per layer (JSON-friendly).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from fna.arch import SKIP, Arch, ArchError, Op, parse_op
from fna.backbone import _TAP_RE, Backbone, init_weights, parse_taps, stage_dilations, tap_channels
from fna.errors import FnaError
from fna.ops import ConvBNAct, MBConv
from fna.remap import depth_source, remap_conv_bn, remap_layer

SinglePath = list[list[int]]  # per searched stage, per layer: index into that layer's candidates


class SearchSpaceError(FnaError, ValueError):
    """A search space is malformed or does not fit the seed / the task's taps."""


@dataclass(frozen=True)
class StageSpace:
    """One searched stage: its number of layers and the ops its layers choose from."""

    max_depth: int
    kernels: tuple[int, ...] = (3, 5, 7)
    expansions: tuple[int, ...] = (3, 6)
    allow_skip: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "kernels", tuple(int(k) for k in self.kernels))
        object.__setattr__(self, "expansions", tuple(int(e) for e in self.expansions))
        if self.max_depth < 1:
            raise SearchSpaceError(f"max_depth must be >= 1, got {self.max_depth}")
        if not self.kernels or any(k < 1 or k % 2 == 0 for k in self.kernels):
            raise SearchSpaceError(f"kernels must be odd and >= 1, got {list(self.kernels)}")
        if not self.expansions or any(e < 1 for e in self.expansions):
            raise SearchSpaceError(f"expansions must be >= 1, got {list(self.expansions)}")

    def ops(self, expansions: Sequence[int] | None = None) -> tuple[str, ...]:
        """MBConv op names, kernel-major (``k3_e3, k3_e6, k5_e3, ...``)."""
        return tuple(Op(k, e).name for k in self.kernels for e in (expansions or self.expansions))


@dataclass(frozen=True)
class SearchSpace:
    """Per searched stage (every stage of the seed but the first) a :class:`StageSpace`."""

    stages: tuple[StageSpace, ...]
    name: str = "custom"

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        if not self.stages:
            raise SearchSpaceError("a search space needs at least one searched stage")

    @classmethod
    def preset(cls, name: str) -> SearchSpace:
        """The paper's spaces: ``detection`` (L_max 4,4,4,4,4,1) and ``segmentation`` (4,4,6,6,4,1)."""
        if name not in PRESETS:
            raise SearchSpaceError(f"unknown search space {name!r}: expected one of {', '.join(PRESETS)}")
        return cls(tuple(StageSpace(d) for d in PRESETS[name]), name)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchSpace:
        try:
            stages = tuple(StageSpace(int(s["max_depth"]), tuple(s.get("kernels", (3, 5, 7))),
                                      tuple(s.get("expansions", (3, 6))), bool(s.get("allow_skip", True)))
                           for s in d["stages"])
        except (KeyError, TypeError, ValueError) as e:
            raise SearchSpaceError(f"malformed search space ({type(e).__name__}: {e}); each stage needs "
                                   "max_depth and may give kernels, expansions, allow_skip") from None
        return cls(stages, str(d.get("name", "custom")))

    @classmethod
    def get(cls, spec: str | dict[str, Any] | SearchSpace) -> SearchSpace:
        """A preset by name, a space from its dict, or ``spec`` itself."""
        if isinstance(spec, SearchSpace):
            return spec
        return cls.preset(spec) if isinstance(spec, str) else cls.from_dict(spec)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "stages": [{**asdict(s), "kernels": list(s.kernels),
                                               "expansions": list(s.expansions)} for s in self.stages]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def candidates(self, seed: Arch, taps: Sequence[str] = ()) -> list[list[tuple[str, ...]]]:
        """Candidate op names per searched stage and layer for ``seed``'s stages and ``taps``.

        First layers have no skip. A layer whose expand output is tapped (``expand{i}``, SSDLite) only
        gets the stage's largest expansion, so the tap has one width whatever the choice.
        """
        if len(seed.stages) - 1 != len(self.stages):
            raise SearchSpaceError(f"search space {self.name!r} has {len(self.stages)} searched stages, seed "
                                   f"{seed.name or 'arch'} has {len(seed.stages) - 1} (all stages but the first)")
        out = []
        for i, space in enumerate(self.stages, start=1):
            layers = []
            for j in range(space.max_depth):
                if j == 0 and f"expand{i}" in taps:
                    widest = max(space.expansions)
                    if widest == 1:
                        raise SearchSpaceError(f"tap 'expand{i}' needs an expand conv, but stage {i} only "
                                               "allows expansion 1")
                    layers.append(space.ops([widest]))
                else:
                    layers.append(space.ops() + ((SKIP,) if j > 0 and space.allow_skip else ()))
            out.append(layers)
        return out


PRESETS: dict[str, tuple[int, ...]] = {"detection": (4, 4, 4, 4, 4, 1), "segmentation": (4, 4, 6, 6, 4, 1)}


class MixedLayer(nn.Module):
    """One searched layer: MBConv candidates (BN without affine/running stats) and optionally ``skip``.

    ``candidates`` lists op names; ``skip`` (if present) is last and is not a module.
    """

    def __init__(self, c_in: int, c_out: int, candidates: Sequence[str], stride: int, dilation: int,
                 activation: str, bn_eps: float) -> None:
        super().__init__()
        self.candidates = tuple(candidates)
        self.has_skip = SKIP in self.candidates
        if self.has_skip and (self.candidates[-1] != SKIP or c_in != c_out or stride != 1):
            raise SearchSpaceError("skip must be the last candidate and only where the layer keeps its shape")
        self.ops = nn.ModuleList(MBConv(c_in, c_out, parse_op(name), stride, dilation, activation,
                                        bn_affine=False, bn_eps=bn_eps)
                                 for name in self.candidates if name != SKIP)

    def forward(self, x: torch.Tensor, choice: int | None, weights: torch.Tensor | None,
                want_hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``choice``: run one candidate; else the ``weights``-weighted sum of all of them.

        Returns the output and, when ``want_hidden``, the (weighted) expand output of the candidates.
        """
        if choice is not None:
            if choice == len(self.ops):  # skip
                return x, None
            return self.ops[choice].forward_with_hidden(x) if want_hidden else (self.ops[choice](x), None)
        out = weights[-1] * x if self.has_skip else 0
        hidden = 0
        for w, op in zip(weights, self.ops):
            if want_hidden:
                o, h = op.forward_with_hidden(x)
                hidden = hidden + w * h
            else:
                o = op(x)
            out = out + w * o
        return out, (hidden if want_hidden else None)


class SuperBackbone(nn.Module):
    """Super network over ``seed``'s searched stages; a :class:`~fna.backbone.Backbone` look-alike.

    Modules: ``stem``, ``stages[0]`` (the fixed first block, ``nn.Sequential`` of MBConv),
    ``stages[i]`` for ``i >= 1`` (``nn.ModuleList`` of :class:`MixedLayer`), ``final`` (only when
    tapped), and ``alpha`` (architecture parameters ``s{i}_first`` [1, C] and ``s{i}_rest`` [L-1, C+1]).
    """

    def __init__(self, seed_arch: Arch, space: SearchSpace, taps: Sequence[str] = ("final",),
                 output_stride: int | None = None, temperature: float = 1.0, alpha_std: float = 1e-3) -> None:
        super().__init__()
        self.seed_arch = seed_arch
        self.space = space
        self.taps = tuple(taps)
        self.temperature = float(temperature)
        self.candidates = space.candidates(seed_arch, self.taps)
        self.arch = self._reference_arch()
        try:
            parse_taps(self.arch, self.taps)
        except ArchError as e:
            raise SearchSpaceError(str(e)) from None
        if not any(t == "final" or int(_TAP_RE.match(t).group(2)) == len(seed_arch.stages) - 1  # type: ignore
                   for t in self.taps):
            raise SearchSpaceError(f"taps {list(self.taps)} do not reach the last stage: the stages after the "
                                   "last tap would be searched without ever being trained")
        self.out_channels = OrderedDict((t, tap_channels(self.arch, t)) for t in self.taps)
        a = seed_arch
        norm = dict(activation=a.activation, bn_eps=a.bn_eps)
        strides = stage_dilations(a, output_stride)
        self.stem = ConvBNAct(a.in_channels, a.stem_channels, 3, a.stem_stride, **norm)
        first, (stride, dilation) = a.stages[0], strides[0]
        fixed, c_in = [], first.c_in
        for j, name in enumerate(o for o in first.ops if o != SKIP):
            fixed.append(MBConv(c_in, first.c_out, parse_op(name), stride if j == 0 else 1, dilation, **norm))
            c_in = first.c_out
        stages: list[nn.Module] = [nn.Sequential(*fixed)]
        for stage, (stride, dilation), layers in zip(a.stages[1:], strides[1:], self.candidates):
            stages.append(nn.ModuleList(
                MixedLayer(c_in if j == 0 else stage.c_out, stage.c_out, names, stride if j == 0 else 1,
                           dilation, **norm)
                for j, names in enumerate(layers)))
            c_in = stage.c_out
        self.stages = nn.ModuleList(stages)
        self.final = ConvBNAct(a.stages[-1].c_out, a.final_channels, 1, **norm) if "final" in self.taps else None
        init_weights(self)
        self.alpha = nn.ParameterDict()
        for i, layers in enumerate(self.candidates, start=1):
            self.alpha[f"s{i}_first"] = nn.Parameter(alpha_std * torch.randn(1, len(layers[0])))
            if len(layers) > 1:
                self.alpha[f"s{i}_rest"] = nn.Parameter(alpha_std * torch.randn(len(layers) - 1, len(layers[1])))
        self.path: SinglePath | None = None

    def _reference_arch(self) -> Arch:
        """The seed with each searched layer set to its widest candidate (for tap checks and widths)."""
        ops = [[max((o for o in names if o != SKIP), key=lambda n: parse_op(n).expansion) for names in layers]
               for layers in self.candidates]
        return self.seed_arch.with_ops(ops)

    # -- construction from a seed ---------------------------------------------------------------
    @classmethod
    def from_seed(cls, seed: Any, space: SearchSpace, taps: Sequence[str] = ("final",),
                  output_stride: int | None = None, temperature: float = 1.0) -> SuperBackbone:
        """A super network with weights remapped from ``seed`` (a :class:`~fna.seeds.Seed`).

        Stem, first block and final conv take the seed's layers; every candidate of searched layer
        ``l`` of a stage takes the same seed layer ``depth_source(l, n)`` (SPEC §3).
        """
        net = cls(seed.arch, space, taps, output_stride, temperature)
        src = Backbone(seed.arch, taps=("final",))
        src.load_state_dict(seed.backbone_state_dict())
        remap_conv_bn(src.stem, net.stem, "stem")
        for s, d in zip(src.stages[0], net.stages[0]):
            remap_layer(s, d)
        for i in range(1, len(net.stages)):
            if len(src.stages[i]) == 0:
                raise SearchSpaceError(f"seed stage {i} has no layers to remap the super network from")
            for j, mixed in enumerate(net.stages[i]):
                source = src.stages[i][depth_source(j, len(src.stages[i]))]
                for op in mixed.ops:
                    remap_layer(source, op)
        if net.final is not None:
            remap_conv_bn(src.final, net.final, "final")
        return net

    # -- parameters -----------------------------------------------------------------------------
    def arch_parameters(self) -> list[nn.Parameter]:
        """The architecture parameters α (one tensor per stage part)."""
        return list(self.alpha.values())

    def weights(self) -> list[nn.Parameter]:
        """Every parameter but α."""
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def layer_logits(self) -> list[list[torch.Tensor]]:
        """α per searched stage and layer (views, so gradients flow)."""
        out = []
        for i, layers in enumerate(self.candidates, start=1):
            rows = [self.alpha[f"s{i}_first"][0]]
            if len(layers) > 1:
                rows += list(self.alpha[f"s{i}_rest"].unbind(0))
            out.append(rows)
        return out

    def layer_probs(self) -> list[list[torch.Tensor]]:
        """``softmax(α / temperature)`` per searched stage and layer."""
        return [[torch.softmax(a / self.temperature, dim=0) for a in stage] for stage in self.layer_logits()]

    # -- forward modes --------------------------------------------------------------------------
    def set_path(self, path: SinglePath | None) -> None:
        """Run only ``path`` from now on (single path), or every candidate weighted (``None``)."""
        if path is not None:
            if [len(p) for p in path] != [len(c) for c in self.candidates] or any(
                    not 0 <= k < len(names) for p, c in zip(path, self.candidates) for k, names in zip(p, c)):
                raise SearchSpaceError(f"path {path} does not fit the search space")
        self.path = path

    def sample_path(self, generator: torch.Generator | None = None, uniform: bool = False) -> SinglePath:
        """One candidate per layer, uniformly or from ``softmax(α / temperature)`` (not set; see ``set_path``)."""
        path = []
        with torch.no_grad():
            for probs in self.layer_probs():
                p = [torch.ones(len(q)) if uniform else q.detach().float().cpu() for q in probs]
                path.append([int(torch.multinomial(q, 1, generator=generator)) for q in p])
        return path

    def path_arch(self, path: SinglePath) -> Arch:
        """The seed architecture with ``path``'s ops, skips moved to each stage's end (SPEC §4)."""
        ops = [[names[k] for k, names in zip(p, layers)] for p, layers in zip(path, self.candidates)]
        return self.seed_arch.with_ops(ops).canonical()

    def argmax_path(self) -> SinglePath:
        """The most likely candidate of every layer."""
        return [[int(a.argmax()) for a in stage] for stage in self.layer_logits()]

    def derive(self) -> Arch:
        """Argmax per layer, skips sorted to the stage end."""
        return self.path_arch(self.argmax_path())

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats: OrderedDict[str, torch.Tensor] = OrderedDict()
        x = self.stem(x)
        for j, layer in enumerate(self.stages[0]):
            if j == 0 and "expand0" in self.taps:
                x, feats["expand0"] = layer.forward_with_hidden(x)
            else:
                x = layer(x)
        if "stage0" in self.taps:
            feats["stage0"] = x
        probs = self.layer_probs() if self.path is None else None
        for i in range(1, len(self.stages)):
            for j, mixed in enumerate(self.stages[i]):
                want = j == 0 and f"expand{i}" in self.taps
                choice = self.path[i - 1][j] if self.path is not None else None
                x, hidden = mixed(x, choice, probs[i - 1][j] if probs is not None else None, want)
                if want:
                    feats[f"expand{i}"] = hidden
            if f"stage{i}" in self.taps:
                feats[f"stage{i}"] = x
        if self.final is not None:
            feats["final"] = self.final(x)
        return OrderedDict((t, feats[t]) for t in self.taps)

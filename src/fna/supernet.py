"""Search space and super network (SPEC §2): mixed MBConv or ResNet layers over the seed's searched stages.

A :class:`SearchSpace` says, per searched stage (``arch.stages[1:]`` of the seed), how many layers it
has and which ops each layer chooses from. :class:`SuperBackbone` is built by the backbone builder
(:class:`~fna.backbone.TapBackbone`) with the :func:`mixed_layer` factory: the stem, the fixed first
block and the final 1x1 conv are ordinary layers (affine BN, running statistics); every searched
layer is a :class:`MixedLayer` of MBConv or ResNet-block candidates (the seed's family) whose BN has no
affine parameters and no running statistics, plus ``skip`` where allowed. It shares :class:`~fna.backbone.Backbone`'s interface,
recorded layer and tap info and forward, so every task head takes it unchanged.

Forward modes are state of the network, not wrappers swapped in per step:

* ``set_path(path)`` — one candidate per layer (single path; the rest do not run, so their
  gradients stay ``None``); :meth:`SuperBackbone.sample_path` draws a path uniformly or from the
  architecture distribution;
* ``set_path(None)`` — every candidate runs, outputs weighted by ``softmax(α / temperature)``.

A path is a list per searched stage of candidate indices per layer (JSON-friendly). The super network
owns the maps between paths, architectures and weights: :meth:`SuperBackbone.path_arch` and its
inverse :func:`arch_path` (which needs only the candidates, e.g. a cost table's),
:meth:`SuperBackbone.derived_state_dict` (a path's standalone backbone weights) and :func:`alpha_probs`
(per-layer probabilities from α, a module's or as stored in ``alpha_history.json``).

The ResNet space (ours; FNA++ searches kernel sizes and group numbers of ResNets without skip, but its
exact space is not published): per searched stage (layer2–layer4; layer1, at stride 4, stays the seed's
like MobileNetV2's first block) the seed's depth ``n`` plus one layer; every layer's KxK conv(s) choose
kernel 3, 5 or 7 and 1, 2 or 4 groups (9 candidates, widths fixed), and only the extra layer ``n`` has
``skip`` besides, so a stage keeps its seed depth or grows by one. Both presets (``detection``,
``segmentation``) give it for a ResNet seed. A space's ``blocks`` (``MBConv`` or ``ResNet``) is the family
it is bound to (:meth:`SearchSpace.bound`, which :meth:`SearchSpace.get` applies for a seed): ``groups``
are a ResNet setting and ``expansions`` an MBConv one, and a space setting the other family's is a
:class:`SearchSpaceError`; a ResNet space's JSON says ``"blocks": "ResNet"`` and has no ``expansions``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fna.arch import SKIP, AnyOp, Arch, ArchError, Op, ResOp, parse_op
from fna.backbone import (Backbone, LayerInfo, LayerRunner, TapBackbone, layer_module, make_layer, parse_tap,
                          plain_layer, run_plain)
from fna.errors import FnaError
from fna.remap import depth_source, remap_conv_bn, remap_layer

SinglePath = list[list[int]]  # per searched stage, per layer: index into that layer's candidates
BLOCKS = ("MBConv", "ResNet")  # the layer families a search space is for
EXPANSIONS = (3, 6)  # the paper's MBConv expansions, the default of a stage space


class SearchSpaceError(FnaError, ValueError):
    """A search space is malformed or does not fit the seed / the task's taps."""


@dataclass(frozen=True)
class StageSpace:
    """One searched stage: its number of layers and the ops its layers choose from.

    MBConv layers choose ``kernels`` × ``expansions``, ResNet layers ``kernels`` × ``groups``. Layers
    ``min_depth`` and later may also be ``skip`` (``allow_skip``); the first layer never is.
    """

    max_depth: int
    kernels: tuple[int, ...] = (3, 5, 7)
    expansions: tuple[int, ...] = EXPANSIONS
    allow_skip: bool = True
    groups: tuple[int, ...] = (1,)
    min_depth: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "kernels", tuple(int(k) for k in self.kernels))
        object.__setattr__(self, "expansions", tuple(int(e) for e in self.expansions))
        object.__setattr__(self, "groups", tuple(int(g) for g in self.groups))
        if not self.groups or any(g < 1 for g in self.groups):
            raise SearchSpaceError(f"groups must be >= 1, got {list(self.groups)}")
        if not 1 <= self.min_depth <= max(self.max_depth, 1):
            raise SearchSpaceError(f"min_depth must be between 1 and max_depth {self.max_depth}, got {self.min_depth}")
        if self.max_depth < 1:
            raise SearchSpaceError(f"max_depth must be >= 1, got {self.max_depth}")
        if not self.kernels or any(k < 1 or k % 2 == 0 for k in self.kernels):
            raise SearchSpaceError(f"kernels must be odd and >= 1, got {list(self.kernels)}")
        if not self.expansions or any(e < 1 for e in self.expansions):
            raise SearchSpaceError(f"expansions must be >= 1, got {list(self.expansions)}")

    def ops(self, expansions: Sequence[int] | None = None, like: AnyOp = Op(1, 1)) -> tuple[str, ...]:
        """MBConv op names, kernel-major (``k3_e3, k3_e6, k5_e3, ...``), with ``like``'s squeeze-excitation
        and activation (``k3_e3_se_relu, ...``); for a ResNet ``like`` its kind's blocks over kernels and
        groups (``bottle_k3_g1, bottle_k3_g2, ...``)."""
        if isinstance(like, ResOp):
            return tuple(like.like(k, g).name for k in self.kernels for g in self.groups)
        return tuple(like.like(k, e).name for k in self.kernels for e in (expansions or self.expansions))

    def skips_from(self) -> int:
        """The first layer that may be ``skip`` (``max_depth`` when none may)."""
        return max(1, self.min_depth) if self.allow_skip else self.max_depth


def seed_blocks(seed: Arch) -> str:
    """``ResNet`` when ``seed``'s searched stages hold ResNet blocks, else ``MBConv``: the family its
    search space is for."""
    return "ResNet" if any(isinstance(parse_op(o), ResOp) for s in seed.stages[1:] for o in s.ops) else "MBConv"


@dataclass(frozen=True)
class SearchSpace:
    """Per searched stage (every stage of the seed but the first) a :class:`StageSpace`, for ``blocks``
    (``MBConv`` or ``ResNet``) layers."""

    stages: tuple[StageSpace, ...]
    name: str = "custom"
    blocks: str = "MBConv"

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        if not self.stages:
            raise SearchSpaceError("a search space needs at least one searched stage")
        if self.blocks not in BLOCKS:
            raise SearchSpaceError(f"search space {self.name!r}: blocks {self.blocks!r}, expected one of {BLOCKS}")

    def check_fields(self, blocks: str) -> None:
        """:class:`SearchSpaceError` naming the first stage setting ``blocks`` layers do not have: ``groups``
        (other than ``[1]``) for MBConv, ``expansions`` (other than the default) for ResNet blocks."""
        for i, stage in enumerate(self.stages, start=1):
            if blocks == "MBConv" and stage.groups != (1,):
                raise SearchSpaceError(f"search space {self.name!r} stage {i}: groups {list(stage.groups)} is a "
                                       "ResNet setting; the seed's layers are MBConv (they choose kernels and "
                                       "expansions)")
            if blocks == "ResNet" and stage.expansions != EXPANSIONS:
                raise SearchSpaceError(f"search space {self.name!r} stage {i}: expansions {list(stage.expansions)} "
                                       "is an MBConv setting; the seed's layers are ResNet blocks (they choose "
                                       "kernels and groups)")

    def bound(self, seed: Arch) -> SearchSpace:
        """This space for ``seed``: ``blocks`` set to the seed's family (:class:`SearchSpaceError` for a setting
        of the other family)."""
        blocks = seed_blocks(seed)
        self.check_fields(blocks)
        return self if blocks == self.blocks else replace(self, blocks=blocks)

    @classmethod
    def preset(cls, name: str, seed: Arch | None = None) -> SearchSpace:
        """The paper's spaces: ``detection`` (L_max 4,4,4,4,4,1) and ``segmentation`` (4,4,6,6,4,1).

        For a ``seed`` whose number of searched stages is not the paper's six (MobileNetV3: five), both
        give every searched stage max(4, its seed depth) layers, a one-layer stage staying at one — the
        rule that turns MobileNetV2's depths into the detection space (ours; the paper has none). For a
        ResNet seed both give the ResNet space (see the module doc).
        """
        if name not in PRESETS:
            raise SearchSpaceError(f"unknown search space {name!r}: expected one of {', '.join(PRESETS)}")
        if seed is not None and seed_blocks(seed) == "ResNet":
            return cls(tuple(StageSpace(s.depth + 1, (3, 5, 7), groups=(1, 2, 4), min_depth=s.depth)
                             for s in seed.stages[1:]), "resnet", "ResNet")
        depths = PRESETS[name]
        if seed is not None and len(seed.stages) - 1 != len(depths):
            depths = tuple(1 if s.depth == 1 else max(4, s.depth) for s in seed.stages[1:])
        return cls(tuple(StageSpace(d) for d in depths), name)

    @classmethod
    def from_dict(cls, d: dict[str, Any], blocks: str | None = None) -> SearchSpace:
        """A space from its JSON data, for ``blocks`` layers (``None``: what the data says, else MBConv).

        A stage of a ResNet space that gives ``expansions`` is a :class:`SearchSpaceError` (see
        :meth:`check_fields`), as is data whose ``blocks`` is not ``blocks``.
        """
        name = str(d.get("name", "custom")) if isinstance(d, dict) else "custom"
        stated = d.get("blocks") if isinstance(d, dict) else None
        if blocks is not None and stated is not None and stated != blocks:
            raise SearchSpaceError(f"search space {name!r}: blocks {stated!r}, but the seed's layers are {blocks}")
        blocks = blocks or stated or "MBConv"
        stages = []
        try:
            for i, s in enumerate(d["stages"], start=1):
                if blocks == "ResNet" and "expansions" in s:
                    raise SearchSpaceError(f"search space {name!r} stage {i}: expansions is an MBConv setting; the "
                                           "seed's layers are ResNet blocks (they choose kernels and groups)")
                try:
                    stages.append(StageSpace(int(s["max_depth"]), tuple(s.get("kernels", (3, 5, 7))),
                                             tuple(s.get("expansions", EXPANSIONS)), bool(s.get("allow_skip", True)),
                                             tuple(s.get("groups", (1,))), int(s.get("min_depth", 1))))
                except SearchSpaceError as e:
                    raise SearchSpaceError(f"search space {name!r} stage {i}: {e}") from None
        except SearchSpaceError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise SearchSpaceError(f"malformed search space ({type(e).__name__}: {e}); each stage needs "
                                   "max_depth and may give kernels, expansions, allow_skip, groups, min_depth") \
                from None
        return cls(tuple(stages), name, blocks)

    @classmethod
    def get(cls, spec: str | dict[str, Any] | SearchSpace, seed: Arch | None = None) -> SearchSpace:
        """A preset by name (for ``seed``, see :meth:`preset`), a space from its dict, or ``spec`` itself;
        bound to ``seed`` when one is given (:meth:`bound`)."""
        if isinstance(spec, str):
            space = cls.preset(spec, seed)
        elif isinstance(spec, SearchSpace):
            space = spec
        else:
            space = cls.from_dict(spec, seed_blocks(seed) if seed is not None else None)
        return space.bound(seed) if seed is not None else space

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data; ``groups`` and ``min_depth`` only when set, so MBConv spaces read as they always
        did; a ResNet space says ``"blocks": "ResNet"`` and has no ``expansions``."""
        def stage(s: StageSpace) -> dict[str, Any]:
            d = {**asdict(s), "kernels": list(s.kernels), "expansions": list(s.expansions), "groups": list(s.groups)}
            for key, unset in (("groups", [1]), ("min_depth", 1)):
                if d[key] == unset:
                    del d[key]
            if self.blocks == "ResNet":
                del d["expansions"]
            return d
        return {"name": self.name, **({"blocks": self.blocks} if self.blocks != "MBConv" else {}),
                "stages": [stage(s) for s in self.stages]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def candidates(self, seed: Arch, taps: Sequence[str] = ()) -> list[list[tuple[str, ...]]]:
        """Candidate op names per searched stage and layer for ``seed``'s stages and ``taps``.

        First layers have no skip, nor layers below the stage's ``min_depth``. A layer whose expand output
        is tapped (``expand{i}``, SSDLite) only gets the stage's largest expansion, so the tap has one width
        whatever the choice. Every candidate has the squeeze-excitation and activation (a ResNet's: the
        block kind) of the seed layer it is remapped from (the depth rule).
        """
        if len(seed.stages) - 1 != len(self.stages):
            raise SearchSpaceError(f"search space {self.name!r} has {len(self.stages)} searched stages, seed "
                                   f"{seed.name or 'arch'} has {len(seed.stages) - 1} (all stages but the first)")
        self.check_fields(seed_blocks(seed))
        try:
            tapped = {t.stage for t in (parse_tap(name, len(seed.stages)) for name in taps) if t.kind == "expand"}
        except ArchError as e:
            raise SearchSpaceError(str(e)) from None
        out = []
        for i, space in enumerate(self.stages, start=1):
            layers = []
            seed_ops = [parse_op(o) for o in seed.stages[i].ops if o != SKIP]
            for j in range(space.max_depth):
                like = seed_ops[depth_source(j, len(seed_ops))] if seed_ops else Op(1, 1)
                if j == 0 and i in tapped:
                    widest = max(space.expansions)
                    if widest == 1:
                        raise SearchSpaceError(f"tap 'expand{i}' needs an expand conv, but stage {i} only "
                                               "allows expansion 1")
                    layers.append(space.ops([widest], like))
                else:
                    layers.append(space.ops(like=like) + ((SKIP,) if j >= space.skips_from() else ()))
                if isinstance(like, ResOp):
                    c_in, c_out = (seed.stages[i].c_in if j == 0 else seed.stages[i].c_out), seed.stages[i].c_out
                    bad = next(filter(None, (like.like(like.kernel, g).split_error(c_in, c_out)
                                             for g in space.groups)), None)
                    if bad:
                        raise SearchSpaceError(f"search space {self.name!r} stage {i} layer {j}: {bad} (groups "
                                               f"{list(space.groups)})")
            out.append(layers)
        return out


PRESETS: dict[str, tuple[int, ...]] = {"detection": (4, 4, 4, 4, 4, 1), "segmentation": (4, 4, 6, 6, 4, 1)}


class MixedLayer(nn.Module):
    """One searched layer: MBConv or ResNet-block candidates (BN without affine/running stats) and
    optionally ``skip``.

    ``info.ops`` lists the candidates' op names, built as in ``arch`` (its activation, BN eps and SE rule);
    ``skip`` (if present) is last and is not a module. ``recompute``:
    the weighted forward (architecture steps) recomputes the candidates in the backward pass instead
    of keeping their activations — about 1.6× the step's time for a fraction of its memory.
    """

    recompute = True

    def __init__(self, info: LayerInfo, arch: Arch) -> None:
        super().__init__()
        self.candidates = tuple(info.ops)
        self.has_skip = SKIP in self.candidates
        if self.has_skip and (self.candidates[-1] != SKIP or info.c_in != info.c_out or info.stride != 1):
            raise SearchSpaceError("skip must be the last candidate and only where the layer keeps its shape")
        self.ops = nn.ModuleList(make_layer(info, name, arch, bn_affine=False)
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
        if self.recompute and torch.is_grad_enabled():
            # Keep only the layer's input for the backward pass and run its candidates again there:
            # an architecture step then holds one layer's candidate activations at a time, not every
            # layer's (their BN uses batch statistics and they hold no dropout, so the rerun is exact).
            return checkpoint(self._weighted, x, weights, want_hidden, use_reentrant=False)
        return self._weighted(x, weights, want_hidden)

    def _weighted(self, x: torch.Tensor, weights: torch.Tensor, want_hidden: bool
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
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


def mixed_layer(info: LayerInfo, arch: Arch) -> nn.Module:
    """The layer factory of :class:`SuperBackbone`: the fixed first block plain, every searched layer mixed."""
    if info.position[0] == 0:  # type: ignore[index]
        return plain_layer(info, arch)
    return MixedLayer(info, arch)


def alpha_logits(alpha: Mapping[str, Any]) -> list[list[torch.Tensor]]:
    """α per searched stage and layer from ``s{i}_first`` [1, C], ``s{i}_noskip`` [m-1, C] (layers 1..m-1
    below the stage's ``min_depth`` m, when m > 1) and ``s{i}_rest`` [L-m, C+1] entries.

    Tensors stay as they are (views, so gradients flow); lists (α as stored in ``alpha_history.json``)
    become float64 tensors.
    """
    def rows(v: Any) -> list[torch.Tensor]:
        return list((v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=torch.float64)).unbind(0))

    out, i = [], 1
    while f"s{i}_first" in alpha:
        out.append([row for part in ("first", "noskip", "rest") if f"s{i}_{part}" in alpha
                    for row in rows(alpha[f"s{i}_{part}"])])
        i += 1
    return out


def alpha_probs(alpha: Mapping[str, Any], temperature: float) -> list[list[torch.Tensor]]:
    """``softmax(α / temperature)`` per searched stage and layer (α as in :func:`alpha_logits`)."""
    return [[torch.softmax(a / temperature, dim=0) for a in stage] for stage in alpha_logits(alpha)]


def arch_path(arch: Arch, seed_arch: Arch, candidates: Sequence[Sequence[Sequence[str]]]) -> SinglePath:
    """The path of ``arch`` among ``candidates`` (per searched stage and layer), the inverse of
    :meth:`SuperBackbone.path_arch`: the index of each layer's op, skip past the stage's depth.

    Raises :class:`SearchSpaceError` when ``arch`` does not come from ``seed_arch`` and these candidates.
    """
    shape = [(s.c_in, s.c_out, s.stride, s.dilation) for s in seed_arch.stages]
    if ([(s.c_in, s.c_out, s.stride, s.dilation) for s in arch.stages] != shape
            or (arch.stem_channels, arch.final_channels) != (seed_arch.stem_channels, seed_arch.final_channels)
            or arch.stages[0].ops != seed_arch.stages[0].ops):
        raise SearchSpaceError(f"architecture {arch.name or ''} does not share the seed's stages, stem, first "
                               f"block and final conv ({seed_arch.name or 'seed'})")
    path = []
    for i, (stage, layers) in enumerate(zip(arch.stages[1:], candidates), start=1):
        ops = list(stage.ops) + [SKIP] * (len(layers) - len(stage.ops))
        if len(ops) > len(layers):
            raise SearchSpaceError(f"stage {i} has {len(stage.ops)} layers; the search space allows {len(layers)}")
        try:
            path.append([list(names).index(op) for op, names in zip(ops, layers)])
        except ValueError:
            bad = next((j, op) for j, (op, names) in enumerate(zip(ops, layers)) if op not in names)
            raise SearchSpaceError(f"stage {i} layer {bad[0]}: op {bad[1]} is not a candidate of the search space "
                                   f"there ({', '.join(layers[bad[0]])})") from None
    return path


def _plain_state(layer: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """A searched candidate's tensors as the same layer built plain holds them: its conv weights, and
    for each of its stateless BN a fresh affine BN with running statistics (γ 1, β 0, mean 0, var 1)."""
    like = next(layer.parameters())
    state = {}
    for name, m in layer.named_modules(prefix=prefix):
        if next(m.children(), None) is not None:
            continue
        if isinstance(m, nn.BatchNorm2d) and not m.affine:
            m = nn.BatchNorm2d(m.num_features, m.eps, m.momentum, device=like.device, dtype=like.dtype)
        state.update(m.state_dict(prefix=f"{name}."))
    return state


class SuperBackbone(TapBackbone):
    """Super network over ``seed``'s searched stages; a :class:`~fna.backbone.Backbone` look-alike.

    Modules: ``stem``, ``stages[0]`` (the fixed first block, ``nn.Sequential`` of plain layers),
    ``stages[i]`` for ``i >= 1`` (``nn.ModuleList`` of :class:`MixedLayer`), ``final`` (only when
    tapped), and ``alpha`` (architecture parameters ``s{i}_first`` [1, C] and ``s{i}_rest`` [L-1, C+1];
    a stage whose skips start at layer m > 1 has ``s{i}_noskip`` [m-1, C] between them, ``s{i}_rest`` [L-m, C+1]).
    """

    def __init__(self, seed_arch: Arch, space: SearchSpace, taps: Sequence[str] = ("final",),
                 output_stride: int | None = None, temperature: float = 1.0, alpha_std: float = 1e-3) -> None:
        candidates = space.candidates(seed_arch, taps)
        n = len(seed_arch.stages)
        if all(parse_tap(t, n).stage != n - 1 for t in taps):
            raise SearchSpaceError(f"taps {list(taps)} do not reach the last stage: the stages after the "
                                   "last tap would be searched without ever being trained")
        fixed = [(o,) for o in seed_arch.stages[0].ops if o != SKIP]
        try:
            super().__init__(seed_arch, taps, output_stride, [fixed, *candidates], mixed_layer)
        except ArchError as e:
            raise SearchSpaceError(str(e)) from None
        self.seed_arch = seed_arch
        self.space = space
        self.temperature = float(temperature)
        self.candidates = candidates
        self.alpha = nn.ParameterDict()
        for i, (layers, stage) in enumerate(zip(self.candidates, space.stages), start=1):
            self.alpha[f"s{i}_first"] = nn.Parameter(alpha_std * torch.randn(1, len(layers[0])))
            m = stage.min_depth  # layers 1..m-1 never skip (validated: 1 <= m <= L)
            if m > 1:
                self.alpha[f"s{i}_noskip"] = nn.Parameter(alpha_std * torch.randn(m - 1, len(layers[1])))
            if len(layers) > m:
                self.alpha[f"s{i}_rest"] = nn.Parameter(alpha_std * torch.randn(len(layers) - m, len(layers[m])))
        self.path: SinglePath | None = None

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
        return alpha_logits(self.alpha)

    def layer_probs(self) -> list[list[torch.Tensor]]:
        """``softmax(α / temperature)`` per searched stage and layer."""
        return alpha_probs(self.alpha, self.temperature)

    # -- paths, architectures and weights -------------------------------------------------------
    def _check_path(self, path: SinglePath) -> None:
        """Raise :class:`SearchSpaceError` unless ``path`` picks one candidate of every searched layer."""
        if [len(p) for p in path] != [len(c) for c in self.candidates] or any(
                not 0 <= k < len(names) for p, c in zip(path, self.candidates) for k, names in zip(p, c)):
            raise SearchSpaceError(f"path {path} does not fit the search space")

    def set_path(self, path: SinglePath | None) -> None:
        """Run only ``path`` from now on (single path), or every candidate weighted (``None``)."""
        if path is not None:
            self._check_path(path)
        self.path = path

    def sample_path(self, generator: torch.Generator | None = None, uniform: bool = False) -> SinglePath:
        """One candidate per layer, uniformly or from ``softmax(α)`` (not set; see ``set_path``).

        The temperature applies to the mixed forward only: SSDLite's weighted sum uses
        ``softmax(α / 0.9)`` while its single paths are sampled from ``softmax(α)`` (SPEC §4).
        """
        path = []
        with torch.no_grad():
            for probs in alpha_probs(self.alpha, 1.0):
                p = [torch.ones(len(q)) if uniform else q.detach().float().cpu() for q in probs]
                path.append([int(torch.multinomial(q, 1, generator=generator)) for q in p])
        return path

    def path_arch(self, path: SinglePath) -> Arch:
        """The seed architecture with ``path``'s ops, skips moved to each stage's end (SPEC §4)."""
        ops = [[names[k] for k, names in zip(p, layers)] for p, layers in zip(path, self.candidates)]
        return self.seed_arch.with_ops(ops).canonical()

    def arch_path(self, arch: Arch) -> SinglePath:
        """The path of ``arch`` (see :func:`arch_path`); :meth:`path_arch` of it builds ``arch``'s network."""
        return arch_path(arch, self.seed_arch, self.candidates)

    def argmax_path(self) -> SinglePath:
        """The most likely candidate of every layer."""
        return [[int(a.argmax()) for a in stage] for stage in self.layer_logits()]

    def derive(self) -> Arch:
        """Argmax per layer, skips sorted to the stage end."""
        return self.path_arch(self.argmax_path())

    def derived_state_dict(self, path: SinglePath) -> dict[str, torch.Tensor]:
        """The state dict of ``Backbone(path_arch(path), taps, output_stride)`` with this network's weights.

        Stem, first block and final conv are this network's; searched layer ``j`` of a stage takes its
        chosen candidate's convs (skips dropped, so later layers move up as in :meth:`path_arch`). The
        candidates' BN has no parameters or statistics, so the derived BN is fresh (γ 1, β 0, mean 0,
        var 1): what the candidate computed with in train mode.
        """
        self._check_path(path)
        modules = dict(self.named_modules())
        state: dict[str, torch.Tensor] = {}
        kept = [0] * len(self.stages)
        for info in self.layer_info:
            if info.position is None or info.position[0] == 0:  # stem, first block, final conv
                state.update(modules[info.module].state_dict(prefix=f"{info.module}."))
                continue
            i, j = info.position
            k = path[i - 1][j]
            if info.ops[k] != SKIP:
                state.update(_plain_state(modules[info.module].ops[k], layer_module(i, kept[i])))
                kept[i] += 1
        return state

    # -- forward ---------------------------------------------------------------------------------
    def _runner(self) -> LayerRunner:
        """Searched layers run the set path's candidate, or (no path) all candidates weighted by
        ``softmax(α / temperature)``, computed once per forward."""
        path, probs = self.path, (self.layer_probs() if self.path is None else None)

        def run(info: LayerInfo, layer: nn.Module, x: torch.Tensor, want_hidden: bool
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
            i, j = info.position  # type: ignore[misc]
            if i == 0:
                return run_plain(info, layer, x, want_hidden)
            return layer(x, path[i - 1][j] if path is not None else None,
                         probs[i - 1][j] if probs is not None else None, want_hidden)
        return run

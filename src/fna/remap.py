"""Parameter remapping (SPEC §3): seed weights → a target architecture or the super network.

The rules are applied per tensor, walking both networks structurally — stem, stage *i* layer *l*
role (MBConv: ``expand`` / ``depthwise`` / ``se`` / ``project``; ResNet block: ``conv1`` / ``conv2`` /
``conv3`` / ``downsample``), final conv — never by rewriting key strings:

* **Depth** — layer ``l`` of stage ``i`` takes seed layer ``min(l, n_i - 1)`` of the same stage
  (:func:`depth_source`). Skip layers are not built, so the ``m`` non-skip layers of a target stage
  map to seed layers in order — the same as moving the skips to the stage end first. Stem, every
  stage's layers and the final 1x1 conv are otherwise taken by position.
* **Width** (first-k) — a conv weight ``[O, I, kh, kw]`` takes the leading ``min(O_t, O_s)`` filters
  and ``min(I_t, I_s)`` input channels (a depthwise ``[C, 1, k, k]`` is the same rule with ``I = 1``);
  BN vectors take their leading entries. Uncovered conv entries are zero; uncovered BN entries get
  the fresh init (γ 1, β 0, mean 0, var 1).
* **Kernel** (centre) — a larger target kernel holds the seed kernel in its centre with a zero ring
  (3→5 at ``[1:4, 1:4]``); a smaller one takes the centre crop.
* **Groups** (ours, for FNA++'s group search) — a conv with ``g`` groups is read as the dense conv
  ``[O, C_in, kh, kw]`` it equals, zero outside its ``g`` diagonal blocks. The seed conv in that dense form
  takes the width and kernel rules, and the target keeps its own diagonal blocks: output filter ``o`` of
  target group ``j`` gets seed filter ``o``'s weights on the input channels of group ``j``
  (``[j·C_in/g_t, (j+1)·C_in/g_t)``), zero where the seed filter had none. So 1 → 2 or 4 groups keeps
  each filter's own block of a dense seed conv, and 2 or 4 → 1 group gives each filter its seed weights
  with zeros on the other groups' channels (the same function, with the grouped target's extra
  connections at zero). A depthwise conv (one channel per group) is this rule with ``g = C``, which is
  first-k on its filters.
* **Squeeze-excitation** moves with its layer: its ``reduce`` weight ``[R, hidden]`` and ``expand``
  weight ``[hidden, R]`` follow the expanded width first-k (and R, where the family's squeezed width
  depends on it), biases their leading entries; uncovered entries are zero.

A layer without a counterpart role in its source — an expand conv in a target layer whose seed
layer is ``e1`` — keeps the init it was built with and is reported ``fresh``: zero-filling it would
make its activation's gradient vanish. BN that has no affine parameters and no running statistics
(super-network candidates, SPEC §2) has nothing to take, so only the convs of such layers are remapped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from fna.arch import SKIP, Arch, op_family, parse_op
from fna.backbone import Backbone
from fna.errors import FnaError
from fna.ops import ConvBNAct, MBConv, ResBlock, SqueezeExcite
from fna.seeds import Seed

BN_FRESH = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}


class RemapError(FnaError, ValueError):
    """A target cannot take the seed's weights (e.g. a different number of stages)."""


# -- the rules -------------------------------------------------------------------------------------

def depth_source(layer: int, seed_depth: int) -> int:
    """The seed layer that target layer ``layer`` of a stage takes: ``min(l, n - 1)``."""
    if seed_depth < 1:
        raise ValueError("a seed stage needs at least one layer to remap from")
    return min(layer, seed_depth - 1)


def remap_conv_weight(src: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``src`` ``[O, I, kh, kw]`` (or a linear ``[O, I]``) fitted to ``shape``: first-k on O and I, centre on
    the kernel, zeros elsewhere."""
    if src.dim() not in (2, 4) or len(shape) != src.dim():
        raise ValueError(f"expected 4-d conv or 2-d linear weights, got {tuple(src.shape)} → {tuple(shape)}")
    out = src.new_zeros(tuple(shape))
    src_idx, dst_idx = [], []
    for dim, (s, t) in enumerate(zip(src.shape, shape)):
        n = min(s, t)
        a, b = ((s - n) // 2, (t - n) // 2) if dim >= 2 else (0, 0)
        src_idx.append(slice(a, a + n))
        dst_idx.append(slice(b, b + n))
    out[tuple(dst_idx)] = src[tuple(src_idx)]
    return out


def dense_conv_weight(w: torch.Tensor, groups: int) -> torch.Tensor:
    """A conv weight ``[O, I/g, kh, kw]`` of ``groups`` groups as the dense ``[O, I, kh, kw]`` it equals
    (zero outside its diagonal blocks)."""
    o, per_group = w.shape[:2]
    dense = w.new_zeros((o, per_group * groups, *w.shape[2:]))
    step = o // groups
    for j in range(groups):
        dense[j * step:(j + 1) * step, j * per_group:(j + 1) * per_group] = w[j * step:(j + 1) * step]
    return dense


def grouped_conv_weight(dense: torch.Tensor, groups: int) -> torch.Tensor:
    """The ``[O, I/g, kh, kw]`` weight of a conv with ``groups`` groups: each group's diagonal block of
    the dense weight ``[O, I, kh, kw]``."""
    step, per_group = dense.shape[0] // groups, dense.shape[1] // groups
    return torch.cat([dense[j * step:(j + 1) * step, j * per_group:(j + 1) * per_group] for j in range(groups)])


def remap_grouped_conv_weight(src: torch.Tensor, src_groups: int, shape: Sequence[int], groups: int
                              ) -> torch.Tensor:
    """``src`` (a conv of ``src_groups`` groups) fitted to ``shape`` with ``groups`` groups: the groups rule
    (module doc) around the width and kernel rules of :func:`remap_conv_weight`."""
    dense = remap_conv_weight(dense_conv_weight(src, src_groups), (shape[0], shape[1] * groups, *shape[2:]))
    return grouped_conv_weight(dense, groups)


def remap_bn_vector(src: torch.Tensor, size: int, fresh: float) -> torch.Tensor:
    """Leading ``min(size, len(src))`` entries of ``src``; the rest ``fresh``."""
    out = torch.full((size,), fresh, dtype=src.dtype)
    n = min(size, src.numel())
    out[:n] = src[:n]
    return out


# -- reports ---------------------------------------------------------------------------------------

@dataclass
class TensorReport:
    """What one target tensor received. ``inherited`` counts its entries taken from the seed.

    ``actions``: ``copied`` (same shape), ``cropped`` (some dim smaller: first-k or centre crop),
    ``zero-filled`` (conv, some dim larger), ``fresh-filled`` (BN, longer: new entries at the fresh
    init), ``regrouped`` (conv of other groups: the groups rule), ``fresh`` (nothing in the seed to take).
    Depth duplication is a property of the layer.
    """

    name: str
    src_shape: tuple[int, ...] | None
    dst_shape: tuple[int, ...]
    actions: tuple[str, ...]
    inherited: int
    parameter: bool  # a learnable parameter (counted in the inherited fraction), not a BN statistic

    @property
    def numel(self) -> int:
        return math.prod(self.dst_shape)


def _actions(src_shape: Sequence[int] | None, dst_shape: Sequence[int], filler: str) -> tuple[str, ...]:
    if src_shape is None:
        return ("fresh",)
    if tuple(src_shape) == tuple(dst_shape):
        return ("copied",)
    acts = []
    if any(t < s for s, t in zip(src_shape, dst_shape)):
        acts.append("cropped")
    if any(t > s for s, t in zip(src_shape, dst_shape)):
        acts.append(filler)
    return tuple(acts)


@dataclass
class LayerReport:
    """One target layer: where its weights came from and what each tensor received."""

    op: str
    source_op: str
    tensors: list[TensorReport]
    target: str = ""
    source: str = ""
    duplicated: bool = False  # its source layer already fed an earlier layer (depth rule)

    @property
    def inherited(self) -> int:
        return sum(t.inherited for t in self.tensors if t.parameter)

    @property
    def total(self) -> int:
        return sum(t.numel for t in self.tensors if t.parameter)


@dataclass
class RemapReport:
    """Per-layer remap record of a whole backbone, with the fraction of parameters inherited."""

    seed: str
    target: str
    layers: list[LayerReport]
    notes: list[str] = field(default_factory=list)

    @property
    def inherited(self) -> int:
        return sum(layer.inherited for layer in self.layers)

    @property
    def total(self) -> int:
        return sum(layer.total for layer in self.layers)

    @property
    def fraction(self) -> float:
        """Fraction of the target's parameter entries that hold seed values."""
        return self.inherited / self.total if self.total else 0.0

    def rows(self) -> list[list[str]]:
        """One row per target layer: target, op, source (seed), inherited share, tensors."""
        out = []
        for layer in self.layers:
            source = " ".join(filter(None, [layer.source, layer.source_op, "(duplicated)" * layer.duplicated]))
            share = f"{layer.inherited / layer.total:.0%}" if layer.total else "—"
            out.append([layer.target, layer.op, source, share, _describe_tensors(layer.tensors)])
        return out

    ROW_HEADER = ("target", "op", "source (seed)", "inherited", "tensors")

    def to_markdown(self) -> str:
        """A Markdown page: summary, notes and one table row per target layer."""
        lines = [f"# Parameter remapping: {self.seed} → {self.target}", "",
                 f"Inherited {self.inherited:,} of {self.total:,} parameters ({self.fraction:.1%}).", ""]
        lines += [f"- {n}" for n in self.notes] + ([""] if self.notes else [])
        lines += ["| " + " | ".join(self.ROW_HEADER) + " |", "|---|---|---|---|---|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows()]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        """Plain JSON data (``remap_report.json``); :meth:`from_dict` reads it back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RemapReport:
        layers = [LayerReport(**{**layer, "tensors": [TensorReport(**{
            **t, "src_shape": tuple(t["src_shape"]) if t["src_shape"] is not None else None,
            "dst_shape": tuple(t["dst_shape"]), "actions": tuple(t["actions"])}) for t in layer["tensors"]]})
            for layer in d["layers"]]
        return cls(seed=d["seed"], target=d["target"], layers=layers, notes=list(d.get("notes", [])))


def _describe_tensors(tensors: list[TensorReport]) -> str:
    """``expand: conv copied, bn copied; depthwise: conv 96×1×3×3→96×1×5×5 zero-filled, ...`` (BN grouped)."""
    parts: dict[str, list[str]] = {}
    for t in tensors:
        role, kind = t.name.split(".")[:2]
        shapes = "" if t.src_shape == t.dst_shape else (
            f"{'×'.join(map(str, t.src_shape))}→{'×'.join(map(str, t.dst_shape))} " if t.src_shape else "")
        text = f"{kind} {shapes}{', '.join(t.actions)}"
        if text not in parts.setdefault(role, []):
            parts[role].append(text)
    return "; ".join(f"{role}: {', '.join(texts)}" for role, texts in parts.items())


# -- module-level remapping ------------------------------------------------------------------------

@torch.no_grad()
def remap_conv_bn(src: ConvBNAct | None, dst: ConvBNAct, role: str) -> list[TensorReport]:
    """Remap one conv → BN pair. ``src=None`` leaves ``dst`` at its init (reported ``fresh``).

    BN tensors ``dst`` lacks (no affine parameters / running statistics) are skipped; ones the source
    lacks get the fresh init. Convs of other groups than the source's take the groups rule (``regrouped``).
    """
    reports = []
    w = dst.conv.weight
    if src is None:
        reports.append(TensorReport(f"{role}.conv.weight", None, tuple(w.shape), ("fresh",), 0, True))
    else:
        s = tuple(src.conv.weight.shape)
        gs, gd = src.conv.groups, dst.conv.groups
        depthwise = all(c.groups == c.in_channels == c.out_channels for c in (src.conv, dst.conv))
        if gs == gd == 1 or depthwise:  # the groups rule is first-k on both
            w.copy_(remap_conv_weight(src.conv.weight, w.shape))
            inherited = math.prod(min(a, b) for a, b in zip(s, w.shape))
            actions = _actions(s, w.shape, "zero-filled")
        else:
            w.copy_(remap_grouped_conv_weight(src.conv.weight, gs, w.shape, gd))
            ones = torch.ones(s, dtype=torch.bool, device=w.device)
            inherited = int(remap_grouped_conv_weight(ones, gs, w.shape, gd).sum())
            dense_s, dense_d = (s[0], s[1] * gs, *s[2:]), (w.shape[0], w.shape[1] * gd, *w.shape[2:])
            actions = tuple(a for a in ("regrouped",) * (gs != gd) + _actions(dense_s, dense_d, "zero-filled")
                            if a != "copied" or gs == gd)
        reports.append(TensorReport(f"{role}.conv.weight", s, tuple(w.shape), actions, inherited, True))
    for name, fresh in BN_FRESH.items():
        t = getattr(dst.bn, name)
        if t is None:
            continue
        s_t = getattr(src.bn, name) if src is not None else None
        if src is not None:
            t.copy_(remap_bn_vector(s_t, t.numel(), fresh) if s_t is not None else torch.full_like(t, fresh))
        s_shape = tuple(s_t.shape) if s_t is not None else None
        reports.append(TensorReport(f"{role}.bn.{name}", s_shape, tuple(t.shape), _actions(s_shape, t.shape, "fresh-filled"),
                                    min(t.numel(), s_t.numel()) if s_t is not None else 0,
                                    isinstance(t, nn.Parameter)))
    if src is not None and dst.bn.num_batches_tracked is not None and src.bn.num_batches_tracked is not None:
        dst.bn.num_batches_tracked.copy_(src.bn.num_batches_tracked)
    return reports


@torch.no_grad()
def remap_linear(src: nn.Linear | None, dst: nn.Linear, name: str) -> list[TensorReport]:
    """Remap one linear layer (an SE's ``reduce`` or ``expand``): weight first-k on both dims, bias its
    leading entries, uncovered entries zero. ``src=None`` leaves ``dst`` at its init (``fresh``)."""
    reports = []
    for kind in ("weight", "bias"):
        t = getattr(dst, kind)
        s_t = getattr(src, kind) if src is not None else None
        if s_t is None:
            reports.append(TensorReport(f"{name}.{kind}", None, tuple(t.shape), ("fresh",), 0, True))
            continue
        t.copy_(remap_conv_weight(s_t, t.shape) if kind == "weight" else remap_bn_vector(s_t, t.numel(), 0.0))
        reports.append(TensorReport(f"{name}.{kind}", tuple(s_t.shape), tuple(t.shape),
                                    _actions(s_t.shape, t.shape, "zero-filled"),
                                    math.prod(min(a, b) for a, b in zip(s_t.shape, t.shape)), True))
    return reports


def remap_se(src: SqueezeExcite | None, dst: SqueezeExcite) -> list[TensorReport]:
    """Remap a squeeze-excitation block (its ``reduce`` and ``expand`` linear layers)."""
    return [*remap_linear(src.reduce if src is not None else None, dst.reduce, "se.reduce"),
            *remap_linear(src.expand if src is not None else None, dst.expand, "se.expand")]


def remap_layer(src: MBConv | ResBlock, dst: MBConv | ResBlock) -> LayerReport:
    """Remap seed layer ``src`` into target layer ``dst`` role by role (width, kernel and groups rules).

    Both must be of one family (MBConv, basic or bottleneck block; :class:`RemapError` otherwise). A
    source without an expand conv (``e1``), SE or downsample leaves the target's at its init
    (``fresh``); a target without one simply does not take the source's. Works for super-network
    candidates, whose BN has nothing to remap.
    """
    family, source = op_family(dst.op), op_family(src.op)
    if family != source:
        raise RemapError(f"a {family} layer ({dst.op.name}) cannot take the weights of a {source} layer "
                         f"({src.op.name}): their convs play different roles")
    tensors = []
    for role in dst.roles:
        d = getattr(dst, role)
        if d is not None:
            s = getattr(src, role)
            tensors += remap_se(s, d) if role == "se" else remap_conv_bn(s, d, role)
    return LayerReport(op=dst.op.name, source_op=src.op.name, tensors=tensors)


def _stage_label(arch: Arch, i: int) -> str:
    s = arch.stages[i]
    return f"stage {i} ({s.c_in}->{s.c_out})"


def check_compatible(seed: Arch, target: Arch) -> None:
    """:class:`RemapError` unless ``target`` can be remapped from ``seed``: stages pair by position, each
    target layer's block family is among its seed stage's, and the stem (``stem_kernel``, ``stem_pool``) and
    the final 1x1 conv exist in the seed as in the target (so nothing is cropped or dropped unreported)."""
    if len(seed.stages) != len(target.stages):
        i = min(len(seed.stages), len(target.stages))
        where = (f"target {_stage_label(target, i)} has no counterpart in the seed" if len(target.stages) > i
                 else f"seed {_stage_label(seed, i)} has no counterpart in the target")
        raise RemapError(f"{target.name or 'target'} has {len(target.stages)} stages, seed {seed.name or 'seed'} "
                         f"has {len(seed.stages)}: {where}; stages are paired by position")
    for i, (a, b) in enumerate(zip(seed.stages, target.stages)):
        families = [{op_family(parse_op(o)) for o in s.ops if o != SKIP} for s in (a, b)]
        if families[1] - families[0]:
            raise RemapError(f"target {_stage_label(target, i)} has {', '.join(sorted(families[1]))} layers, seed "
                             f"{_stage_label(seed, i)} {', '.join(sorted(families[0])) or 'none'}: a layer only takes "
                             "the weights of its own family (MBConv, basic or bottleneck block)")
    names = target.name or "target", seed.name or "seed"
    for key, what in (("stem_kernel", "the stem conv's kernel"), ("stem_pool", "the max-pool after the stem")):
        mine, theirs = (json.dumps(getattr(a, key)) for a in (target, seed))
        if mine != theirs:
            raise RemapError(f"{names[0]}: {key} {mine} differs from seed {names[1]}'s {theirs} ({what}): the stem "
                             f'would not compute the seed\'s; give "{key}": {theirs} in the architecture')
    if target.final_channels and not seed.final_channels:
        raise RemapError(f"{names[0]}: final_channels {target.final_channels}, but seed {names[1]} has no final 1x1 "
                         'conv to remap it from; give "final_channels": 0 in the architecture')


def remap_backbone(seed: Backbone, target: Backbone) -> RemapReport:
    """Remap every tensor of ``target`` from ``seed`` (both :class:`Backbone`); modifies ``target``.

    Stages pair by index, so both architectures need the same number of stages; channel widths,
    depths, kernels and expansions may all differ.
    """
    sa, ta = seed.arch, target.arch
    check_compatible(sa, ta)
    report = RemapReport(seed=sa.name or "seed", target=ta.name or "target", layers=[])
    k = ta.stem_kernel
    stem = LayerReport(f"conv{k}x{k}", "", remap_conv_bn(seed.stem, target.stem, "stem"), "stem", "stem")
    report.layers.append(stem)
    for i, dst_stage in enumerate(target.stages):
        if i >= len(seed.stages):
            raise RemapError(f"the seed backbone does not build {_stage_label(sa, i)}: build it with taps=('final',)")
        src_stage = seed.stages[i]
        if len(dst_stage) and not len(src_stage):
            raise RemapError(f"seed {_stage_label(sa, i)} has no layers (all skip) to remap target "
                             f"{_stage_label(ta, i)} from")
        if (sa.stages[i].c_in, sa.stages[i].c_out) != (ta.stages[i].c_in, ta.stages[i].c_out):
            report.notes.append(f"target {_stage_label(ta, i)} differs in width from seed {_stage_label(sa, i)}: "
                                "channels remapped first-k")
        used: set[int] = set()
        for j, dst in enumerate(dst_stage):
            k = depth_source(j, len(src_stage))
            layer = remap_layer(src_stage[k], dst)
            layer.target, layer.source, layer.duplicated = f"stage {i} layer {j}", f"stage {i} layer {k}", k in used
            used.add(k)
            report.layers.append(layer)
    if target.final is not None:
        if seed.final is None:
            raise RemapError("the target has a final 1x1 conv but the seed backbone was built without it: build "
                             "the seed backbone with taps=('final',)")
        report.layers.append(LayerReport("conv1x1", "", remap_conv_bn(seed.final, target.final, "final"),
                                         "final", "final"))
    for attr in ("activation", "bn_eps"):
        if getattr(sa, attr) != getattr(ta, attr):
            report.notes.append(f"target {attr} {getattr(ta, attr)} differs from the seed's {getattr(sa, attr)}")
    return report


def remap_seed(seed: Seed, arch: Arch, taps: Sequence[str] = ("final",),
               output_stride: int | None = None) -> tuple[Backbone, RemapReport]:
    """``arch``'s backbone with the seed's weights remapped into it, and the report.

    The target takes the seed's activation, BN eps and (if it has one) squeeze-excitation rule: the
    remapped weights were trained with them.
    """
    source = seed.classifier().backbone
    attrs = ("activation", "bn_eps") + (("se",) if seed.arch.se is not None else ())
    notes = [f"target takes the seed's {attr} {getattr(seed.arch, attr)} (the architecture said "
             f"{getattr(arch, attr)})" for attr in attrs if getattr(arch, attr) != getattr(seed.arch, attr)]
    arch = replace(arch, **{attr: getattr(seed.arch, attr) for attr in attrs})
    target = Backbone(arch, taps=taps, output_stride=output_stride)
    report = remap_backbone(source, target)
    report.notes[:0] = notes
    return target, report


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@torch.no_grad()
def feature_similarity(seed: Backbone, target: Backbone, images: torch.Tensor) -> torch.Tensor:
    """Per-image cosine similarity of the two backbones' globally pooled ``final`` features.

    Over the leading ``min(C_seed, C_target)`` channels when the widths differ (the first-k rule).
    """
    a, b = (nn.functional.adaptive_avg_pool2d(m.eval()(images)["final"], 1).flatten(1) for m in (seed, target))
    c = min(a.shape[1], b.shape[1])
    return nn.functional.cosine_similarity(a[:, :c], b[:, :c], dim=1)


def check_images(seed: Backbone, target: Backbone, folder: str | Path) -> list[tuple[str, float]]:
    """``(file name, cosine similarity)`` for every image in ``folder`` (ImageNet preprocessing, 224x224)."""
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.models import MobileNet_V2_Weights

    folder = Path(folder)
    if not folder.is_dir():
        raise FnaError(f"{folder}: not a directory of images")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FnaError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    preprocess = MobileNet_V2_Weights.IMAGENET1K_V1.transforms()
    out = []
    for p in paths:
        try:
            image = decode_image(str(p), mode=ImageReadMode.RGB)
        except RuntimeError as e:
            raise FnaError(f"{p}: not a readable image ({e})") from None
        out.append((p.name, feature_similarity(seed, target, preprocess(image)[None]).item()))
    return out

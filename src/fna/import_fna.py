"""Checkpoints of the original FNA release (JaminFong/FNA) as our models: ``fna import-fna``.

What is read (any of them as the bare state dict too, keys possibly prefixed ``module.`` by distributed training,
BN possibly without ``num_batches_tracked`` as older PyTorch wrote it):

* ``retinanet`` / ``ssdlite`` — mmdet 0.6 checkpoints of ``fna_det`` (``{"meta", "state_dict", "optimizer"}``):
  ``backbone.`` (FNA_Retinanet / FNA_SSDLite: ``blocks.{b}.layers.{l}.op.{i}``, SSDLite's ``extra.{i}``),
  ``neck.`` (mmdet's FPN) and ``bbox_head.`` (RetinaHead / SSDLightHead). The net_config is read from the config
  text mmdet stores in ``meta``.
* ``seg`` — TorchSeg checkpoints of ``fna_seg`` (``{"model", "optimizer", "epoch", "iteration"}``): ``backbone.``,
  the separable ASPP ``head.`` and ``cls_conv``.
* ``cls`` — the MobileNetV2 seed (DenseNAS ``blocks.{b}.layers.{l}.op.{i}``, ``classifier``), written as
  torchvision's ``mobilenet_v2`` state dict: the file ``--seed-weights`` takes.

No key is rewritten by string surgery (only the ``module.`` prefix is dropped). Our model is built on the
checkpoint's architecture, and :attr:`OriginalFormat.heads` together with :func:`backbone_sources` name, for every
conv / BN / linear module of ours, the original module holding its tensors. Every tensor of ours must be found (a
missing ``num_batches_tracked`` keeps ours) and every tensor of the file used; otherwise
:class:`CheckpointImportError` lists the keys that do not match.

The model is built with the original's conventions, so that it computes what the original computed: mmdet 0.6's
anchors as data (:func:`mmdet_anchor_cells`), no ReLU before P7, SSDLite's normalisation (mean only, std 1 on
0..255) and BN eps 1e-3, its head's bias-free conv + BN folded into one conv with bias (:func:`fold_bn`), the
original's test thresholds, and the segmenter's ``align_corners=True`` upsampling — the released configs' settings,
checked against the config text a detection checkpoint stores (:func:`check_settings`). ``docs/migration.md``
lists what still differs and how much it is expected to matter.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fna.arch import BUILTIN_ARCHS, SKIP, Arch, get_arch
from fna.artifact import save_model
from fna.backbone import TapBackbone, layer_module
from fna.checkpoint import load, save_atomic
from fna.data import CITYSCAPES_CLASSES
from fna.errors import FnaError
from fna.seeds import sha256_of, transfer_by_order
from fna.tasks import get_task

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush")
"""COCO's 80 categories in id order: mmdet's labels 1..80 and ours 0..79."""

_LAYERS = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)
_SHOWN = 8  # keys listed per kind of mismatch


class CheckpointImportError(FnaError):
    """A file is not a checkpoint of the original FNA code, or does not fit the architecture given for it."""


# -- mmdet 0.6 anchors ----------------------------------------------------------------------------

def mmdet_base_anchors(base_size: int, scales: Sequence[float], ratios: Sequence[float], scale_major: bool,
                       center: tuple[float, float] | None = None) -> torch.Tensor:
    """mmdet 0.6's base anchors of one level, in its own convention: ``[x1, y1, x2, y2]`` with inclusive pixel
    corners (a box of width w spans ``x1 .. x1 + w - 1``), centred at ``(base_size - 1) / 2`` unless ``center``
    is given, corners rounded. Computed in float32 in mmdet's order of operations; ``ratio = h / w``;
    ``scale_major``: the anchors run over scales within each ratio (else over ratios within each scale)."""
    ratios_t = torch.tensor(list(ratios), dtype=torch.float32)
    scales_t = torch.tensor(list(scales), dtype=torch.float32)
    x_ctr, y_ctr = center if center is not None else (0.5 * (base_size - 1), 0.5 * (base_size - 1))
    h_ratios = torch.sqrt(ratios_t)
    w_ratios = 1 / h_ratios
    if scale_major:
        ws = (base_size * w_ratios[:, None] * scales_t[None, :]).view(-1)
        hs = (base_size * h_ratios[:, None] * scales_t[None, :]).view(-1)
    else:
        ws = (base_size * scales_t[:, None] * w_ratios[None, :]).view(-1)
        hs = (base_size * scales_t[:, None] * h_ratios[None, :]).view(-1)
    return torch.stack([x_ctr - 0.5 * (ws - 1), y_ctr - 0.5 * (hs - 1),
                        x_ctr + 0.5 * (ws - 1), y_ctr + 0.5 * (hs - 1)], dim=-1).round()


def continuous(inclusive: torch.Tensor) -> torch.Tensor:
    """mmdet 0.6's inclusive pixel boxes as the continuous boxes torchvision's box coder works in.

    mmdet decodes against an anchor of centre ``(x1 + x2) / 2`` and width ``x2 - x1 + 1`` and reports the box
    ``[x1, y1, x2 - x1 + 1, y2 - y1 + 1]`` to COCO; the anchor ``[x1, y1, x2 + 1, y2 + 1]`` has the same width and
    a centre half a pixel further, which makes torchvision's decoding give exactly the box mmdet reports.
    """
    return inclusive + inclusive.new_tensor([0.0, 0.0, 1.0, 1.0])


def mmdet_anchor_cells(levels: Sequence[torch.Tensor], strides: Sequence[int]) -> dict[str, Any]:
    """An :class:`~fna.tasks.detection.ExplicitAnchorGenerator` spec from mmdet base anchors per level."""
    return {"cells": [continuous(a).tolist() for a in levels], "strides": [int(s) for s in strides]}


def retinanet_anchor_spec(strides: Sequence[int] = (8, 16, 32, 64, 128), octave_base_scale: float = 4,
                          scales_per_octave: int = 3, ratios: Sequence[float] = (0.5, 1.0, 2.0)) -> dict[str, Any]:
    """The anchors of mmdet 0.6's RetinaHead (defaults: ``fna_retinanet_fpn_retrain.py``): base size = stride,
    scales ``octave_base_scale · 2^(i / scales_per_octave)``, ratio-major order."""
    scales = octave_base_scale * np.array([2 ** (i / scales_per_octave) for i in range(scales_per_octave)])
    return mmdet_anchor_cells([mmdet_base_anchors(s, scales, ratios, scale_major=True) for s in strides], strides)


def ssd_anchor_spec(input_size: int = 300, basesize_ratio_range: tuple[float, float] = (0.2, 0.95),
                    strides: Sequence[int] = (16, 32, 64, 107, 160, 320),
                    ratios: Sequence[Sequence[int]] = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))) -> dict[str, Any]:
    """The anchors of mmdet 0.6's SSDHead (defaults: ``fna_ssdlite_retrain.py``, whose head is built for
    ``input_size=300`` while images are 320×320): min/max sizes from percent steps of ``basesize_ratio_range``
    (plus a first level of 10–20% at 300 px), per level the ratio-1 box at the min size, the ratio-1 box at
    √(min·max), then the pairs ``1/r, r``; centred at ``(stride - 1) / 2`` of each cell."""
    lo, hi = int(basesize_ratio_range[0] * 100), int(basesize_ratio_range[1] * 100)
    step = int(np.floor(hi - lo) / (len(strides) - 2))
    min_sizes = [int(input_size * r / 100) for r in range(lo, hi + 1, step)]
    max_sizes = [int(input_size * (r + step) / 100) for r in range(lo, hi + 1, step)]
    if input_size == 300 and basesize_ratio_range[0] == 0.2:  # the only case the FNA configs use
        min_sizes.insert(0, int(input_size * 10 / 100))
        max_sizes.insert(0, int(input_size * 20 / 100))
    levels = []
    for stride, lo_size, hi_size, level_ratios in zip(strides, min_sizes, max_sizes, ratios):
        all_ratios = [1.0] + [v for r in level_ratios for v in (1 / r, r)]
        base = mmdet_base_anchors(lo_size, [1.0, float(np.sqrt(hi_size / lo_size))], all_ratios, scale_major=False,
                                  center=((stride - 1) / 2, (stride - 1) / 2))
        keep = [0, len(all_ratios), *range(1, len(all_ratios))]  # scale-1 boxes, with the large square second
        levels.append(base[keep])
    return mmdet_anchor_cells(levels, strides)


# -- naming: our modules → the original's ----------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """The original module holding one of our modules' tensors; with ``bn`` set, a bias-free conv followed by that
    BN, which :func:`fold_bn` turns into our conv with bias."""

    name: str
    bn: str | None = None


def backbone_sources(backbone: TapBackbone, ours: str, theirs: str, sorted_skips: bool) -> dict[str, Source]:
    """Our backbone's modules → the original's ``derive_blocks`` network: stem ``blocks.0.{0,1}``; layer ``j`` of
    stage ``i`` in ``blocks.{i+1}.layers.{l}.op`` (conv, BN, ReLU6 per role, no expand conv when e1); the final
    1x1 conv ``blocks.{n+1}.conv.{0,1}``. ``l`` is the layer's place among its stage's ops, skips included, after
    moving skips to the stage end when ``sorted_skips`` (fna_det does, TorchSeg does not)."""
    arch = backbone.arch
    out = {f"{ours}stem.conv": Source(f"{theirs}blocks.0.0"), f"{ours}stem.bn": Source(f"{theirs}blocks.0.1")}
    for info in backbone.layer_info:
        if info.position is None:
            continue
        i, j = info.position
        ops = arch.stages[i].ops
        index = j if sorted_skips else [k for k, op in enumerate(ops) if op != SKIP][j]
        layer = backbone.stages[i][j]
        roles = ("expand", "depthwise", "project") if layer.expand is not None else ("depthwise", "project")
        for at, role in enumerate(roles):
            where = f"{theirs}blocks.{i + 1}.layers.{index}.op"
            out[f"{ours}{layer_module(i, j)}.{role}.conv"] = Source(f"{where}.{3 * at}")
            out[f"{ours}{layer_module(i, j)}.{role}.bn"] = Source(f"{where}.{3 * at + 1}")
    if backbone.final is not None:
        last = len(arch.stages) + 1
        out[f"{ours}final.conv"] = Source(f"{theirs}blocks.{last}.conv.0")
        out[f"{ours}final.bn"] = Source(f"{theirs}blocks.{last}.conv.1")
    return out


def _retinanet_heads(model: nn.Module) -> dict[str, Source]:
    """mmdet 0.6's FPN (``lateral_convs``, ``fpn_convs`` with P6, P7 last) and RetinaHead."""
    fpn, out = model.backbone.fpn, {}
    levels = len(fpn.inner_blocks)
    for k in range(levels):
        out[f"backbone.fpn.inner_blocks.{k}.0"] = Source(f"neck.lateral_convs.{k}.conv")
        out[f"backbone.fpn.layer_blocks.{k}.0"] = Source(f"neck.fpn_convs.{k}.conv")
    out["backbone.fpn.extra_blocks.p6"] = Source(f"neck.fpn_convs.{levels}.conv")
    out["backbone.fpn.extra_blocks.p7"] = Source(f"neck.fpn_convs.{levels + 1}.conv")
    for ours, theirs, last in (("classification_head", "cls", "cls_logits"), ("regression_head", "reg", "bbox_reg")):
        for k in range(len(getattr(model.head, ours).conv)):
            out[f"head.{ours}.conv.{k}.0"] = Source(f"bbox_head.{theirs}_convs.{k}.conv")
        out[f"head.{ours}.{last}"] = Source(f"bbox_head.retina_{theirs}")
    return out


def _ssdlite_heads(model: nn.Module) -> dict[str, Source]:
    """FNA_SSDLite's ``extra`` (1x1 conv-BN-ReLU6, then depthwise-separable stride 2, per extra map) and
    SSDLightHead (depthwise 3x3-BN-ReLU6, then bias-free 1x1 conv + BN, per map)."""
    out = {}
    for k in range(len(model.backbone.extras)):
        reduce, separable, ours = f"backbone.extra.{2 * k}", f"backbone.extra.{2 * k + 1}", f"backbone.extras.{k}"
        for part, (conv, bn) in enumerate(((f"{reduce}.0", f"{reduce}.1"), (f"{separable}.0", f"{separable}.1"),
                                           (f"{separable}.3", f"{separable}.4"))):
            out[f"{ours}.{part}.conv"], out[f"{ours}.{part}.bn"] = Source(conv), Source(bn)
    for ours, theirs in (("classification_head", "cls_convs"), ("regression_head", "reg_convs")):
        for k in range(len(getattr(model.head, ours).module_list)):
            block, orig = f"head.{ours}.module_list.{k}", f"bbox_head.{theirs}.{k}"
            out[f"{block}.0.0"], out[f"{block}.0.1"] = Source(f"{orig}.0"), Source(f"{orig}.1")
            out[f"{block}.1"] = Source(f"{orig}.3", bn=f"{orig}.4")
    return out


def _seg_heads(model: nn.Module) -> dict[str, Source]:
    """TorchSeg's ASPP_Sep (``branch1``; ``branch2..4`` SepConv; ``branch5_*`` image pooling; ``conv_cat``) and
    ``cls_conv``."""
    out = {"aspp.branches.0.conv": Source("head.branch1.0"), "aspp.branches.0.bn": Source("head.branch1.1")}
    branches = len(model.aspp.branches)
    for r in range(1, branches):
        orig = f"head.branch{r + 1}.0"
        for part, (conv, bn) in enumerate((("depthwise", "bn1"), ("pointwise", "bn2"))):
            out[f"aspp.branches.{r}.{part}.conv"] = Source(f"{orig}.{conv}")
            out[f"aspp.branches.{r}.{part}.bn"] = Source(f"{orig}.{bn}")
    out["aspp.pool.1.conv"] = Source(f"head.branch{branches + 1}_conv")
    out["aspp.pool.1.bn"] = Source(f"head.branch{branches + 1}_bn")
    out["aspp.project.conv"], out["aspp.project.bn"] = Source("head.conv_cat.0"), Source("head.conv_cat.1")
    out["classifier"] = Source("cls_conv")
    return out


# -- the formats ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class OriginalFormat:
    """One task's checkpoints in the original code: where things are, and the conventions its model had."""

    task: str
    what: str  # for messages
    backbone: str  # key prefix of the backbone in the checkpoint
    sorted_skips: bool  # skips moved to the stage end before building (fna_det's derive_blocks)
    bn_eps: float  # of every backbone BN
    classes_key: str  # the tensor whose first dimension gives the class count ...
    classes: Callable[[int], int]  # ... by this rule
    class_names: tuple[str, ...]  # the paper's, used when the count matches
    default_arch: str  # the released config's net_config, used when the file stores none and none is given
    heads: Callable[[nn.Module], dict[str, Source]]
    model_kwargs: Callable[[], dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)  # the released config's, which the model is built with


FORMATS: dict[str, OriginalFormat] = {
    "retinanet": OriginalFormat(
        task="retinanet", what="mmdet 0.6 RetinaNet (fna_det)", backbone="backbone.", sorted_skips=True,
        bn_eps=1e-5, classes_key="bbox_head.retina_cls.weight", classes=lambda n: n // 9, class_names=COCO_CLASSES,
        default_arch="fna_retinanet", heads=_retinanet_heads,
        # fna_retinanet_fpn_retrain.py: images rescaled to fit 1333×800; its test_cfg
        model_kwargs=lambda: dict(min_size=800, max_size=1333, anchors=retinanet_anchor_spec(), p7_relu=False,
                                  score_thresh=0.05, nms_thresh=0.5, detections_per_img=100, topk_candidates=1000),
        settings=dict(anchor_strides=[8, 16, 32, 64, 128], octave_base_scale=4, scales_per_octave=3,
                      anchor_ratios=[0.5, 1.0, 2.0], target_means=[0.0] * 4, target_stds=[1.0] * 4,
                      mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375])),
    "ssdlite": OriginalFormat(
        task="ssdlite", what="mmdet 0.6 SSDLite (fna_det)", backbone="backbone.", sorted_skips=True, bn_eps=1e-3,
        classes_key="bbox_head.cls_convs.0.3.weight", classes=lambda n: n // 4 - 1, class_names=COCO_CLASSES,
        default_arch="fna_ssdlite", heads=_ssdlite_heads,
        # fna_ssdlite_retrain.py: img_norm_cfg mean 255·ImageNet mean, std 1 on 0..255; test_cfg without nms_pre
        model_kwargs=lambda: dict(size=320, anchors=ssd_anchor_spec(), head_bn_eps=1e-3, image_std=[1 / 255] * 3,
                                  score_thresh=0.02, nms_thresh=0.6, detections_per_img=200,
                                  topk_candidates=1_000_000),
        settings=dict(anchor_strides=[16, 32, 64, 107, 160, 320], basesize_ratio_range=[0.2, 0.95],
                      target_means=[0.0] * 4, target_stds=[0.1, 0.1, 0.2, 0.2], mean=[123.675, 116.28, 103.53],
                      std=[1.0, 1.0, 1.0])),
    "seg": OriginalFormat(
        task="seg", what="TorchSeg DeepLabv3 (fna_seg)", backbone="backbone.", sorted_skips=False, bn_eps=1e-5,
        classes_key="cls_conv.weight", classes=lambda n: n, class_names=CITYSCAPES_CLASSES,
        default_arch="fna_deeplabv3", heads=_seg_heads, model_kwargs=lambda: dict(align_corners=True)),
    "cls": OriginalFormat(
        task="cls", what="MobileNetV2 seed (DenseNAS)", backbone="", sorted_skips=True,
        bn_eps=1e-5,  # trained at 1e-3, but copied unchanged as the original's remapping does (docs/migration.md)
        classes_key="classifier.weight", classes=lambda n: n, class_names=(), default_arch="mobilenet_v2",
        heads=lambda model: {"classifier": Source("classifier")}, model_kwargs=dict),
}


# -- reading and converting -----------------------------------------------------------------------

def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict (``module.`` prefixes removed) and mmcv's ``meta`` (``{}`` when absent) of ``path``."""
    blob = load(path, "checkpoint")  # tensors and plain data only
    meta: dict[str, Any] = {}
    if isinstance(blob, dict) and isinstance(blob.get("state_dict"), dict):  # mmcv / mmdet
        meta = blob["meta"] if isinstance(blob.get("meta"), dict) else {}
        blob = blob["state_dict"]
    elif isinstance(blob, dict) and isinstance(blob.get("model"), dict):  # TorchSeg
        blob = blob["model"]
    if not isinstance(blob, dict) or not blob or \
            not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in blob.items()):
        raise CheckpointImportError(f"{path}: not a checkpoint of the original FNA code: expected a state dict "
                                    "(name → tensor), alone or under 'state_dict' (mmdet) or 'model' (TorchSeg)")
    if all(k.startswith("module.") for k in blob):
        blob = {k[len("module."):]: v for k, v in blob.items()}
    return blob, meta


_NET_CONFIG = re.compile(r"net_config\s*=\s*(\"\"\"|'''|\"|')(.*?)\1", re.DOTALL)


def stored_net_config(meta: dict[str, Any]) -> str | None:
    """The backbone's net_config in the config text mmdet keeps in a checkpoint's ``meta``, if any."""
    found = _NET_CONFIG.search(meta.get("config", "")) if isinstance(meta.get("config"), str) else None
    return found.group(2) if found else None


_SETTING = r"\b{}\s*=\s*(\[[^\[\]]*\]|\([^()]*\)|[-+0-9.e]+)"  # key=flat list, tuple or number


def check_settings(meta: dict[str, Any], fmt: OriginalFormat, path: Path) -> None:
    """:class:`CheckpointImportError` when the config text mmdet stored with the checkpoint sets anchors, box coder
    or input normalisation other than the released config's, which is what the imported model is built with."""
    text = meta.get("config") if isinstance(meta.get("config"), str) else ""
    differ = []
    for key, want in fmt.settings.items():
        found = re.search(_SETTING.format(re.escape(key)), text)
        try:
            value = ast.literal_eval(found.group(1)) if found else None
        except (ValueError, SyntaxError):
            value = found.group(1)
        if found and (np.shape(value) != np.shape(want) or not np.allclose(value, want)):
            differ.append(f"{key}={found.group(1)} (supported: {want})")
    if differ:
        raise CheckpointImportError(f"{path}: its stored config sets {'; '.join(differ)}; the imported {fmt.task} "
                                    "model is built with the released config's anchors, box coder and normalisation only")


def resolve_arch(given: str | None, meta: dict[str, Any], fmt: OriginalFormat) -> tuple[Arch, str]:
    """The checkpoint's architecture (with the original's BN eps) and where it came from: ``given`` (net_config
    text, a built-in name, or a JSON / net_config file), else the net_config stored in the file, else the
    released config's."""
    if given is not None and given.lstrip().startswith("["):
        arch, source = Arch.from_net_config(given), "the --net-config text"
    elif given is not None:
        arch, source = get_arch(given), f"--net-config {given}"
    elif stored_net_config(meta) is not None:
        arch, source = Arch.from_net_config(stored_net_config(meta)), "the net_config stored in the checkpoint"
    else:
        arch, source = BUILTIN_ARCHS[fmt.default_arch], f"the released config's net_config ({fmt.default_arch})"
    return replace(arch, bn_eps=fmt.bn_eps), source


def fold_bn(weight: torch.Tensor, bn: dict[str, torch.Tensor], eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A bias-free conv ``weight`` followed by inference-mode BN, as one conv's ``(weight, bias)``."""
    scale = bn["weight"] / torch.sqrt(bn["running_var"] + eps)
    return weight * scale.view(-1, *([1] * (weight.dim() - 1))), bn["bias"] - bn["running_mean"] * scale


def _listing(keys: Sequence[str]) -> str:
    return ", ".join(keys[:_SHOWN]) + (f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")


def convert(model: nn.Module, theirs: dict[str, torch.Tensor], sources: dict[str, Source], path: Path,
            what: str, fold_eps: float = 1e-3) -> dict[str, torch.Tensor]:
    """Our ``model``'s state dict taken from ``theirs`` by ``sources``; :class:`CheckpointImportError` listing the
    keys ours lacks, the keys of the file left over and the shapes that differ, unless every tensor matches.
    ``fold_eps`` is the eps of the BNs :func:`fold_bn` folds (SSDLightHead's, 1e-3)."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    wrong: list[str] = []

    def take(key: str) -> torch.Tensor | None:
        if key in theirs:
            used.add(key)
            return theirs[key]
        missing.append(key)
        return None

    for name, module in model.named_modules():
        if not isinstance(module, _LAYERS):
            continue
        own, src = module.state_dict(), sources.get(name)
        if src is None:
            raise AssertionError(f"no source named for our module {name}")  # a gap in the tables above
        if src.bn is not None:
            used.add(f"{src.bn}.num_batches_tracked")
            weight = take(f"{src.name}.weight")
            bn = {t: take(f"{src.bn}.{t}") for t in ("weight", "bias", "running_mean", "running_var")}
            if weight is None or any(v is None for v in bn.values()):
                continue
            got = dict(zip(("weight", "bias"), fold_bn(weight, bn, fold_eps)))
        else:
            got = {}
            for t in own:
                key = f"{src.name}.{t}"
                if t == "num_batches_tracked" and key not in theirs:
                    got[t] = own[t]  # older PyTorch did not save it
                elif (value := take(key)) is not None:
                    got[t] = value
        for t, value in got.items():
            if value.shape != own[t].shape:
                wrong.append(f"{src.name}.{t} {list(value.shape)} (ours {list(own[t].shape)})")
            out[f"{name}.{t}"] = value
    left = sorted(k for k in theirs if k not in used)
    if missing or left or wrong:
        parts = ([f"{len(missing)} tensors it needs are not in the file: {_listing(missing)}"] if missing else []) + \
                ([f"{len(left)} tensors of the file are not used: {_listing(left)}"] if left else []) + \
                ([f"{len(wrong)} shapes differ: {_listing(wrong)}"] if wrong else [])
        raise CheckpointImportError(f"{path}: does not fit the {what} on this architecture ({'; '.join(parts)}); "
                                    "pass the net_config it was trained with (--net-config) and the right --task")
    return out


@dataclass
class ImportReport:
    """What :func:`import_checkpoint` wrote."""

    task: str
    out: Path
    arch: Arch
    arch_source: str
    num_classes: int
    tensors: int


def import_checkpoint(path: str | Path, task: str, out: str | Path, net_config: str | None = None) -> ImportReport:
    """Convert an original FNA checkpoint of ``task`` (``retinanet``, ``ssdlite``, ``seg``) into ``model.fna.pt`` at
    ``out``, or (``cls``) the MobileNetV2 seed into torchvision's ``mobilenet_v2`` weights for ``--seed-weights``."""
    path, out = Path(path), Path(out)
    if task not in FORMATS:
        raise CheckpointImportError(f"--task {task!r}: the original FNA code has {', '.join(FORMATS)} checkpoints")
    fmt = FORMATS[task]
    theirs, meta = read_checkpoint(path)
    check_settings(meta, fmt, path)
    arch, arch_source = resolve_arch(net_config, meta, fmt)
    if fmt.classes_key not in theirs:
        raise CheckpointImportError(f"{path}: no tensor {fmt.classes_key}: not a {fmt.what} checkpoint")
    num_classes = fmt.classes(theirs[fmt.classes_key].shape[0])
    kwargs = fmt.model_kwargs()
    model = get_task(task).build_model(arch, num_classes, **kwargs)
    backbone_name, backbone = next((n, m) for n, m in model.named_modules() if isinstance(m, TapBackbone))
    sources = {**backbone_sources(backbone, f"{backbone_name}.", fmt.backbone, fmt.sorted_skips), **fmt.heads(model)}
    state = convert(model, theirs, sources, path, fmt.what)
    model.load_state_dict(state)
    if task == "cls":
        _write_seed_weights(model, arch, path, out)
    else:
        names = fmt.class_names if len(fmt.class_names) == num_classes else \
            tuple(f"class{i}" for i in range(num_classes))
        provenance = {"imported_from": str(path), "sha256": sha256_of(path), "format": fmt.what,
                      "net_config": arch_source}
        save_model(out, model.eval(), task, arch, list(names), kwargs, seed=provenance,
                   config={"imported": provenance})
    return ImportReport(task, out, arch, arch_source, num_classes, len(state))


def _write_seed_weights(model: nn.Module, arch: Arch, path: Path, out: Path) -> None:
    """Our MobileNetV2 classifier as torchvision's ``mobilenet_v2`` state dict (what ``--seed-weights`` reads)."""
    import torchvision

    if arch.without_skips() != BUILTIN_ARCHS["mobilenet_v2"]:
        raise CheckpointImportError(f"{path}: its net_config is not MobileNetV2's; --seed-weights takes torchvision's "
                                    "mobilenet_v2 weights, so only the MobileNetV2 seed converts")
    reference = torchvision.models.mobilenet_v2(weights=None)
    transfer_by_order(model, reference, what=str(path))
    save_atomic(reference.state_dict(), out)


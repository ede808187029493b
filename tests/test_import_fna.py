"""``fna import-fna``: checkpoints in the original FNA release's key schemes, built here from our own models, import
to the same models; the conventions of mmdet 0.6 that change outputs are reproduced."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch
import torchvision
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.image_list import ImageList
from typer.testing import CliRunner

from fna.arch import BUILTIN_ARCHS, SKIP, parse_op
from fna.artifact import load_model
from fna.cli import app
from fna.import_fna import (FORMATS, CheckpointImportError, continuous, import_checkpoint, mmdet_base_anchors,
                            retinanet_anchor_spec, ssd_anchor_spec)
from fna.remap import remap_seed
from fna.seeds import load_seed, seed_from_model
from fna.tasks import build_model, get_task

# -- the original key schemes, written out here independently of fna.import_fna --------------------

_ROLE_AT = {"expand": 0, "depthwise": 3, "project": 6}  # index of the conv in MBBlock.op; its BN follows


def original_backbone_key(key: str, arch, sort_skips: bool) -> str:
    """Our backbone key → derive_blocks' name (``blocks.{b}.layers.{l}.op.{i}``; skips keep their place unless
    sorted to the stage end)."""
    if m := re.fullmatch(r"stem\.(conv|bn)\.(\w+)", key):
        return f"blocks.0.{0 if m[1] == 'conv' else 1}.{m[2]}"
    if m := re.fullmatch(r"final\.(conv|bn)\.(\w+)", key):
        return f"blocks.{len(arch.stages) + 1}.conv.{0 if m[1] == 'conv' else 1}.{m[2]}"
    m = re.fullmatch(r"stages\.(\d+)\.(\d+)\.(\w+)\.(conv|bn)\.(\w+)", key)
    i, j, role, kind, tensor = int(m[1]), int(m[2]), m[3], m[4], m[5]
    ops = list(arch.stages[i].ops)
    ops = [o for o in ops if o != SKIP] + [o for o in ops if o == SKIP] if sort_skips else ops
    layer = [k for k, o in enumerate(ops) if o != SKIP][j]
    at = _ROLE_AT[role] - (3 if parse_op(ops[layer]).expansion == 1 else 0)
    return f"blocks.{i + 1}.layers.{layer}.op.{at + (kind == 'bn')}.{tensor}"


def renamed(state: dict, rules: list[tuple[str, str]], ours: str, theirs: str, arch, sort_skips: bool,
            module: bool = False) -> dict:
    """``state`` in the original scheme: keys under our backbone prefix ``ours`` become ``theirs`` +
    :func:`original_backbone_key`, others go by ``rules``; ``num_batches_tracked`` is dropped (older PyTorch did
    not save it) and ``module.`` put in front when ``module`` (distributed training)."""
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.startswith(ours):
            new = theirs + original_backbone_key(key[len(ours):], arch, sort_skips)
        else:
            new = next((re.sub(pattern, repl, key) for pattern, repl in rules if re.match(pattern, key)), None)
            assert new is not None, f"no rule for {key}"
        out[("module." if module else "") + new] = value
    return out


RETINANET_RULES = [
    (r"backbone\.fpn\.inner_blocks\.(\d)\.0\.", r"neck.lateral_convs.\1.conv."),
    (r"backbone\.fpn\.layer_blocks\.(\d)\.0\.", r"neck.fpn_convs.\1.conv."),
    (r"backbone\.fpn\.extra_blocks\.p6\.", "neck.fpn_convs.3.conv."),
    (r"backbone\.fpn\.extra_blocks\.p7\.", "neck.fpn_convs.4.conv."),
    (r"head\.classification_head\.conv\.(\d)\.0\.", r"bbox_head.cls_convs.\1.conv."),
    (r"head\.regression_head\.conv\.(\d)\.0\.", r"bbox_head.reg_convs.\1.conv."),
    (r"head\.classification_head\.cls_logits\.", "bbox_head.retina_cls."),
    (r"head\.regression_head\.bbox_reg\.", "bbox_head.retina_reg."),
]
SEG_RULES = [
    (r"aspp\.branches\.0\.conv\.", "head.branch1.0."), (r"aspp\.branches\.0\.bn\.", "head.branch1.1."),
    *[(rf"aspp\.branches\.{r}\.{part}\.{kind}\.", f"head.branch{r + 1}.0.{name}.")
      for r in (1, 2, 3) for part, kind, name in ((0, "conv", "depthwise"), (0, "bn", "bn1"),
                                                  (1, "conv", "pointwise"), (1, "bn", "bn2"))],
    (r"aspp\.pool\.1\.conv\.", "head.branch5_conv."), (r"aspp\.pool\.1\.bn\.", "head.branch5_bn."),
    (r"aspp\.project\.conv\.", "head.conv_cat.0."), (r"aspp\.project\.bn\.", "head.conv_cat.1."),
    (r"classifier\.", "cls_conv."),
]
def ssd_rules() -> list[tuple[str, str]]:
    """FNA_SSDLite's ``extra.{2k}`` (1x1: conv 0, BN 1) and ``extra.{2k+1}`` (conv_dw: 0, 1, 3, 4); the head's
    depthwise block (``cls_convs.{k}.0/1``)."""
    rules = []
    for k in range(4):
        for part, kind, name in ((0, "conv", f"{2 * k}.0"), (0, "bn", f"{2 * k}.1"), (1, "conv", f"{2 * k + 1}.0"),
                                 (1, "bn", f"{2 * k + 1}.1"), (2, "conv", f"{2 * k + 1}.3"),
                                 (2, "bn", f"{2 * k + 1}.4")):
            rules.append((rf"backbone\.extras\.{k}\.{part}\.{kind}\.", f"backbone.extra.{name}."))
    for ours, theirs in (("classification_head", "cls_convs"), ("regression_head", "reg_convs")):
        rules += [(rf"head\.{ours}\.module_list\.(\d)\.0\.0\.", rf"bbox_head.{theirs}.\1.0."),
                  (rf"head\.{ours}\.module_list\.(\d)\.0\.1\.", rf"bbox_head.{theirs}.\1.1.")]
    return rules


def randomize_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BN statistics and affine parameters, so that a misplaced tensor changes outputs."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


def mmcv_checkpoint(state: dict, arch) -> dict:
    """What mmdet 0.6 writes: the weights, meta with the config text (holding the net_config), the optimizer."""
    config = f'model = dict(\n    backbone=dict(\n        net_config="""{arch.to_net_config()}""",\n        ))\n'
    return {"meta": {"mmdet_version": "0.6.0+53c647e", "config": config, "epoch": 12, "iter": 1000},
            "state_dict": state, "optimizer": {"state": {}, "param_groups": [{"lr": 0.0005, "params": [0, 1]}]}}


@pytest.fixture(scope="module")
def retinanet():
    """Our RetinaNet on the FNA architecture with the original's conventions (small input), and its mmdet file."""
    kwargs = {**FORMATS["retinanet"].model_kwargs(), "min_size": 128, "max_size": 128}
    arch = BUILTIN_ARCHS["fna_retinanet"]
    model = randomize_bn(build_model("retinanet", arch, 80, **kwargs))
    torch.nn.init.zeros_(model.head.classification_head.cls_logits.bias)  # scores near 0.5: many detections
    state = renamed(model.state_dict(), RETINANET_RULES, "backbone.body.", "backbone.", arch, sort_skips=True,
                    module=True)
    return model, mmcv_checkpoint(state, arch)


def test_mmdet_retinanet_checkpoint_imports_to_identical_detections(retinanet, tmp_path, one_thread):
    model, checkpoint = retinanet
    torch.save(checkpoint, tmp_path / "retinanet.pth")
    report = import_checkpoint(tmp_path / "retinanet.pth", "retinanet", tmp_path / "model.fna.pt")
    assert report.arch_source == "the net_config stored in the checkpoint" and report.num_classes == 80
    imported, info = load_model(tmp_path / "model.fna.pt")
    assert info.class_names[0] == "person" and info.class_names[-1] == "toothbrush"
    assert info.model_kwargs["min_size"] == 800 and info.model_kwargs["max_size"] == 1333
    imported.transform.min_size, imported.transform.max_size = (128,), 128  # compare at the reference's size
    image = torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, got = model([image])[0], imported([image])[0]
    assert len(ref["boxes"]) > 10
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(ref[key], got[key])


def test_imported_retinanet_has_no_relu_before_p7(retinanet):
    model, _ = retinanet
    c5, p = torch.randn(1, 320, 4, 4), [torch.randn(1, 256, 4, 4)]
    extra = model.backbone.fpn.extra_blocks
    (_, p6, p7), _ = extra(list(p), [c5], ["p5"])
    assert torch.equal(p7, extra.p7(p6)) and not torch.equal(p7, extra.p7(torch.relu(p6)))


def test_unmatched_keys_are_listed_by_name(retinanet, tmp_path):
    _, checkpoint = retinanet
    state = dict(checkpoint["state_dict"])
    del state["module.bbox_head.retina_reg.bias"]
    state["module.bbox_head.retina_iou.weight"] = torch.zeros(1)
    torch.save({**checkpoint, "state_dict": state}, tmp_path / "broken.pth")
    with pytest.raises(CheckpointImportError) as e:
        import_checkpoint(tmp_path / "broken.pth", "retinanet", tmp_path / "model.fna.pt")
    assert "broken.pth" in str(e.value)
    assert "not in the file: bbox_head.retina_reg.bias" in str(e.value)
    assert "not used: bbox_head.retina_iou.weight" in str(e.value)
    assert not (tmp_path / "model.fna.pt").exists()


def test_a_net_config_other_than_the_checkpoints_lists_the_shapes_that_differ(retinanet, tmp_path):
    _, checkpoint = retinanet
    torch.save(checkpoint["state_dict"], tmp_path / "bare.pth")  # no meta: the net_config must come from the user
    with pytest.raises(CheckpointImportError, match=r"shapes differ: backbone\.blocks\.2\.layers\.0\.op\.3\.weight "
                                                    r"\[96, 1, 3, 3\] \(ours \[96, 1, 5, 5\]\)"):
        import_checkpoint(tmp_path / "bare.pth", "retinanet", tmp_path / "m.pt", net_config="fna_ssdlite")


def test_a_stored_config_with_other_box_coder_stds_is_refused_naming_them(retinanet, tmp_path):
    _, checkpoint = retinanet
    meta = {**checkpoint["meta"], "config": checkpoint["meta"]["config"] + "target_stds=[0.1, 0.1, 0.2, 0.2]\n"}
    torch.save({**checkpoint, "meta": meta}, tmp_path / "stds.pth")
    with pytest.raises(CheckpointImportError, match=r"stds.pth: its stored config sets target_stds=\[0.1, 0.1, 0.2, "
                                                    r"0.2\] \(supported: \[1.0, 1.0, 1.0, 1.0\]\)"):
        import_checkpoint(tmp_path / "stds.pth", "retinanet", tmp_path / "m.pt")


def test_a_bare_state_dict_without_net_config_takes_the_released_configs(retinanet, tmp_path):
    _, checkpoint = retinanet
    torch.save(checkpoint["state_dict"], tmp_path / "bare.pth")
    report = import_checkpoint(tmp_path / "bare.pth", "retinanet", tmp_path / "m.pt")
    assert report.arch_source == "the released config's net_config (fna_retinanet)"
    assert report.arch.stages == BUILTIN_ARCHS["fna_retinanet"].stages


def test_mmdet_ssdlite_checkpoint_imports_to_the_same_head_outputs(tmp_path, one_thread):
    """SSDLightHead's bias-free 1x1 conv + BN becomes one conv with bias: the same outputs up to rounding."""
    fmt = FORMATS["ssdlite"]
    arch = replace(BUILTIN_ARCHS["fna_ssdlite"], bn_eps=fmt.bn_eps)
    model = randomize_bn(build_model("ssdlite", arch, 80, **fmt.model_kwargs()))
    ours = model.state_dict()
    plain = {k: v for k, v in ours.items() if not re.fullmatch(r"head\.\w+\.module_list\.\d\.1\.(weight|bias)", k)}
    state = renamed(plain, ssd_rules(), "backbone.body.", "backbone.", arch, sort_skips=True)
    g = torch.Generator().manual_seed(3)
    for ours_head, theirs in (("classification_head", "cls_convs"), ("regression_head", "reg_convs")):
        for k in range(6):  # unfold our conv with bias into a bias-free conv and a BN (eps 1e-3)
            w, b = ours[f"head.{ours_head}.module_list.{k}.1.weight"], ours[f"head.{ours_head}.module_list.{k}.1.bias"]
            gamma, var, beta = torch.rand(len(b), generator=g) + 0.5, torch.rand(len(b), generator=g) + 0.5, \
                torch.randn(len(b), generator=g)
            scale = gamma / torch.sqrt(var + 1e-3)
            state[f"bbox_head.{theirs}.{k}.3.weight"] = w / scale.view(-1, 1, 1, 1)
            state.update({f"bbox_head.{theirs}.{k}.4.{t}": v for t, v in
                          (("weight", gamma), ("bias", beta), ("running_mean", (beta - b) / scale),
                           ("running_var", var))})
    checkpoint = mmcv_checkpoint(state, arch)
    torch.save(checkpoint, tmp_path / "ssdlite.pth")
    import_checkpoint(tmp_path / "ssdlite.pth", "ssdlite", tmp_path / "model.fna.pt")
    imported, info = load_model(tmp_path / "model.fna.pt")
    assert info.arch.bn_eps == 1e-3 and imported.head.classification_head.module_list[0][0][1].eps == 1e-3
    x = torch.randn(1, 3, 320, 320, generator=g)
    with torch.no_grad():
        ref, got = model.dense_forward(x), imported.dense_forward(x)
        features = list(imported.backbone(x).values())
        anchors = imported.anchor_generator(ImageList(x, [(320, 320)]), features)[0]
    cells = torch.tensor(ssd_anchor_spec()["cells"][0])  # 20×20 cells of stride 16, 4 anchors each
    assert info.model_kwargs["anchors"] == ssd_anchor_spec() and len(anchors) == 2424
    assert torch.equal(anchors[4:8], cells + torch.tensor([16.0, 0.0, 16.0, 0.0]))  # the cell right of the first
    for key in ref:
        assert torch.allclose(ref[key], got[key], rtol=1e-4, atol=1e-4 * ref[key].abs().max().item())
    # mmdet's img_norm_cfg: mean 255·ImageNet mean, std 1, on 0..255 pixels
    image = torch.rand(3, 8, 8, generator=g)
    mmdet = image * 255 - torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
    assert torch.allclose(imported.transform.normalize(image), mmdet, atol=1e-3)


def test_torchseg_checkpoint_imports_to_identical_logits(tmp_path, one_thread):
    """TorchSeg keeps skips where the net_config has them: layer indices count them (here one in mid-stage)."""
    arch = BUILTIN_ARCHS["fna_deeplabv3"]
    ops = [list(s.ops) for s in arch.stages[1:]]
    ops[1] = ["k7_e6", "skip", "k3_e6", "k3_e6"]
    arch = arch.with_ops(ops)
    model = randomize_bn(build_model("seg", arch, 19, **FORMATS["seg"].model_kwargs()))
    state = renamed(model.state_dict(), SEG_RULES, "backbone.", "backbone.", arch, sort_skips=False)
    assert "backbone.blocks.3.layers.2.op.0.weight" in state and "backbone.blocks.3.layers.1.op.0.weight" not in state
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 100, "iteration": 1000},
               tmp_path / "epoch-last.pth")
    out = CliRunner().invoke(app, ["import-fna", str(tmp_path / "epoch-last.pth"), "--task", "seg", "--net-config",
                                   arch.to_net_config(), "--out", str(tmp_path / "seg.fna.pt")])
    assert out.exit_code == 0, out.output
    assert "architecture from the --net-config text" in out.output
    imported, info = load_model(tmp_path / "seg.fna.pt")
    assert info.class_names[0] == "road" and info.model_kwargs == {"align_corners": True}
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(model(x), imported(x))


def test_original_seed_remaps_exactly_as_the_torchvision_seed(tmp_path, one_thread):
    """The DenseNAS seed scheme (``module.blocks.{b}.layers.{l}.op.{i}``, no num_batches_tracked) → --seed-weights."""
    reference = randomize_bn(torchvision.models.mobilenet_v2(weights=None))
    seed = seed_from_model("mobilenet_v2", reference, BUILTIN_ARCHS["mobilenet_v2"])
    arch = BUILTIN_ARCHS["mobilenet_v2"]
    state = renamed(seed.state_dict, [(r"classifier\.", "classifier.")], "backbone.", "", arch, sort_skips=True,
                    module=True)
    torch.save(state, tmp_path / "seed_mbv2.pt")
    import_checkpoint(tmp_path / "seed_mbv2.pt", "cls", tmp_path / "seed_weights.pth")
    again = load_seed("mobilenet_v2", tmp_path / "seed_weights.pth")
    assert again.state_dict.keys() == seed.state_dict.keys()
    assert all(torch.equal(again.state_dict[k], v) for k, v in seed.state_dict.items())
    spec, target = get_task("retinanet"), BUILTIN_ARCHS["fna_retinanet"]
    want = remap_seed(seed, target, spec.taps(target), spec.output_stride)[0].state_dict()
    got = remap_seed(again, target, spec.taps(target), spec.output_stride)[0].state_dict()
    assert all(torch.equal(got[k], v) for k, v in want.items())


def test_mmdet_retinanet_anchors_are_its_rounded_legacy_boxes():
    """P3 (stride 8, octave base scale 4, ratios 0.5/1/2): mmdet 0.6's base anchors, corners inclusive."""
    p3 = torch.tensor(retinanet_anchor_spec()["cells"][0]) - torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert p3.tolist() == [[-19, -7, 26, 14], [-25, -10, 32, 17], [-32, -14, 39, 21],
                           [-12, -12, 19, 19], [-16, -16, 23, 23], [-21, -21, 28, 28],
                           [-7, -19, 14, 26], [-10, -25, 17, 32], [-14, -32, 21, 39]]
    assert retinanet_anchor_spec()["strides"] == [8, 16, 32, 64, 128]


def test_mmdet_ssd_anchors_follow_its_min_max_sizes_and_order():
    """fna_ssdlite_retrain.py: input_size 300, ratio range 0.2–0.95 → min sizes 30, 60, 114, 168, 222, 276 and max
    sizes 60, 114, ...; per level the min-size square, the √(min·max) square, then 1/r, r; centres (stride-1)/2."""
    spec = ssd_anchor_spec()
    assert spec["strides"] == [16, 32, 64, 107, 160, 320] and [len(c) for c in spec["cells"]] == [4, 6, 6, 6, 4, 4]
    first = torch.tensor(spec["cells"][0]) - torch.tensor([0.0, 0.0, 1.0, 1.0])
    side = 30 / 2 ** 0.5 * 2 ** 0.5  # the ratio pair 1/2, 2 at min size 30: w = 30·√2, h = 30/√2 and back
    assert first[0].tolist() == [-7, -7, 22, 22]  # 7.5 ± (30 - 1) / 2
    assert first[1].tolist() == [round(7.5 - (60 ** 0.5 * 30 ** 0.5 - 1) / 2)] * 2 + \
        [round(7.5 + (60 ** 0.5 * 30 ** 0.5 - 1) / 2)] * 2
    assert first[2].tolist() == [round(7.5 - (side * 2 ** 0.5 - 1) / 2), round(7.5 - (side / 2 ** 0.5 - 1) / 2),
                                 round(7.5 + (side * 2 ** 0.5 - 1) / 2), round(7.5 + (side / 2 ** 0.5 - 1) / 2)]
    last = torch.tensor(spec["cells"][5][0]) - torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert last.tolist() == [22, 22, 297, 297]  # stride 320: centre 159.5, min size 276


@pytest.mark.parametrize("stds,weights", [((1.0, 1.0, 1.0, 1.0), (1.0, 1.0, 1.0, 1.0)),
                                          ((0.1, 0.1, 0.2, 0.2), (10.0, 10.0, 5.0, 5.0))])
def test_continuous_anchors_make_torchvision_decode_the_box_mmdet_reports(stds, weights):
    """mmdet 0.6's delta2bbox (widths x2 - x1 + 1, corners ± 0.5) and its COCO box [x1, y1, x2 - x1 + 1, ...] are
    what torchvision's BoxCoder gives on the anchors shifted by :func:`continuous`."""
    g = torch.Generator().manual_seed(5)
    anchors = mmdet_base_anchors(32, [1.0, 1.5], [0.5, 1.0, 2.0], scale_major=True) + torch.rand(1, generator=g) * 50
    deltas = torch.randn(len(anchors), 4, generator=g) * 0.5
    d = deltas * torch.tensor(stds)
    px, py = (anchors[:, 0] + anchors[:, 2]) * 0.5, (anchors[:, 1] + anchors[:, 3]) * 0.5
    pw, ph = anchors[:, 2] - anchors[:, 0] + 1, anchors[:, 3] - anchors[:, 1] + 1
    gw, gh = pw * d[:, 2].exp(), ph * d[:, 3].exp()
    gx, gy = px + pw * d[:, 0], py + ph * d[:, 1]
    x1, y1, x2, y2 = gx - gw * 0.5 + 0.5, gy - gh * 0.5 + 0.5, gx + gw * 0.5 - 0.5, gy + gh * 0.5 - 0.5
    reported = torch.stack([x1, y1, x2 + 1, y2 + 1], dim=1)  # [x, y, w, h] = [x1, y1, x2 - x1 + 1, y2 - y1 + 1]
    decoded = BoxCoder(weights).decode_single(deltas, continuous(anchors))
    assert torch.allclose(decoded, reported, atol=1e-4)


def test_a_file_of_another_kind_is_one_clear_error(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointImportError, match="list.pth: not a checkpoint of the original FNA code"):
        import_checkpoint(tmp_path / "list.pth", "seg", tmp_path / "m.pt")
    torch.save({"blocks.0.0.weight": torch.zeros(1)}, tmp_path / "seed.pth")
    with pytest.raises(CheckpointImportError, match="no tensor cls_conv.weight: not a TorchSeg DeepLabv3"):
        import_checkpoint(tmp_path / "seed.pth", "seg", tmp_path / "m.pt")

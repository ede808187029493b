"""ResNet seeds (issue 15 item 1): torchvision resnet18/34/50/101 converted, counted, remapped (depth, kernel
and the groups rule), searched over our kernel × groups space on all three tasks, and adapted end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torchvision
from search_helpers import DetData, SegData, det_collate, seg_collate
from seed_helpers import assert_self_remap_exact, calibrated, tiny_adapt
from typer.testing import CliRunner

from fna.arch import BUILTIN_ARCHS, Arch, ArchError, ResOp, Stage, load_arch, parse_op, save_arch
from fna.artifact import load_model
from fna.backbone import Backbone, LayerInfo, make_layer
from fna.cli import app
from fna.cost import CostTable, count, model_cost
from fna.ops import ResBlock
from fna.remap import RemapError, RemapReport, check_compatible, remap_grouped_conv_weight, remap_layer, remap_seed
from fna.search import SearchConfig, search
from fna.seeds import SeedError, load_seed, seed_from_model
from fna.supernet import SearchSpace, SearchSpaceError, StageSpace, SuperBackbone, arch_path
from fna.tasks import build_model, get_task

X64 = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
TASKS = ["retinanet", "ssdlite", "seg"]


def _seed(name: str):
    model = calibrated(getattr(torchvision.models, name)(), X64)
    return model, seed_from_model(name, model, BUILTIN_ARCHS[name])


@pytest.fixture(scope="module")
def resnet18():
    return _seed("resnet18")


@pytest.fixture(scope="module")
def resnet50():
    return _seed("resnet50")


def _small_space(seed_arch: Arch) -> SearchSpace:
    """The ResNet space's shape (seed depth + 1, skip only in the extra layer) with 2 kernels × 2 groups."""
    return SearchSpace(tuple(StageSpace(s.depth + 1, (3, 5), groups=(1, 2), min_depth=s.depth)
                             for s in seed_arch.stages[1:]), "small", "ResNet")


# -- the architecture as data --------------------------------------------------------------------

@pytest.mark.parametrize("name,op", [("basic_k3_g1", ResOp("basic", 3, 1)), ("bottle_k7_g4", ResOp("bottle", 7, 4))])
def test_resnet_op_names_carry_block_kind_kernel_and_groups(name, op):
    assert parse_op(name) == op and op.name == name


@pytest.mark.parametrize("bad,message", [("basic_k4_g1", "odd"), ("bottle_k3_g0", "groups must be >= 1"),
                                         ("wide_k3_g1", "unknown op")])
def test_bad_resnet_op_is_a_clear_error(bad, message):
    with pytest.raises(ArchError, match=message):
        parse_op(bad)


@pytest.mark.parametrize("kind,kernel,groups,message", [("wide", 3, 1, "block kind 'wide'"), ("basic", 4, 1, "odd"),
                                                        ("bottle", 3, 0, "groups must be >= 1")])
def test_a_resnet_op_made_in_code_is_validated_like_a_parsed_one(kind, kernel, groups, message):
    with pytest.raises(ArchError, match=message):
        ResOp(kind, kernel, groups)


def test_groups_that_do_not_split_the_channels_are_a_clear_error():
    with pytest.raises(ArchError, match=r"stage 0 \(64->72\) layer 0: op 'bottle_k3_g4': 18 channels do not split "
                                        "into 4 groups"):  # a bottleneck's KxK conv is a quarter of 72 wide
        Arch(stages=(Stage(64, 72, 1, ("bottle_k3_g4",)),), stem_channels=64, final_channels=0)
    with pytest.raises(ArchError, match=r"layer 0: op 'basic_k3_g4': 6 channels do not split into 4 groups"):
        Arch(stages=(Stage(6, 8, 1, ("basic_k3_g4",)),), stem_channels=6, final_channels=0)


def test_resnet_arch_round_trips_through_json_and_net_config(tmp_path):
    arch = BUILTIN_ARCHS["resnet50"].with_ops([["bottle_k5_g2"] * 4, ["bottle_k7_g4"] * 6, ["bottle_k3_g1"] * 3])
    for path in (tmp_path / "a.json", tmp_path / "a.txt"):
        save_arch(arch, path)
        assert load_arch(path) == arch
    assert "stem_kernel" not in BUILTIN_ARCHS["mobilenet_v2"].to_dict()  # MBConv files are unchanged
    assert BUILTIN_ARCHS["resnet50"].to_dict()["stem_pool"] is True


# -- seeds: conversion, costs --------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_seed_converts_with_torchvisions_logits(name, request):
    model, seed = request.getfixturevalue(name)
    with torch.no_grad():
        ref = model(X64)
        assert (seed.classifier()(X64) - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_seed_onto_its_own_architecture_reproduces_its_logits_exactly(name, request):
    _, seed = request.getfixturevalue(name)
    assert_self_remap_exact(seed, X64)


@pytest.mark.parametrize("arch,madds,params", [("resnet18", 1_814_073_344, 11_689_512),  # torchvision's published
                                               ("resnet50", 4_089_184_256, 25_557_032)])
def test_fna_madds_counts_torchvisions_published_resnet_costs(arch, madds, params):
    out = subprocess.run([sys.executable, "-m", "fna", "madds", "--arch", arch, "--task", "cls", "--size", "224", "224",
                          "--classes", "1000", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (json.loads(out.stdout)["madds"], json.loads(out.stdout)["params"]) == (madds, params)


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnet101"])
def test_resnet_costs_equal_a_count_over_torchvisions_own_model(arch):
    with torch.device("meta"):
        reference = getattr(torchvision.models, arch)()
    ref = count(reference, torch.zeros(1, 3, 224, 224, device="meta"))
    ours = model_cost("cls", BUILTIN_ARCHS[arch], (224, 224), 1000)
    assert (ours.madds, ours.params) == (ref.madds, ref.params)
    meta = getattr(torchvision.models, f"ResNet{arch[6:]}_Weights").IMAGENET1K_V1.meta  # published, rounded
    assert (round(ours.madds / 1e9, 3), ours.params) == (meta["_ops"], meta["num_params"])


def test_resnet_weights_file_loads_as_a_seed_and_an_unfitting_one_is_named(tmp_path, resnet18):
    model, _ = resnet18
    path = tmp_path / "r18.pth"
    torch.save(model.state_dict(), path)
    with torch.no_grad():
        ref = model(X64)
        assert (load_seed("resnet18", path).classifier()(X64) - ref).abs().max() <= 1e-5 * ref.abs().max()
    with pytest.raises(SeedError, match=r"r18.pth: weights do not fit seed 'resnet50'") as error:
        load_seed("resnet50", path)
    lines = str(error.value).splitlines()
    assert len(lines) == 4 and len(str(error.value)) < 600  # a summary, not a dump of 200 keys
    assert lines[1] == "  198 missing of 320 expected: layer1.0.conv3.weight, layer1.0.bn3.weight, layer1.0.bn3.bias, ..."
    assert lines[2].startswith("  24 of another shape: layer1.0.conv1.weight [64, 64, 3, 3] (expected [64, 64, 1, 1])")
    assert lines[3] == "  the file fits seed 'resnet18': pass --seed resnet18"
    wrapped = tmp_path / "ddp.pth"  # what a (Distributed)DataParallel model saves
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, wrapped)
    assert torch.equal(load_seed("resnet18", wrapped).state_dict["backbone.stem.conv.weight"], model.conv1.weight)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(SeedError, match=r"junk.pth: not a readable PyTorch weights file"):
        load_seed("resnet18", tmp_path / "junk.pth")


def test_fna_seeds_lists_the_resnets_and_what_they_need():
    out = subprocess.run([sys.executable, "-m", "fna", "seeds"], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    assert "resnet18 (torchvision resnet18; relu, basic blocks)" in out.stdout
    assert "resnet101 (torchvision resnet101; relu, bottleneck blocks)" in out.stdout
    assert "(resnet50-0676ba61.pth) with --seed-weights" in out.stdout


# -- remapping rules -----------------------------------------------------------------------------

W = torch.arange(1.0, 17.0).reshape(4, 4, 1, 1)  # a dense 1x1 conv: 4 filters over 4 input channels


@pytest.mark.parametrize("groups,expected", [
    (2, torch.stack([W[0, 0:2], W[1, 0:2], W[2, 2:4], W[3, 2:4]])),  # filters of group j: inputs of group j
    (4, torch.stack([W[0, 0:1], W[1, 1:2], W[2, 2:3], W[3, 3:4]]))])
def test_grouped_target_filter_takes_its_seed_filters_inputs_of_its_group(groups, expected):
    assert torch.equal(remap_grouped_conv_weight(W, 1, (4, 4 // groups, 1, 1), groups), expected)


def test_fewer_groups_give_each_filter_its_seed_weights_and_zeros_on_other_groups():
    grouped = torch.tensor([[1.0, 2], [3, 4], [5, 6], [7, 8]])[:, :, None, None]  # 2 groups of 2 filters × 2 inputs
    dense = torch.tensor([[1.0, 2, 0, 0], [3, 4, 0, 0], [0, 0, 5, 6], [0, 0, 7, 8]])[:, :, None, None]
    assert torch.equal(remap_grouped_conv_weight(grouped, 2, (4, 4, 1, 1), 1), dense)
    depthwise = torch.tensor([1.0, 2, 3, 4])[:, None, None, None]  # 4 groups → 2: off-diagonal entries zero
    assert torch.equal(remap_grouped_conv_weight(depthwise, 4, (4, 2, 1, 1), 2),
                       torch.tensor([[1.0, 0], [0, 2], [3, 0], [0, 4]])[:, :, None, None])


def _block(op: str, c_in: int = 8, c_out: int = 8) -> ResBlock:
    """A ResNet block of ``op`` on its own, with a random init."""
    return make_layer(LayerInfo("x", c_in, c_out, 1, 1, 1), op, BUILTIN_ARCHS["resnet18"])


def test_grouped_block_takes_the_seed_blocks_group_blocks_and_comes_back_zero_filled():
    src = _block("basic_k3_g1")
    dst = _block("basic_k3_g2")
    report = remap_layer(src, dst)
    w = src.conv1.conv.weight
    assert torch.equal(dst.conv1.conv.weight, torch.cat([w[:4, :4], w[4:, 4:]]))
    assert {t.name: t.actions for t in report.tensors}["conv1.conv.weight"] == ("regrouped",)
    back = _block("basic_k3_g1")
    remap_layer(dst, back)
    assert torch.equal(back.conv1.conv.weight[:4, :4], w[:4, :4]) and torch.equal(back.conv1.conv.weight[4:, 4:],
                                                                                  w[4:, 4:])
    assert not back.conv1.conv.weight[:4, 4:].any() and not back.conv1.conv.weight[4:, :4].any()
    assert torch.equal(back.conv1.bn.weight, src.conv1.bn.weight)


def test_larger_kernel_holds_the_seed_kernel_in_its_centre_and_smaller_takes_the_centre():
    src = _block("bottle_k3_g1", 16, 16)
    grown = _block("bottle_k5_g1", 16, 16)
    remap_layer(src, grown)
    assert torch.equal(grown.conv2.conv.weight[:, :, 1:4, 1:4], src.conv2.conv.weight)
    ring = grown.conv2.conv.weight.clone()
    ring[:, :, 1:4, 1:4] = 0
    assert not ring.any() and torch.equal(grown.conv1.conv.weight, src.conv1.conv.weight)
    big, small = _block("bottle_k7_g1", 16, 16), _block("bottle_k3_g1", 16, 16)
    remap_layer(big, small)
    assert torch.equal(small.conv2.conv.weight, big.conv2.conv.weight[:, :, 2:5, 2:5])


def test_deeper_stage_repeats_the_last_seed_layer_and_a_shallower_one_drops_the_last(resnet18):
    _, seed = resnet18
    sd = seed.backbone_state_dict()
    deeper = seed.arch.with_ops([["basic_k3_g1"] * 3, ["basic_k3_g1"] * 2, ["basic_k3_g1"]])
    target, report = remap_seed(seed, deeper, taps=("stage3",))
    state = target.state_dict()
    assert all(torch.equal(state[f"stages.1.2.{k}"], sd[f"stages.1.1.{k}"]) for k in
               ("conv1.conv.weight", "conv2.bn.running_var"))
    assert torch.equal(state["stages.3.0.downsample.conv.weight"], sd["stages.3.0.downsample.conv.weight"])
    assert "stages.3.1.conv1.conv.weight" not in state
    rows = {layer.target: (layer.source, layer.duplicated) for layer in report.layers}
    assert rows["stage 1 layer 2"] == ("stage 1 layer 1", True) and rows["stage 3 layer 0"] == ("stage 3 layer 0", False)


def test_a_layer_takes_weights_only_from_its_own_block_family():
    with pytest.raises(RemapError, match="a bottle layer .* cannot take the weights of a basic layer"):
        remap_layer(_block("basic_k3_g1"), _block("bottle_k3_g1"))
    with pytest.raises(RemapError, match="basic layers, seed stage 0 .* bottle"):
        check_compatible(BUILTIN_ARCHS["resnet50"], BUILTIN_ARCHS["resnet18"])


@pytest.mark.parametrize("drop,message", [
    ("stem_kernel", r"r18: stem_kernel 3 differs from seed resnet18's 7 .* give \"stem_kernel\": 7"),
    ("stem_pool", r"r18: stem_pool false differs from seed resnet18's true .* give \"stem_pool\": true")])
def test_a_hand_written_resnet_without_the_seeds_stem_is_refused_naming_the_field(tmp_path, drop, message):
    path = tmp_path / "r18.json"
    path.write_text(json.dumps({k: v for k, v in BUILTIN_ARCHS["resnet18"].to_dict().items() if k not in (drop, "name")}))
    with pytest.raises(RemapError, match=message):
        check_compatible(BUILTIN_ARCHS["resnet18"], load_arch(path))


def test_a_final_conv_the_resnet_seed_does_not_have_is_refused_naming_final_channels():
    target = Arch.from_dict({**BUILTIN_ARCHS["resnet18"].to_dict(), "final_channels": 1024, "name": "wide"})
    with pytest.raises(RemapError, match=r"wide: final_channels 1024, but seed resnet18 has no final 1x1 conv"):
        check_compatible(BUILTIN_ARCHS["resnet18"], target)


# -- the search space, the super network and the search --------------------------------------------

def test_resnet_space_grows_each_stage_by_one_layer_that_alone_may_be_skip():
    arch = BUILTIN_ARCHS["resnet50"]
    space = SearchSpace.get("detection", arch)
    assert space == SearchSpace.get("segmentation", arch)
    cands = space.candidates(arch)
    assert [len(stage) for stage in cands] == [5, 7, 4]  # layer2..layer4: seed depth 4, 6, 3 plus one
    assert cands[0][0][:4] == ("bottle_k3_g1", "bottle_k3_g2", "bottle_k3_g4", "bottle_k5_g1")
    assert [len(layer) for layer in cands[1]] == [9] * 6 + [10] and cands[1][-1][-1] == "skip"
    with torch.device("meta"):
        net = SuperBackbone(arch, space, ("stage3",))
    assert tuple(net.alpha["s2_noskip"].shape) == (5, 9) and tuple(net.alpha["s2_rest"].shape) == (1, 10)
    assert arch_path(arch, arch, cands) == [[0] * 4 + [9], [0] * 6 + [9], [0] * 3 + [9]]  # the seed: skip last
    assert SearchSpace.from_dict(space.to_dict()) == space and space.name == "resnet"


def test_a_resnet_space_serialises_its_blocks_and_no_expansions_and_an_mbconv_space_is_unchanged():
    resnet = SearchSpace.get("detection", BUILTIN_ARCHS["resnet18"]).to_dict()
    assert resnet["blocks"] == "ResNet" and all("expansions" not in s for s in resnet["stages"])
    assert SearchSpace.from_dict(resnet) == SearchSpace.get("detection", BUILTIN_ARCHS["resnet18"])
    mbconv = SearchSpace.get("detection", BUILTIN_ARCHS["mobilenet_v2"]).to_dict()  # what cost-table keys hold
    assert mbconv == {"name": "detection", "stages": [
        {"max_depth": d, "kernels": [3, 5, 7], "expansions": [3, 6], "allow_skip": True} for d in (4, 4, 4, 4, 4, 1)]}


@pytest.mark.parametrize("seed,stage,message", [
    ("mobilenet_v2", {"max_depth": 2, "groups": [1, 2]},
     r"'mine' stage 1: groups \[1, 2\] is a ResNet setting; the seed's layers are MBConv"),
    ("resnet18", {"max_depth": 3, "expansions": [6]}, r"'mine' stage 1: expansions is an MBConv setting"),
    ("resnet18", {"max_depth": 3, "min_depth": 4}, r"'mine' stage 1: min_depth must be between 1 and max_depth 3, "
                                                   "got 4$"),
    ("resnet18", {"max_depth": 3, "min_depth": 0}, r"stage 1: min_depth must be between 1 and max_depth 3, got 0$"),
    ("resnet18", {"max_depth": 3, "groups": [0, 2]}, r"'mine' stage 1: groups must be >= 1, got \[0, 2\]$"),
    ("resnet18", {"max_depth": 3, "groups": [1, 3]}, r"'mine' stage 1 layer 0: 64 channels do not split into 3 "
                                                     r"groups \(groups \[1, 3\]\)")])
def test_a_search_space_setting_the_seed_cannot_take_is_a_clear_error_naming_it(seed, stage, message):
    arch = BUILTIN_ARCHS[seed]
    spec = {"name": "mine", "stages": [stage] * (len(arch.stages) - 1)}
    with pytest.raises(SearchSpaceError, match=message) as error:
        SearchSpace.get(spec, arch).candidates(arch)
    assert "malformed" not in str(error.value)  # not wrapped twice


def test_a_search_space_built_in_code_is_checked_against_the_seeds_family_too():
    mbconv = SearchSpace(tuple(StageSpace(4, groups=(1, 2)) for _ in range(6)), "code")
    with pytest.raises(SearchSpaceError, match="stage 1: groups .* ResNet setting"):
        mbconv.candidates(BUILTIN_ARCHS["mobilenet_v2"])
    resnet = SearchSpace(tuple(StageSpace(3, expansions=(6,)) for _ in range(3)), "code")
    with pytest.raises(SearchSpaceError, match=r"stage 1: expansions \[6\] is an MBConv setting"):
        resnet.candidates(BUILTIN_ARCHS["resnet18"])
    with pytest.raises(SearchSpaceError, match=r"blocks 'MBConv', but the seed's layers are ResNet"):
        SearchSpace.get({"blocks": "MBConv", "stages": [{"max_depth": 3}] * 3}, BUILTIN_ARCHS["resnet18"])


def test_task_taps_on_a_resnet_are_c3_c5_c4_c5_and_c5_at_output_stride_16():
    arch = BUILTIN_ARCHS["resnet18"]
    feats = {task: [(f.channels, f.stride) for f in get_task(task).backbone(arch).feature_info] for task in TASKS}
    assert feats == {"retinanet": [(128, 8), (256, 16), (512, 32)], "ssdlite": [(256, 16), (512, 32)],
                     "seg": [(512, 16)]}
    dilated = get_task("seg").backbone(arch).stages[3]
    # the first block's formerly strided conv keeps the dilation before the stage's (torchvision's rule)
    assert [(b.conv1.conv.dilation, b.conv2.conv.dilation) for b in dilated] == [((1, 1), (2, 2)), ((2, 2), (2, 2))]
    assert dilated[0].conv1.conv.stride == (1, 1) and dilated[0].downsample.conv.stride == (1, 1)


def _backbone(seed, arch: Arch, output_stride: int | None) -> Backbone:
    net = Backbone(arch, ("final",), output_stride)
    net.load_state_dict(seed.backbone_state_dict())
    return net.eval()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to 1e-4 of the larger magnitude (float rounding, not behaviour)."""
    return a.shape == b.shape and bool((a - b).abs().max() <= 1e-4 * b.abs().max())


X96 = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_output_stride_16_computes_c5_at_output_stride_32_on_a_denser_grid(name, request):
    _, seed = request.getfixturevalue(name)
    with torch.no_grad():
        c5 = _backbone(seed, seed.arch, None)(X96)["final"]
        dense = _backbone(seed, seed.arch, 16)(X96)["final"]
    assert tuple(dense.shape[-2:]) == (6, 6) and _same(dense[..., ::2, ::2], c5)


def test_output_stride_16_resnet50_equals_torchvisions_replace_stride_with_dilation(resnet50):
    model, seed = resnet50
    reference = torchvision.models.resnet50(replace_stride_with_dilation=[False, False, True])
    reference.load_state_dict(model.state_dict())
    body = torch.nn.Sequential(*list(reference.eval().children())[:-2])  # up to layer4: C5
    ours = _backbone(seed, seed.arch, 16)
    with torch.no_grad():
        assert _same(ours(X96)["final"], body(X96))
    costs = [count(net, X96) for net in (ours, body)]  # dilation moves no MAdds: the count is torchvision's too
    assert [(c.madds, c.params) for c in costs] == [(costs[1].madds, costs[1].params)] * 2


def test_a_stride_2_block_that_keeps_its_width_keeps_its_downsample_at_output_stride_16(resnet18):
    _, seed = resnet18
    narrow = Arch.from_dict({**seed.arch.to_dict(), "stages": [
        {**s, "c_out": 256} if i == 3 else s for i, s in enumerate(seed.arch.to_dict()["stages"])]})
    target, report = remap_seed(seed, narrow, output_stride=16)
    assert target.stages[3][0].downsample is not None and target.stages[3][0].stride == 1
    layer = next(layer for layer in report.layers if layer.target == "stage 3 layer 0")
    assert {t.name: t.actions for t in layer.tensors}["downsample.conv.weight"] == ("cropped",)  # 512 -> 256 filters
    with torch.no_grad():
        c5 = remap_seed(seed, narrow)[0].eval()(X96)["final"]
        assert _same(target.eval()(X96)["final"][..., ::2, ::2], c5)


@pytest.mark.parametrize("task", TASKS)
def test_a_tiny_search_over_the_resnet_space_prices_the_seed_and_the_derived_arch_as_their_models(
        task, resnet18, tmp_path, one_thread):
    _, seed = resnet18
    kwargs = {"retinanet": {"min_size": 64, "max_size": 64}, "ssdlite": {"size": 64}, "seg": {}}[task]
    cfg = SearchConfig.for_task(task, space=_small_space(seed.arch).to_dict(), num_classes=3, cost_size=(64, 64),
                                epochs=2, arch_start_epoch=1, batch_size=2, warmup_iters=0, progress=False,
                                tensorboard=False, device="cpu", model_kwargs=kwargs)
    data, collate = (SegData(4), seg_collate) if task == "seg" else (DetData(4), det_collate)
    result = search(cfg, data, collate, tmp_path, seed=seed)
    assert load_arch(tmp_path / "arch.json") == result.arch  # what the run wrote is what it derived
    table = CostTable.load(tmp_path / "cost_table.json")
    for arch in (seed.arch, result.arch):  # the additive table prices a path as the whole task model
        assert table.path_cost(arch_path(arch, seed.arch, table.candidates)) == model_cost(task, arch, (64, 64), 3).madds


# -- task models and the whole pipeline --------------------------------------------------------------

def test_retinanet_on_a_remapped_resnet50_seed_reads_c3_c5_and_detects_inside_the_image(resnet50):
    _, seed = resnet50
    spec = get_task("retinanet")
    backbone, report = remap_seed(seed, seed.arch, spec.taps(seed.arch), spec.output_stride)
    model = spec.head(backbone, 80, min_size=64, max_size=96).eval()
    model.score_thresh = 0.0  # keep every box, so there are boxes to check
    image = X96[0, :, :64].sigmoid()  # 64 x 96, not square
    with torch.no_grad():
        feats = backbone(image[None])
        out = model([image])[0]
    assert [(f.shape[1], 64 // f.shape[2], 96 // f.shape[3]) for f in feats.values()] == [
        (512, 8, 8), (1024, 16, 16), (2048, 32, 32)] and report.fraction == 1.0
    boxes = out["boxes"]
    assert len(boxes) > 0 and (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 96).all() and (boxes[:, 3] <= 64).all()
    assert (boxes[:, 2:] >= boxes[:, :2]).all() and build_model("seg", seed.arch, 19).backbone.feature_info[0].stride == 16


def test_fna_adapt_with_a_resnet_seed_weights_file_runs_end_to_end(tmp_path, resnet18, one_thread):
    weights = tmp_path / "resnet18.pth"
    torch.save(resnet18[0].state_dict(), weights)
    arch = tiny_adapt(tmp_path, "resnet18", weights, "{max_depth: 3, kernels: [3, 5], groups: [1, 2], min_depth: 2}", 3)
    run = tmp_path / "run"
    assert (arch.stem_kernel, arch.stem_pool, arch.final_channels) == (7, True, 0)
    spec = get_task("retinanet")  # the run's remap report is what remapping the seed onto its arch reports
    report = RemapReport.from_dict(json.loads((run / "remap_report.json").read_text()))
    again = remap_seed(load_seed("resnet18", weights), arch, spec.taps(arch), spec.output_stride)[1]
    assert report.fraction == again.fraction and 0 < report.fraction <= 1
    fixed = [layer for layer in report.layers if layer.target == "stem" or layer.target.startswith("stage 0 ")]
    assert len(fixed) == 3 and all(layer.inherited == layer.total for layer in fixed)  # stem and layer1: the seed's
    classes = len(load_model(run / "model.fna.pt")[1].class_names)  # the summary's costs are `fna madds`'s
    out = CliRunner().invoke(app, ["madds", "--arch", str(run / "arch.json"), "--task", "retinanet", "--size", "64",
                                   "64", "--classes", str(classes), "--json"])
    summary = json.loads((run / "summary.json").read_text())
    assert out.exit_code == 0 and (json.loads(out.stdout)["madds"], json.loads(out.stdout)["params"]) == (
        summary["madds_data"], summary["params"])

"""Parameter remapping (SPEC §3): one test per row of the edge-case table, then whole backbones."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fna.arch import BUILTIN_ARCHS, Arch, Stage, parse_op
from fna.backbone import Backbone, Classifier
from fna.ops import MBConv
from fna.remap import RemapError, RemapReport, depth_source, remap_backbone, remap_layer, remap_seed
from fna.tasks import get_task

MBV2 = BUILTIN_ARCHS["mobilenet_v2"]
X64 = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def layer(c_in: int, c_out: int, op: str, affine: bool = True) -> MBConv:
    """An MBConv whose every tensor holds distinct random values (so copies are recognisable)."""
    m = MBConv(c_in, c_out, parse_op(op), bn_affine=affine)
    with torch.no_grad():
        for t in list(m.parameters()) + [b for b in m.buffers() if b.is_floating_point()]:
            t.copy_(torch.rand_like(t) + 0.5)
    return m


def seeded(arch: Arch, **kwargs) -> Backbone:
    """A backbone of ``arch`` with random (non-init) BN statistics, standing in for a trained seed."""
    net = Backbone(arch, **kwargs)
    with torch.no_grad():
        for bn in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 1.5)
            bn.num_batches_tracked.fill_(7)
    return net.eval()


# -- the rules, on single layers -----------------------------------------------------------------

@pytest.mark.parametrize("target_layer,seed_depth,expected", [(0, 3, 0), (2, 3, 2), (3, 3, 2), (5, 1, 0)])
def test_depth_source_is_the_same_layer_or_the_last_seed_layer(target_layer, seed_depth, expected):
    assert depth_source(target_layer, seed_depth) == expected


def test_narrower_target_takes_the_first_channels():
    src, dst = layer(4, 4, "k3_e6"), layer(4, 4, "k3_e3")  # hidden 24 → 12
    remap_layer(src, dst)
    assert torch.equal(dst.expand.conv.weight, src.expand.conv.weight[:12])
    assert torch.equal(dst.expand.bn.weight, src.expand.bn.weight[:12])
    assert torch.equal(dst.depthwise.conv.weight, src.depthwise.conv.weight[:12])
    assert torch.equal(dst.depthwise.bn.running_var, src.depthwise.bn.running_var[:12])
    assert torch.equal(dst.project.conv.weight, src.project.conv.weight[:, :12])
    assert torch.equal(dst.project.bn.bias, src.project.bn.bias)


def test_wider_target_zero_fills_new_conv_entries():
    src, dst = layer(4, 4, "k3_e6"), layer(4, 4, "k3_e8")  # hidden 24 → 32
    remap_layer(src, dst)
    expand = torch.zeros(32, 4, 1, 1)
    expand[:24] = src.expand.conv.weight
    project = torch.zeros(4, 32, 1, 1)
    project[:, :24] = src.project.conv.weight
    depthwise = torch.zeros(32, 1, 3, 3)
    depthwise[:24] = src.depthwise.conv.weight
    assert torch.equal(dst.expand.conv.weight, expand)
    assert torch.equal(dst.project.conv.weight, project)
    assert torch.equal(dst.depthwise.conv.weight, depthwise)


def test_wider_target_gives_new_bn_entries_the_fresh_init():
    src, dst = layer(4, 4, "k3_e6"), layer(4, 4, "k3_e8")  # dst BN holds random values before the remap
    remap_layer(src, dst)
    bn, seed_bn = dst.expand.bn, src.expand.bn
    assert torch.equal(bn.weight, torch.cat([seed_bn.weight, torch.ones(8)]))
    assert torch.equal(bn.bias, torch.cat([seed_bn.bias, torch.zeros(8)]))
    assert torch.equal(bn.running_mean, torch.cat([seed_bn.running_mean, torch.zeros(8)]))
    assert torch.equal(bn.running_var, torch.cat([seed_bn.running_var, torch.ones(8)]))


@pytest.mark.parametrize("kernel,centre", [(5, slice(1, 4)), (7, slice(2, 5))])
def test_larger_kernel_holds_the_seed_kernel_in_its_centre_with_a_zero_ring(kernel, centre):
    src, dst = layer(4, 4, "k3_e6"), layer(4, 4, f"k{kernel}_e6")
    remap_layer(src, dst)
    expected = torch.zeros(24, 1, kernel, kernel)
    expected[:, :, centre, centre] = src.depthwise.conv.weight
    assert torch.equal(dst.depthwise.conv.weight, expected)


@pytest.mark.parametrize("kernel,centre", [(5, slice(1, 4)), (7, slice(2, 5))])
def test_smaller_kernel_takes_the_centre_crop(kernel, centre):
    src, dst = layer(4, 4, f"k{kernel}_e6"), layer(4, 4, "k3_e6")
    remap_layer(src, dst)
    assert torch.equal(dst.depthwise.conv.weight, src.depthwise.conv.weight[:, :, centre, centre])


def test_narrower_and_larger_kernel_apply_together():
    src, dst = layer(4, 4, "k3_e6"), layer(4, 4, "k5_e3")
    remap_layer(src, dst)
    expected = torch.zeros(12, 1, 5, 5)
    expected[:, :, 1:4, 1:4] = src.depthwise.conv.weight[:12]
    assert torch.equal(dst.depthwise.conv.weight, expected)


def test_e1_seed_layer_leaves_the_target_expand_at_its_init():
    src, dst = layer(4, 8, "k3_e1"), layer(4, 8, "k3_e6")
    before = dst.expand.conv.weight.clone()
    report = remap_layer(src, dst)
    depthwise = torch.zeros(24, 1, 3, 3)
    depthwise[:4] = src.depthwise.conv.weight
    assert torch.equal(dst.expand.conv.weight, before)
    assert torch.equal(dst.depthwise.conv.weight, depthwise)
    assert {t.name: t.actions for t in report.tensors}["expand.conv.weight"] == ("fresh",)


def test_e1_target_takes_the_seed_depthwise_without_its_expand():
    src, dst = layer(4, 8, "k3_e6"), layer(4, 8, "k3_e1")
    remap_layer(src, dst)
    assert dst.expand is None
    assert torch.equal(dst.depthwise.conv.weight, src.depthwise.conv.weight[:4])
    assert torch.equal(dst.project.conv.weight, src.project.conv.weight[:, :4])


def test_super_network_candidates_take_only_conv_weights():
    src = layer(4, 8, "k3_e6")
    candidates = nn.ModuleList(layer(4, 8, op, affine=False) for op in ("k3_e3", "k5_e6", "k7_e6"))
    for cand in candidates:
        report = remap_layer(src, cand)
        assert [t.name for t in report.tensors] == ["expand.conv.weight", "depthwise.conv.weight", "project.conv.weight"]
    hidden = [c.expand.conv.weight.shape[0] for c in candidates]
    for cand, h in zip(candidates, hidden):  # every candidate of the layer read the same seed layer
        assert torch.equal(cand.expand.conv.weight, src.expand.conv.weight[:h])


def test_layer_report_counts_inherited_parameters():
    report = remap_layer(layer(4, 4, "k3_e6"), layer(4, 4, "k5_e6"))
    depthwise = next(t for t in report.tensors if t.name == "depthwise.conv.weight")
    assert depthwise.inherited == 24 * 9 and depthwise.numel == 24 * 25
    assert depthwise.actions == ("zero-filled",)
    assert report.total == sum(p.numel() for p in layer(4, 4, "k5_e6").parameters())


# -- whole backbones -------------------------------------------------------------------------------

TINY = Arch(stages=(Stage(8, 8, 1, ("k3_e1",)), Stage(8, 12, 2, ("k3_e6", "k3_e6")), Stage(12, 16, 2, ("k3_e6",))),
            stem_channels=8, final_channels=32, name="tiny")


def test_deeper_stage_repeats_the_last_seed_layer():
    seed = seeded(TINY)
    target = Backbone(TINY.with_ops([["k3_e6"] * 4, ["k3_e6"]]))
    report = remap_backbone(seed, target)
    for j, k in enumerate([0, 1, 1, 1]):
        assert torch.equal(target.stages[1][j].expand.conv.weight, seed.stages[1][k].expand.conv.weight)
        assert torch.equal(target.stages[1][j].project.bn.running_mean, seed.stages[1][k].project.bn.running_mean)
    assert [(l.source, l.duplicated) for l in report.layers if l.target.startswith("stage 1")] == [
        ("stage 1 layer 0", False), ("stage 1 layer 1", False), ("stage 1 layer 1", True), ("stage 1 layer 1", True)]


def test_skips_in_the_middle_of_a_stage_map_the_non_skip_layers_in_order():
    seed = seeded(TINY)
    target = Backbone(TINY.with_ops([["k3_e6", "skip", "k5_e6"], ["k3_e6"]]))
    remap_backbone(seed, target)
    expected = torch.zeros(72, 1, 5, 5)
    expected[:, :, 1:4, 1:4] = seed.stages[1][1].depthwise.conv.weight
    assert len(target.stages[1]) == 2
    assert torch.equal(target.stages[1][1].depthwise.conv.weight, expected)


def test_fixed_blocks_copy_every_tensor():
    seed = seeded(TINY)
    target = Backbone(TINY.with_ops([["k7_e3"], ["k5_e6", "k5_e6"]]))
    remap_backbone(seed, target)
    for name in ("stem", "final"):
        for k, v in getattr(seed, name).state_dict().items():
            assert torch.equal(getattr(target, name).state_dict()[k], v), f"{name}.{k}"
    for k, v in seed.stages[0].state_dict().items():
        assert torch.equal(target.stages[0].state_dict()[k], v), f"stages.0.{k}"


def test_ssdlite_tap_of_the_remapped_layer_is_the_seed_tap():
    seed = seeded(MBV2, taps=("expand5", "final"))
    stage_ops = [list(s.ops) for s in MBV2.stages[1:]]
    stage_ops[4][0] = "k7_e6"  # first layer of the 160 stage: another kernel, still e6
    target = Backbone(MBV2.with_ops(stage_ops), taps=("expand5", "final")).eval()
    remap_backbone(seed, target)
    with torch.no_grad():
        tap = target(X64)["expand5"]
        assert tap.shape[1] == 576
        assert torch.equal(tap, seed(X64)["expand5"])


def test_seed_onto_its_own_architecture_reproduces_its_logits(mbv2_seed):
    target, report = remap_seed(mbv2_seed, mbv2_seed.arch)
    model = Classifier(target)
    model.classifier.load_state_dict({"weight": mbv2_seed.state_dict["classifier.weight"],
                                      "bias": mbv2_seed.state_dict["classifier.bias"]})
    with torch.no_grad():
        assert torch.equal(model.eval()(X64), mbv2_seed.classifier()(X64))
    assert report.fraction == 1.0


BN_INIT = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}


def _source_key(key: str, seed_arch: Arch) -> str:
    """The seed tensor a target tensor takes (SPEC §3 depth rule): stage ``i`` layer ``j`` (counting only
    non-skip layers, i.e. skips moved to the stage end) reads seed layer ``min(j, n_i - 1)``; stem and
    final conv by position."""
    parts = key.split(".")
    if parts[0] != "stages":
        return key
    i, j = int(parts[1]), int(parts[2])
    n = sum(op != "skip" for op in seed_arch.stages[i].ops)
    return ".".join(["stages", str(i), str(min(j, n - 1)), *parts[3:]])


def _expected_tensor(src: torch.Tensor, like: torch.Tensor, kind: str) -> tuple[torch.Tensor, int]:
    """``like``-shaped tensor built from ``src`` by the width and kernel rules, and how many entries it
    took from ``src``. Conv weights: first-k filters and input channels, kernel centred (zero ring) or
    centre-cropped, zeros elsewhere. BN vectors: leading entries, the rest at the fresh init."""
    if like.dim() == 1:  # BN weight / bias / running_mean / running_var
        n = min(len(src), len(like))
        out = torch.full(like.shape, BN_INIT[kind])
        out[:n] = src[:n]
        return out, n
    o, i = min(src.shape[0], like.shape[0]), min(src.shape[1], like.shape[1])
    ks, kt = src.shape[-1], like.shape[-1]
    out = torch.zeros(like.shape)
    if kt >= ks:
        a = (kt - ks) // 2
        out[:o, :i, a:a + ks, a:a + ks] = src[:o, :i]
    else:
        a = (ks - kt) // 2
        out[:o, :i] = src[:o, :i, a:a + kt, a:a + kt]
    return out, o * i * min(ks, kt) ** 2


def _check_remap(seed_sd: dict, seed_arch: Arch, target: Backbone, report) -> None:
    """Every target tensor equals the hand-built remap of its seed tensor, and the report covers every one
    of them with the inherited count worked out here."""
    inherited = 0
    params = {k for k, _ in target.named_parameters()}
    for key, value in target.state_dict().items():
        kind = key.rsplit(".", 1)[-1]
        if kind == "num_batches_tracked":
            continue
        expected, taken = _expected_tensor(seed_sd[_source_key(key, seed_arch)], value, kind)
        assert torch.equal(value, expected), key
        inherited += taken if key in params else 0
    reported = set()
    for layer in report.layers:
        prefix = "" if layer.target in ("stem", "final") else "stages.{}.{}.".format(*layer.target.split()[1::2])
        reported |= {prefix + t.name for t in layer.tensors}
    assert reported == {k for k in target.state_dict() if not k.endswith("num_batches_tracked")}
    assert report.total == sum(p.numel() for p in target.parameters())
    assert report.inherited == inherited


@pytest.mark.parametrize("arch,task", [("fna_deeplabv3", "seg"), ("fna_retinanet", "retinanet"),
                                       ("fna_ssdlite", "ssdlite")])
def test_seed_onto_published_architecture_follows_the_rules_for_every_tensor(mbv2_seed, arch, task):
    spec, a = get_task(task), BUILTIN_ARCHS[arch]
    target, report = remap_seed(mbv2_seed, a, taps=spec.taps(a), output_stride=spec.output_stride)
    assert list(target.state_dict()) == list(spec.backbone(a).state_dict())  # no missing or unexpected keys
    _check_remap(mbv2_seed.backbone_state_dict(), mbv2_seed.arch, target, report)
    assert report.inherited < report.total  # published archs have 5x5/7x7 kernels: zero rings
    with torch.no_grad():
        feats = target.eval()(X64)
    assert [f.shape[1] for f in feats.values()] == list(spec.backbone(a).out_channels.values())


def _random_arch(rng: random.Random) -> Arch:
    ops = [f"k{k}_e{e}" for k in (3, 5, 7) for e in (1, 3, 6, 8)]
    stage_ops = []
    for _ in MBV2.stages[1:]:
        n = rng.randint(1, 5)
        stage_ops.append([rng.choice(ops)] + [rng.choice(ops + ["skip"]) for _ in range(n - 1)])
    return MBV2.with_ops(stage_ops)


@pytest.mark.parametrize("seed_value", [0, 1, 2])
def test_random_architecture_follows_the_rules_for_every_tensor(seed_value):
    # random depths (shallower and deeper than the seed), skips anywhere, e1/e3 (narrower) and e8 (wider),
    # 5x5/7x7 kernels: every rule of SPEC §3 on one backbone
    arch = _random_arch(random.Random(seed_value))
    seed, target = seeded(MBV2), Backbone(arch)
    report = remap_backbone(seed, target)
    _check_remap(seed.state_dict(), MBV2, target, report)
    with torch.no_grad():
        assert target.eval()(X64)["final"].shape == (2, 1280, 2, 2)


def test_architecture_with_an_extra_stage_is_an_error_naming_the_stage():
    extra = replace(MBV2, stages=MBV2.stages + (Stage(320, 640, 2, ("k3_e6",)),))
    with pytest.raises(RemapError, match=r"stage 7 \(320->640\) has no counterpart in the seed"):
        remap_backbone(seeded(MBV2), Backbone(extra))


def test_architecture_with_a_missing_stage_is_an_error_naming_the_stage():
    with pytest.raises(RemapError, match=r"seed stage 2 \(12->16\) has no counterpart in the target"):
        remap_backbone(seeded(TINY), Backbone(replace(TINY, stages=TINY.stages[:2])))


def test_other_stage_widths_are_remapped_first_k_and_noted():
    wide = Arch(stages=(Stage(8, 8, 1, ("k3_e1",)), Stage(8, 16, 2, ("k3_e6",)), Stage(16, 16, 2, ("k3_e6",))),
                stem_channels=8, final_channels=32)
    seed, target = seeded(TINY), Backbone(wide)
    report = remap_backbone(seed, target)
    project = torch.zeros(16, 48, 1, 1)
    project[:12] = seed.stages[1][0].project.conv.weight
    assert torch.equal(target.stages[1][0].project.conv.weight, project)
    assert any("stage 1 (8->16) differs in width" in n for n in report.notes)


def test_report_markdown_has_one_row_per_target_layer():
    target = Backbone(BUILTIN_ARCHS["fna_retinanet"])
    text = remap_backbone(seeded(MBV2), target).to_markdown()
    rows = [line for line in text.splitlines() if line.startswith("| stage") or line.startswith("| stem")
            or line.startswith("| final")]
    assert len(rows) == 2 + sum(len(s) for s in target.stages)
    assert "| stage 5 layer 3 | k7_e6 | stage 5 layer 2 k3_e6 (duplicated) |" in text
    assert "depthwise: conv 960×1×3×3→480×1×7×7 cropped, zero-filled" in text


# -- command line ----------------------------------------------------------------------------------

def fna(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fna", *args], capture_output=True, text=True)


def test_cli_remap_writes_the_target_backbone_report_and_image_check(mbv2_seed, tmp_path):
    from skimage.data import chelsea

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.ascontiguousarray(chelsea())).save(images / "cat.png")
    out = fna("remap", "--seed", "mobilenet_v2", "--arch", "fna_retinanet", "--out", str(tmp_path / "t.pt"),
              "--report", str(tmp_path / "r.md"), "--check-images", str(images))
    assert out.returncode == 0, out.stderr
    state = torch.load(tmp_path / "t.pt", weights_only=True)
    assert list(state) == list(Backbone(BUILTIN_ARCHS["fna_retinanet"]).state_dict())
    assert "stage 5 layer 3" in (tmp_path / "r.md").read_text()
    assert "cat.png" in out.stdout and "cosine" in out.stdout


def test_cli_remap_onto_an_unfitting_architecture_is_one_line_naming_the_stage(mbv2_seed, tmp_path):
    arch = tmp_path / "eight.txt"
    arch.write_text(BUILTIN_ARCHS["mobilenet_v2"].to_net_config() + "|[[320, 640], ['k3_e6'], 2]")
    out = fna("remap", "--arch", str(arch), "--out", str(tmp_path / "t.pt"))
    assert out.returncode == 1
    assert "stage 7 (320->640)" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_remap_report_is_data_that_round_trips_through_json():
    report = remap_backbone(seeded(BUILTIN_ARCHS["mobilenet_v2"]), Backbone(BUILTIN_ARCHS["fna_retinanet"]))
    again = RemapReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert again == report and again.to_markdown() == report.to_markdown()
    assert again.rows()[0][0] == "stem" and len(again.rows()) == len(report.layers)

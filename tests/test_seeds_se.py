"""Seeds with squeeze-excitation and hard-swish / SiLU (issue 15 item 2): torchvision mobilenet_v3_large,
timm mobilenetv3_large_100 and efficientnet_b0 — read, converted, remapped, searched and counted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import timm
import torch
import torchvision
from seed_helpers import assert_self_remap_exact, calibrated, tiny_adapt

from fna.arch import BUILTIN_ARCHS, Arch, ArchError, Op, SqueezeExcite, Stage, parse_op
from fna.cost import model_cost, task_cost_table
from fna.ops import MBConv
from fna.remap import remap_layer
from fna.seeds import SEEDS, SeedError, load_seed, seed_from_model
from fna.supernet import SearchSpace, StageSpace, SuperBackbone
from fna.tasks import get_task

X64 = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
SE_SEEDS = ["mobilenet_v3_large", "mobilenetv3_large_100", "efficientnet_b0"]


def _calibrated(model: torch.nn.Module) -> torch.nn.Module:
    return calibrated(model, X64)


@pytest.fixture(scope="module", params=SE_SEEDS)
def reference(request) -> tuple[str, torch.nn.Module]:
    return request.param, _calibrated(SEEDS[request.param].reference())


@pytest.mark.parametrize("name,model", [
    ("mobilenet_v3_large", lambda: torchvision.models.mobilenet_v3_large()),
    ("mobilenetv3_large_100", lambda: timm.create_model("mobilenetv3_large_100")),
    ("efficientnet_b0", lambda: timm.create_model("efficientnet_b0")),
    ("efficientnet_b0", lambda: torchvision.models.efficientnet_b0()),
])
def test_se_network_structure_read_from_its_module_tree_is_the_builtin_arch(name, model):
    assert seed_from_model(name, model().eval()).arch == BUILTIN_ARCHS[name]


def test_seed_conversion_reproduces_the_library_logits(reference):
    name, model = reference
    with torch.no_grad():
        ref = model(X64)
        assert (seed_from_model(name, model).classifier()(X64) - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_seed_weights_file_loads_as_a_seed(reference, tmp_path):
    name, model = reference
    path = tmp_path / f"{name}.pth"
    torch.save(model.state_dict(), path)
    seed = load_seed(name, path)
    with torch.no_grad():
        ref = model(X64)
        assert (seed.classifier()(X64) - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_se_seed_onto_its_own_architecture_reproduces_its_logits_exactly(reference):
    name, model = reference
    seed = seed_from_model(name, model)
    assert_self_remap_exact(seed, X64)


@pytest.mark.parametrize("arch,madds,params", [
    ("mobilenet_v3_large", 216_589_760, 5_483_032),  # torchvision's published costs
    ("mobilenetv3_large_100", 216_589_760, 5_483_032),
    ("efficientnet_b0", 385_814_752, 5_288_548)])
def test_classifier_costs_are_torchvisions_published_numbers(arch, madds, params):
    cost = model_cost("cls", BUILTIN_ARCHS[arch], (224, 224), 1000)
    assert (cost.madds, cost.params) == (madds, params)
    assert "other" not in cost.parts  # MobileNetV3's pre-logits layer is a part of its own


def test_fna_madds_cli_counts_mobilenet_v3_large():
    out = subprocess.run([sys.executable, "-m", "fna", "madds", "--arch", "mobilenet_v3_large", "--task", "cls",
                          "--size", "224", "224", "--classes", "1000", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (json.loads(out.stdout)["madds"], json.loads(out.stdout)["params"]) == (216_589_760, 5_483_032)


@pytest.mark.parametrize("name,op", [
    ("k5_e3_se_relu", Op(5, 3, True, "relu")), ("k3_e2.3", Op(3, 2.3)), ("k3_e6_se", Op(3, 6, True)),
    ("k3_e1_hswish", Op(3, 1, False, "hswish"))])
def test_op_names_carry_expansion_se_and_activation(name, op):
    assert parse_op(name) == op and op.name == name


def test_decimal_expansion_gives_mobilenet_v3s_expanded_widths():
    assert [parse_op(o).hidden(80) for o in BUILTIN_ARCHS["mobilenet_v3_large"].stages[3].ops[1:]] == [200, 184, 184]


@pytest.mark.parametrize("bad,message", [("k3_e6_gelu", "unknown activation 'gelu'"), ("k3_e0.5", "expansion"),
                                         ("k3_e6_relu_se", "unknown op")])
def test_bad_op_suffix_is_a_clear_error(bad, message):
    with pytest.raises(ArchError, match=message):
        parse_op(bad)


def test_se_layer_without_the_architectures_se_rule_is_an_error():
    with pytest.raises(ArchError, match=r"stage 0 .* layer 0: op 'k3_e1_se' has squeeze-excitation.*no 'se'"):
        Arch(stages=(Stage(32, 16, 1, ("k3_e1_se",)),))


def test_se_rules_give_the_libraries_squeezed_widths():
    assert [SqueezeExcite().reduced(0, h) for h in (72, 120, 480, 672, 960)] == [24, 32, 120, 168, 240]
    assert SqueezeExcite(from_input=True, divisor=1).reduced(16, 96) == 4


def test_narrower_se_layer_takes_the_first_channels_of_its_seed_se():
    se = SqueezeExcite()  # squeezed width follows the expanded width: 240 → 64, 120 → 32
    src, dst = (MBConv(40, 40, parse_op(o), se=se) for o in ("k3_e6_se", "k5_e3_se"))
    report = remap_layer(src, dst)
    assert torch.equal(dst.se.reduce.weight, src.se.reduce.weight[:32, :120])
    assert torch.equal(dst.se.expand.weight, src.se.expand.weight[:120, :32])
    assert torch.equal(dst.se.expand.bias, src.se.expand.bias[:120])
    assert {t.name: t.actions for t in report.tensors}["se.reduce.weight"] == ("cropped",)


def test_wider_se_layer_zero_fills_what_the_seed_lacks():
    se = SqueezeExcite(from_input=True, divisor=1, activation="silu", gate="sigmoid")  # squeezed width fixed: 10
    src, dst = (MBConv(40, 40, parse_op(o), activation="silu", se=se) for o in ("k3_e3_se", "k3_e6_se"))
    remap_layer(src, dst)
    assert torch.equal(dst.se.reduce.weight[:, :120], src.se.reduce.weight)
    assert not dst.se.reduce.weight[:, 120:].any() and not dst.se.expand.bias[120:].any()


def test_search_candidates_keep_the_seed_layers_se_and_activation():
    cands = SearchSpace.get("detection", BUILTIN_ARCHS["mobilenet_v3_large"]).candidates(
        BUILTIN_ARCHS["mobilenet_v3_large"])
    assert [len(stage) for stage in cands] == [4, 4, 4, 4, 4]  # five searched stages: max(4, seed depth)
    assert cands[1][0] == ("k3_e3_se_relu", "k3_e6_se_relu", "k5_e3_se_relu", "k5_e6_se_relu", "k7_e3_se_relu",
                           "k7_e6_se_relu")
    assert cands[2][3][-1] == "skip" and cands[2][3][0] == "k3_e3"


@pytest.fixture(scope="module")
def mnv3_seed():
    return seed_from_model("mobilenet_v3_large", SEEDS["mobilenet_v3_large"].reference().eval())


@pytest.mark.parametrize("task", ["retinanet", "ssdlite", "seg"])
def test_se_super_network_runs_and_its_cost_table_bounds_the_seed(task, mnv3_seed):
    seed = mnv3_seed
    spec = get_task(task)
    space = SearchSpace(tuple(StageSpace(2, (3, 5)) for _ in seed.arch.stages[1:]))  # small: 4 ops, 2 layers
    net = SuperBackbone.from_seed(seed, space, spec.taps(seed.arch), spec.output_stride)
    net.set_path(net.sample_path(torch.Generator().manual_seed(0), uniform=True))
    with torch.no_grad():
        feats = net.eval()(X64)
    assert [f.shape[1] for f in feats.values()] == list(net.out_channels.values())
    table = task_cost_table(task, seed.arch, space, (64, 64))
    low, high = table.bounds()
    assert 0 < low < high


def test_unfitting_weights_file_for_an_se_seed_is_a_clear_error(tmp_path):
    path = tmp_path / "mbv2.pth"
    torch.save(torchvision.models.mobilenet_v2().state_dict(), path)
    with pytest.raises(SeedError, match="do not fit seed 'mobilenet_v3_large'"):
        load_seed("mobilenet_v3_large", path)


def test_fna_seeds_lists_every_seed_and_what_it_needs():
    out = subprocess.run([sys.executable, "-m", "fna", "seeds"], capture_output=True, text=True,
                         env={"COLUMNS": "200", **__import__("os").environ})
    assert out.returncode == 0, out.stderr
    for name in SEEDS:
        assert f"{name} (" in out.stdout
    assert "efficientnet_b0 (timm efficientnet_b0; silu, squeeze-excite)" in out.stdout


def test_fna_adapt_with_an_se_seed_weights_file_runs_end_to_end(tmp_path, one_thread):
    weights = tmp_path / "mnv3.pth"
    torch.save(_calibrated(torchvision.models.mobilenet_v3_large()).state_dict(), weights)
    arch = tiny_adapt(tmp_path, "mobilenet_v3_large", weights, "{max_depth: 2, kernels: [3, 5], expansions: [3, 6]}",
                      5)  # five searched stages
    assert arch.se == BUILTIN_ARCHS["mobilenet_v3_large"].se and arch.activation == "hswish"
    assert all(op.endswith("_relu") for op in arch.stages[1].ops if op != "skip")  # the seed's ReLU layers


def test_seed_relative_pareto_budget_for_a_seed_outside_its_space_is_a_clear_error():
    from fna.pareto import resolve_budgets
    from fna.search import SearchError

    arch = BUILTIN_ARCHS["mobilenet_v3_large"]
    table = task_cost_table("retinanet", arch, SearchSpace.get("detection", arch), (64, 64))
    with pytest.raises(SearchError, match=r"'0.5x' is a fraction of the seed's cost.*k3_e4_relu is not a candidate"):
        resolve_budgets(["0.5x", "1x"], table, arch)
    assert [b for _, b in resolve_budgets(["4e8", "5e8"], table, arch)] == [4e8, 5e8]

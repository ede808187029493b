"""Search space, super network (forward modes, gradients, derive, remapping) and per-candidate cost tables."""

import itertools
import json

import pytest
import torch
from search_helpers import SIZE, tiny_seed, tiny_space

from fna.arch import BUILTIN_ARCHS, SKIP
from fna.backbone import Backbone
from fna.cost import CostTable, CostTableError, best_path_within, model_cost, task_cost_table
from fna.supernet import SearchSpace, SearchSpaceError, StageSpace, SuperBackbone
from fna.tasks import get_task

pytestmark = pytest.mark.usefixtures("one_thread")
MBV2 = BUILTIN_ARCHS["mobilenet_v2"]


def _net(task: str = "seg", space: SearchSpace | None = None, temperature: float = 1.0) -> SuperBackbone:
    seed, spec = tiny_seed(), get_task(task)
    return SuperBackbone.from_seed(seed, space or tiny_space(), spec.taps(seed.arch), spec.output_stride, temperature)


def _x(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE)


def _path_of(net: SuperBackbone, arch) -> list[list[int]]:
    """The candidate indices of a published architecture (skips already at stage ends)."""
    return [[names.index(op) for op, names in zip(stage.ops, layers)]
            for stage, layers in zip(arch.stages[1:], net.candidates)]


# -- search space ----------------------------------------------------------------------------------

@pytest.mark.parametrize("preset,depths", [("detection", [4, 4, 4, 4, 4, 1]), ("segmentation", [4, 4, 6, 6, 4, 1])])
def test_presets_have_the_papers_candidates_and_alpha_shapes(preset, depths):
    net = SuperBackbone(MBV2, SearchSpace.preset(preset), ("stage6",))
    assert [len(layers) for layers in net.candidates] == depths
    for i, layers in enumerate(net.candidates, start=1):
        assert layers[0] == ("k3_e3", "k3_e6", "k5_e3", "k5_e6", "k7_e3", "k7_e6")  # first layer: no skip
        assert all(names == layers[0] + (SKIP,) for names in layers[1:])
        assert net.alpha[f"s{i}_first"].shape == (1, 6)
        if len(layers) > 1:
            assert net.alpha[f"s{i}_rest"].shape == (len(layers) - 1, 7)
    alphas = torch.cat([a.flatten() for a in net.arch_parameters()])
    assert 0 < alphas.abs().max() < 1e-2  # 1e-3 · N(0, 1)


def test_search_space_round_trips_through_json():
    space = SearchSpace((StageSpace(3, (3, 7), (2, 4), False), StageSpace(1)), "mine")
    assert SearchSpace.from_dict(json.loads(space.to_json())) == space
    assert SearchSpace.get("detection") == SearchSpace.preset("detection")


def test_user_space_without_skip_has_no_skip_candidates():
    net = _net(space=tiny_space(allow_skip=False))
    assert all(SKIP not in names for layers in net.candidates for names in layers)
    assert net.alpha["s1_rest"].shape == (1, 4)


@pytest.mark.parametrize("bad", [dict(max_depth=0), dict(max_depth=2, kernels=(4,)), dict(max_depth=2, expansions=(0,))])
def test_malformed_stage_space_is_a_user_error(bad):
    with pytest.raises(SearchSpaceError):
        StageSpace(**bad)


def test_space_with_a_different_stage_count_than_the_seed_is_a_user_error():
    with pytest.raises(SearchSpaceError, match="searched stages"):
        _net(space=SearchSpace.preset("detection"))  # 6 searched stages, the tiny seed has 4


def test_ssdlite_tapped_layer_only_has_the_widest_expansion():
    net = SuperBackbone(MBV2, SearchSpace.preset("detection"), get_task("ssdlite").taps(MBV2))
    assert net.candidates[4][0] == ("k3_e6", "k5_e6", "k7_e6")
    assert net.alpha["s5_first"].shape == (1, 3)
    assert net.out_channels == {"expand5": 576, "final": 1280}


def test_tap_on_a_stage_that_only_allows_e1_is_a_user_error():
    space = SearchSpace(tiny_space().stages[:3] + (StageSpace(1, (3,), (1,)),))
    with pytest.raises(SearchSpaceError, match="expand"):
        _net("ssdlite", space)


# -- forward modes -----------------------------------------------------------------------------------

def test_given_path_equals_the_derived_backbone_with_the_same_weights():
    net = _net().train()
    path = [[1, 2], [3, 0], [2, 1], [0]]  # no skips: layer order is unchanged by derivation
    net.set_path(path)
    target = Backbone(net.path_arch(path), taps=net.taps, output_stride=16).train()
    sd = {k: v for k, v in net.state_dict().items() if "alpha" not in k}
    for i, stage in enumerate(path, start=1):
        for j, k in enumerate(stage):
            for name, v in net.stages[i][j].ops[k].state_dict().items():
                sd[f"stages.{i}.{j}.{name}"] = v
    missing, _ = target.load_state_dict(sd, strict=False)
    assert all(".bn." in m for m in missing)  # only the derived net's affine BN (γ=1, β=0 at init)
    x = _x()
    torch.testing.assert_close(net(x)["stage4"], target(x)["stage4"])


def test_weighted_mode_is_the_softmax_weighted_sum_of_candidates():
    net = _net(temperature=0.9)
    with torch.no_grad():
        net.alpha["s1_rest"].copy_(torch.randn(1, 5))
    layer, x = net.stages[1][1], torch.randn(2, 8, 16, 16)
    w = torch.softmax(net.alpha["s1_rest"][0] / 0.9, 0)
    expected = sum(w[k] * op(x) for k, op in enumerate(layer.ops)) + w[-1] * x
    torch.testing.assert_close(layer(x, None, net.layer_probs()[0][1])[0], expected)
    net.set_path(None)
    assert net(_x())["stage4"].shape == (2, 24, 4, 4)  # OS16: the last stage runs dilated


def test_ssdlite_tap_is_the_weighted_sum_of_the_candidates_expand_outputs():
    net = _net("ssdlite", temperature=0.9)
    with torch.no_grad():
        net.alpha["s4_first"].copy_(torch.tensor([[0.3, -0.2]]))
    captured = {}
    net.stages[4][0].register_forward_pre_hook(lambda m, args: captured.update(x=args[0]))
    feats = net(_x())
    w = torch.softmax(net.alpha["s4_first"][0] / 0.9, 0)
    hidden = sum(w[k] * op.expand(captured["x"]) for k, op in enumerate(net.stages[4][0].ops))
    torch.testing.assert_close(feats["expand4"], hidden)
    net.set_path([[0, 0], [0, 0], [0, 0], [1]])
    assert net(_x())["expand4"].shape == feats["expand4"].shape


def test_sampled_paths_follow_alpha_or_are_uniform():
    net = _net()
    with torch.no_grad():
        for a in net.arch_parameters():
            a.zero_()
            a[..., 1] = 20.0  # all mass on candidate 1
    gen = torch.Generator().manual_seed(0)
    assert net.sample_path(gen) == [[1, 1], [1, 1], [1, 1], [1]]
    uniform = {tuple(map(tuple, net.sample_path(gen, uniform=True))) for _ in range(20)}
    assert len(uniform) > 10
    with pytest.raises(SearchSpaceError):
        net.set_path([[9, 0], [0, 0], [0, 0], [0]])


def test_single_path_backward_leaves_unsampled_candidates_and_alpha_without_grad():
    net = _net()
    path = [[1, 4], [0, 2], [3, 1], [2]]  # stage 1 layer 1 is skip
    net.set_path(path)
    net(_x())["stage4"].square().mean().backward()
    assert all(a.grad is None for a in net.arch_parameters())
    for i, stage in enumerate(path, start=1):
        for j, k in enumerate(stage):
            for c, op in enumerate(net.stages[i][j].ops):
                assert all((p.grad is not None) == (c == k) for p in op.parameters()), (i, j, c)
    assert net.stem.conv.weight.grad is not None


def test_weighted_backward_reaches_alpha_and_every_candidate():
    net = _net()
    net(_x())["stage4"].square().mean().backward()
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in net.arch_parameters())
    assert all(p.grad is not None for p in net.weights())


def test_weights_and_arch_parameters_split_the_parameters():
    net = _net()
    ids = [id(p) for p in net.weights()] + [id(p) for p in net.arch_parameters()]
    assert sorted(ids) == sorted(id(p) for p in net.parameters())
    assert all(not op.depthwise.bn.affine for layers in net.stages[1:] for m in layers for op in m.ops)
    assert net.stem.bn.affine and net.stages[0][0].depthwise.bn.track_running_stats


def test_derive_takes_the_argmax_and_sorts_skips_to_the_stage_end():
    net = _net()
    with torch.no_grad():
        for a in net.arch_parameters():
            a.zero_()
        net.alpha["s1_first"][0, 3] = 1.0  # k5_e6
        net.alpha["s1_rest"][0, 4] = 1.0  # skip
        net.alpha["s2_first"][0, 0] = 1.0
        net.alpha["s2_rest"][0, 1] = 1.0
    arch = net.derive()
    assert [s.ops for s in arch.stages] == [("k3_e1",), ("k5_e6", "skip"), ("k3_e3", "k3_e6"), ("k3_e3", "k3_e3"),
                                            ("k3_e3",)]
    skip_first = net.path_arch([[0, 4], [0, 0], [0, 0], [0]])
    assert skip_first.stages[1].ops == ("k3_e3", "skip")


# -- remapping from the seed -------------------------------------------------------------------------

def test_every_candidate_of_a_layer_takes_the_same_seed_layer():
    seed = tiny_seed()
    net = _net()
    src = Backbone(seed.arch)
    src.load_state_dict(seed.backbone_state_dict())
    # stage 1 has 2 seed layers; stage 3 has 1, so its (extra) layer 1 copies seed layer 0
    for i, j, source in [(1, 1, 1), (3, 1, 0), (3, 0, 0)]:
        seed_dw = src.stages[i][source].depthwise.conv.weight
        seed_project = src.stages[i][source].project.conv.weight
        for op in net.stages[i][j].ops:
            dw, c = op.depthwise.conv.weight, op.depthwise.conv.weight.shape[0]
            k = op.op.kernel
            torch.testing.assert_close(dw[:, :, (k - 3) // 2:(k + 3) // 2, (k - 3) // 2:(k + 3) // 2],
                                       seed_dw[:c])
            torch.testing.assert_close(op.project.conv.weight, seed_project[:, :c])
    torch.testing.assert_close(net.stem.conv.weight, src.stem.conv.weight)
    torch.testing.assert_close(net.stages[0][0].depthwise.bn.running_var, src.stages[0][0].depthwise.bn.running_var)


REAL_TASKS = [("seg", "segmentation"), ("retinanet", "detection"), ("ssdlite", "detection")]
# Tap shapes on a 64x64 input, from SPEC §1-2: channels of the tapped stage (or 6x96 expand / 1280 final)
# at stride 8/16/32, the segmentation net dilated past stride 16.
REAL_TAP_SHAPES = {"seg": {"stage6": (320, 4)},
                   "retinanet": {"stage2": (32, 8), "stage4": (96, 4), "stage6": (320, 2)},
                   "ssdlite": {"expand5": (576, 4), "final": (1280, 2)}}


def _real_super_network(seed, task: str, space: str) -> SuperBackbone:
    spec = get_task(task)
    return SuperBackbone.from_seed(seed, SearchSpace.preset(space), spec.taps(seed.arch), spec.output_stride)


def _seed_path(net: SuperBackbone) -> list[list[int]]:
    """The seed's own ops in every searched layer, skip in the layers past the seed's depth."""
    return [[names.index(op) for op, names in zip(stage.ops + (SKIP,) * (len(layers) - len(stage.ops)), layers)]
            for stage, layers in zip(net.seed_arch.stages[1:], net.candidates)]


@pytest.mark.parametrize("task,space", REAL_TASKS)
def test_real_seed_super_network_on_the_seed_path_computes_the_seed(mbv2_seed, task, space):
    # Searched candidates have BN without affine parameters or running statistics (SPEC §2), so the
    # independent reference is the seed backbone itself with those BN layers at gamma 1, beta 0, both in
    # train mode (batch statistics). Everything else -- stem, first block, final conv, every searched
    # conv -- must be the seed's, at the task's taps and output stride.
    spec = get_task(task)
    net = _real_super_network(mbv2_seed, task, space).train()
    net.set_path(_seed_path(net))
    ref = Backbone(mbv2_seed.arch, taps=spec.taps(mbv2_seed.arch), output_stride=spec.output_stride)
    wanted = ref.state_dict()  # no final 1x1 conv unless it is tapped
    ref.load_state_dict({k: v for k, v in mbv2_seed.backbone_state_dict().items() if k in wanted})
    with torch.no_grad():
        for bn in (m for m in ref.stages[1:].modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.weight.fill_(1.0), bn.bias.zero_()
        x = _x()
        got, expected = net(x), ref.train()(x)
    assert list(got) == list(expected) == list(spec.taps(mbv2_seed.arch))
    for tap in got:
        torch.testing.assert_close(got[tap], expected[tap], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("task,space", REAL_TASKS)
def test_each_task_model_on_the_real_seed_super_network_gives_its_outputs(mbv2_seed, task, space):
    net = _real_super_network(mbv2_seed, task, space)
    with torch.no_grad():
        feats = net(_x())
    assert {t: (f.shape[1], f.shape[2]) for t, f in feats.items()} == REAL_TAP_SHAPES[task]
    assert all(f.shape[0] == 2 and f.shape[2] == f.shape[3] for f in feats.values())
    assert net.out_channels == {t: c for t, (c, _) in REAL_TAP_SHAPES[task].items()}
    sizes = {"seg": {}, "retinanet": {"min_size": SIZE, "max_size": SIZE}, "ssdlite": {"size": SIZE}}[task]
    model = get_task(task).head(net, 3, **sizes)
    if task == "seg":
        with torch.no_grad():
            assert model.eval()(_x()).shape == (2, 3, SIZE, SIZE)
        return
    images = list(torch.rand(2, 3, SIZE, SIZE))
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 48.0]]), "labels": torch.tensor([k])} for k in (0, 2)]
    losses = model.train()(images, targets)
    assert set(losses) == {"classification", "bbox_regression"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    with torch.no_grad():
        detections = model.eval()(images)
    assert len(detections) == 2
    for d in detections:
        assert set(d) == {"boxes", "scores", "labels"} and d["boxes"].shape == (len(d["scores"]), 4)
        assert ((d["labels"] >= 0) & (d["labels"] < 3)).all()


# -- cost tables ------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["seg", "retinanet", "ssdlite"])
def test_cost_table_of_a_path_plus_fixed_equals_the_counter_on_the_derived_net(task):
    net = _net(task)
    table = task_cost_table(task, net.seed_arch, net.space, (SIZE, SIZE), 3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        path = net.sample_path(gen, uniform=True)
        counted = model_cost(task, net.path_arch(path), (SIZE, SIZE), 3)
        assert table.path_cost(path) == counted.madds


@pytest.mark.parametrize("task,arch,madds", [("seg", "fna_deeplabv3", 24_174_895_104),
                                             ("retinanet", "fna_retinanet", 133_029_704_376),
                                             ("ssdlite", "fna_ssdlite", 880_333_504 + 206_040)])
def test_cost_table_reproduces_the_published_architectures_madds(task, arch, madds):
    # SSDLite: the paper's 880,333,504 plus the known difference of torchvision's predictor convs
    # (bias instead of BN; see fna.tasks.detection.SSDLite and tests/test_cost.py).
    space = SearchSpace.preset("segmentation" if task == "seg" else "detection")
    net = SuperBackbone(MBV2, space, get_task(task).taps(MBV2))
    table = task_cost_table(task, MBV2, space)
    assert table.path_cost(_path_of(net, BUILTIN_ARCHS[arch])) == madds


def _layer_grads(net: SuperBackbone) -> list[torch.Tensor]:
    rows = []
    for i, layers in enumerate(net.candidates, start=1):
        rows.append(net.alpha[f"s{i}_first"].grad[0])
        rows += list(net.alpha[f"s{i}_rest"].grad) if len(layers) > 1 else []
    return rows


def test_expected_cost_gradient_moves_alpha_toward_cheaper_ops():
    net = _net()
    table = task_cost_table("seg", net.seed_arch, net.space, (SIZE, SIZE), 3)
    opt = torch.optim.SGD(net.arch_parameters(), lr=50.0)
    before = float(table.expected(net.layer_probs()).detach())
    for step in range(20):
        opt.zero_grad()
        probs = net.layer_probs()
        (0.1 * torch.log10(table.expected(probs))).backward()  # the task loss is zero
        if step == 0:  # each op's gradient has the sign of (its cost - the layer's expected cost)
            flat_p = [p.detach() for s in probs for p in s]
            flat_c = [torch.tensor(c) for s in table.layers for c in s]
            for g, p, c in zip(_layer_grads(net), flat_p, flat_c):
                assert torch.equal(torch.sign(g), torch.sign(c - (p * c).sum()))
        opt.step()
    assert float(table.expected(net.layer_probs()).detach()) < before
    cheapest = [[min(range(len(c)), key=c.__getitem__) for c in stage] for stage in table.layers]
    assert net.argmax_path() == cheapest


def test_latency_table_loads_and_must_fit_the_space(tmp_path):
    net = _net()
    table = task_cost_table("seg", net.seed_arch, net.space, (SIZE, SIZE), 3)
    latency = CostTable("ms", 1.5, [[[0.1 * (k + 1) for k in range(len(c))] for c in s] for s in table.layers],
                        table.candidates)
    latency.save(tmp_path / "lat.json")
    loaded = CostTable.load(tmp_path / "lat.json")
    loaded.check_fits(net.candidates)
    assert loaded.path_cost([[0, 0], [0, 0], [0, 0], [0]]) == pytest.approx(1.5 + 7 * 0.1)
    other = SuperBackbone(tiny_seed().arch, tiny_space(allow_skip=False), ("stage4",))
    with pytest.raises(CostTableError):
        loaded.check_fits(other.candidates)
    (tmp_path / "bad.json").write_text('{"unit": "ms", "fixed": 1}')
    with pytest.raises(CostTableError, match="not a cost table"):
        CostTable.load(tmp_path / "bad.json")


def _hand_table() -> tuple[CostTable, list[list[list[float]]]]:
    """3 searched stages (2, 2, 1 layers; 3 candidates first, 4 after) with integer costs, and log-probs.

    Candidate ``k`` costs more and is more probable the larger ``k`` (the 0.7 step outweighs the < 0.3
    noise), so the most probable path is the most expensive one and a band below it forces a trade-off.
    Costs are integers and the most expensive path costs under 100, so ``best_path_within``'s bins
    (``high / 2000`` wide) never hold two different costs: the dynamic programme is then exact.
    """
    costs = [[[2, 3, 7], [0, 1, 4, 6]], [[3, 4, 9], [0, 2, 3, 8]], [[1, 5, 6]]]
    names = [[[f"op{k}" for k in range(len(layer))] for layer in stage] for stage in costs]
    gen = torch.Generator().manual_seed(3)
    logp = [[torch.log_softmax(0.7 * torch.arange(len(layer)) + 0.3 * torch.rand(len(layer), generator=gen), 0).tolist()
             for layer in stage] for stage in costs]
    return CostTable("madds", 5, [[[float(c) for c in layer] for layer in stage] for stage in costs], names), logp


def _brute_force_best(table: CostTable, logp, low: float, high: float) -> float | None:
    """Highest log-probability over every path whose cost lies in ``[low, high]`` (None: no such path)."""
    layers = [(c, lp) for sc, sl in zip(table.layers, logp) for c, lp in zip(sc, sl)]
    best = None
    for choice in itertools.product(*(range(len(c)) for c, _ in layers)):
        cost = table.fixed + sum(c[k] for (c, _), k in zip(layers, choice))
        if low <= cost <= high:
            score = sum(lp[k] for (_, lp), k in zip(layers, choice))
            best = score if best is None else max(best, score)
    return best


def _path_log_prob(path, logp) -> float:
    return sum(lp[k] for stage_p, stage_l in zip(path, logp) for k, lp in zip(stage_p, stage_l))


@pytest.mark.parametrize("band", ["cheapest", "lower third", "middle", "just below the top", "most expensive"])
def test_best_path_within_a_band_is_the_most_probable_path_inside_it(band):
    table, logp = _hand_table()
    lo, hi = table.bounds()
    assert (lo, hi) == (11, 41)
    low, high = {"cheapest": (lo, lo), "lower third": (lo, lo + 9), "middle": (23, 27),
                 "just below the top": (30, hi - 1), "most expensive": (hi, hi)}[band]
    path = best_path_within(table, logp, low, high)
    assert low <= table.path_cost(path) <= high
    assert _path_log_prob(path, logp) == pytest.approx(_brute_force_best(table, logp, low, high), abs=1e-9)


def test_unconstrained_most_probable_path_is_outside_the_lower_bands():
    table, logp = _hand_table()  # guards the test above: its bands below the top do force a trade-off
    argmax = [[max(range(len(lp)), key=lp.__getitem__) for lp in stage] for stage in logp]
    assert table.path_cost(argmax) == table.bounds()[1]


def test_band_without_any_path_gives_none():
    table, logp = _hand_table()
    lo, hi = table.bounds()
    assert best_path_within(table, logp, 0, lo - 1) is None
    assert best_path_within(table, logp, hi + 1, 2 * hi) is None


def test_best_path_within_a_band_of_a_task_cost_table_is_inside_it():
    net = _net()
    table = task_cost_table("seg", net.seed_arch, net.space, (SIZE, SIZE), 3)
    lo, hi = table.bounds()
    budget = (lo + hi) / 2
    logp = [[torch.log_softmax(torch.randn(len(c)), 0).tolist() for c in s] for s in table.layers]
    path = best_path_within(table, logp, 0.95 * budget, 1.05 * budget)
    assert 0.95 * budget <= table.path_cost(path) <= 1.05 * budget
    assert best_path_within(table, logp, 0, lo * 0.5) is None


@pytest.mark.parametrize("task", ["seg", "ssdlite"])
def test_recomputing_candidates_in_the_backward_gives_the_same_alpha_gradient(task, monkeypatch):
    from fna.supernet import MixedLayer

    torch.manual_seed(0)
    net = _net(task)
    model = get_task(task).head(net, 3, **({"size": SIZE} if task == "ssdlite" else {})).train()
    x = torch.randn(2, 3, SIZE, SIZE)
    for p in model.parameters():
        p.requires_grad_(p in set(net.arch_parameters()))
    grads = {}
    for recompute in (False, True):
        monkeypatch.setattr(MixedLayer, "recompute", recompute)
        net.set_path(None)
        net.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same dropout masks in the head both times
        out = model.dense_forward(x) if task == "ssdlite" else model(x)
        (sum(v.square().mean() for v in out.values()) if isinstance(out, dict) else out.square().mean()).backward()
        grads[recompute] = [a.grad.clone() for a in net.arch_parameters()]
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert any(bool(g.abs().sum() > 0) for g in grads[True])

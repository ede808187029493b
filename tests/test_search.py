"""The search loop: steps and their gradients, outputs, resume, budget, NaN stop, two-process torchrun."""

import json
from pathlib import Path

import pytest
import torch
from launch import torchrun
from search_helpers import SegData, seg_collate, tiny_seed, tiny_space, two_process_config

from fna.arch import load_arch
from fna.cost import CostTable
from fna.search import Search, SearchConfig, SearchError, memory, search

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(**overrides) -> SearchConfig:
    base = dict(space=tiny_space().to_dict(), num_classes=3, cost_size=(64, 64), epochs=2, arch_start_epoch=1,
                batch_size=2, lr=0.01, warmup_iters=0, progress=False, tensorboard=False, device="cpu")
    return SearchConfig.for_task("seg", **{**base, **overrides})


def _search(tmp_path: Path, data=None, **overrides) -> Search:
    return Search(_config(**overrides), data or SegData(8), seg_collate, tmp_path, seed=tiny_seed())


def test_task_defaults_follow_the_paper_and_overrides_are_checked():
    retina, ssd = SearchConfig.for_task("retinanet"), SearchConfig.for_task("ssdlite")
    assert (retina.epochs, retina.arch_start_epoch, retina.weight_steps_per_arch_step, retina.lam) == (14, 8, 1, 0.02)
    assert (retina.optimizer, retina.lr, retina.clip_grad) == ("sgd", 0.02, 35.0)
    assert (retina.schedule, retina.milestones, retina.warmup_iters, retina.warmup_factor) == \
        ("step", [8 / 14, 11 / 14], 500, 1 / 3)  # ×0.1 at epochs 8 and 11 of 14
    assert (ssd.epochs, ssd.arch_start_epoch, ssd.weight_steps_per_arch_step, ssd.lam) == (30, 15, 5, 0.15)
    assert (ssd.optimizer, ssd.lr, ssd.rmsprop_eps, ssd.temperature) == ("rmsprop", 0.05, 1.0, 0.9)
    assert (retina.arch_lr, retina.arch_betas, retina.arch_weight_decay) == (3e-4, (0.5, 0.999), 1e-3)
    assert SearchConfig.for_task("seg").space == "segmentation"
    with pytest.raises(SearchError, match="no_such_key"):
        SearchConfig.for_task("seg", no_such_key=1)
    with pytest.raises(SearchError, match="latency_table"):
        SearchConfig.for_task("seg", budget_latency_ms=3.0)


def test_weight_step_trains_only_the_sampled_path_and_arch_step_only_alpha(tmp_path):
    s = _search(tmp_path)
    batch = seg_collate([s.weight_set[i] for i in range(2)])
    s.weight_step(batch)
    assert all(a.grad is None for a in s.arch_params)
    path = s.backbone.path
    for i, stage in enumerate(path, start=1):
        for j, k in enumerate(stage):
            for c, op in enumerate(s.backbone.stages[i][j].ops):
                assert all((p.grad is not None) == (c == k) for p in op.parameters())
    before = [a.detach().clone() for a in s.arch_params]
    s.arch_step(batch)
    assert all(p.grad is None for p in s.weight_params)
    assert all(p.requires_grad for p in s.weight_params)
    assert all(a.grad is not None for a in s.arch_params)
    assert all(not torch.equal(a, b) for a, b in zip(s.arch_params, before))


def test_search_writes_the_derived_arch_cost_and_logs(tmp_path):
    result = search(_config(tensorboard=True), SegData(8), seg_collate, tmp_path, seed=tiny_seed())
    arch = load_arch(tmp_path / "arch.json")
    assert arch.stages == result.arch.stages
    assert load_arch(tmp_path / "arch.net_config.txt").stages == arch.stages
    info = json.loads((tmp_path / "arch.json").read_text())
    table = CostTable.load(tmp_path / "cost_table.json")
    assert info["cost"]["madds"] == table.path_cost(info["path"]) == result.cost["madds"]
    log = [json.loads(line) for line in (tmp_path / "search_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1]
    assert {"arch", "entropy", "skip_share", "expected_cost", "derived_cost"} <= set(log[-1])
    assert len(log[-1]["entropy"]) == 4 and len(log[-1]["entropy"][0]) == 2
    assert len(json.loads((tmp_path / "alpha_history.json").read_text())) == 2
    assert any((tmp_path / "tensorboard").iterdir())
    assert (tmp_path / "checkpoint.pt").is_file()


class _Interrupt(Exception):
    pass


def _stop_at(step: int):
    def hook(info: dict) -> None:
        if info["global_step"] == step:
            raise _Interrupt
    return hook


def test_interrupted_and_resumed_search_derives_the_same_arch_and_alpha(tmp_path):
    cfg = _config(epochs=3, checkpoint_every=1, weight_steps_per_arch_step=1)
    full = search(cfg, SegData(8), seg_collate, tmp_path / "full", seed=tiny_seed())
    with pytest.raises(_Interrupt):
        search(cfg, SegData(8), seg_collate, tmp_path / "cut", seed=tiny_seed(), on_step=_stop_at(3))
    resumed = search(cfg, SegData(8), seg_collate, tmp_path / "cut", resume=True, seed=tiny_seed())
    assert resumed.arch == full.arch
    assert resumed.alphas == full.alphas  # bit-identical
    full_log = (tmp_path / "full" / "search_log.jsonl").read_text()
    assert (tmp_path / "cut" / "search_log.jsonl").read_text() == full_log


def test_resume_before_the_first_checkpoint_starts_the_search_over(tmp_path):
    full = search(_config(), SegData(8), seg_collate, tmp_path / "full", seed=tiny_seed())
    with pytest.raises(_Interrupt):  # stopped in the first epoch: nothing checkpointed yet
        search(_config(), SegData(8), seg_collate, tmp_path / "cut", seed=tiny_seed(), on_step=_stop_at(1))
    assert not (tmp_path / "cut" / "checkpoint.pt").exists()
    resumed = search(_config(), SegData(8), seg_collate, tmp_path / "cut", resume=True, seed=tiny_seed())
    assert resumed.alphas == full.alphas
    assert (tmp_path / "cut" / "search_log.jsonl").read_text() == (tmp_path / "full" / "search_log.jsonl").read_text()


def test_a_directory_holding_a_search_is_refused_without_resume(tmp_path):
    search(_config(), SegData(8), seg_collate, tmp_path, seed=tiny_seed())
    arch = (tmp_path / "arch.json").read_text()
    with pytest.raises(SearchError, match="already holds a search; pass --resume"):
        search(_config(lam=0.5), SegData(8), seg_collate, tmp_path, seed=tiny_seed())
    assert (tmp_path / "arch.json").read_text() == arch


def test_resume_applies_a_new_learning_rate_at_the_same_point_of_the_schedule(tmp_path):
    cfg = _config(epochs=3, schedule="poly")
    with pytest.raises(_Interrupt):
        search(cfg, SegData(8), seg_collate, tmp_path, seed=tiny_seed(), on_step=_stop_at(3))
    resumed = Search(_config(epochs=3, schedule="poly", lr=0.001), SegData(8), seg_collate, tmp_path,
                     resume=True, seed=tiny_seed())
    total = 3 * resumed.iters_per_epoch  # poly over the whole search: (1 - step / total) ^ 0.9
    assert resumed.opt_w.param_groups[0]["lr"] == pytest.approx(0.001 * (1 - resumed.global_step / total) ** 0.9)
    resumed.run()
    assert resumed.global_step == 6


def test_budget_search_lands_within_five_percent_and_records_lambda(tmp_path):
    table = _search(tmp_path / "probe").table
    lo, hi = table.bounds()
    budget = lo + 0.3 * (hi - lo)
    result = search(_config(epochs=3, arch_start_epoch=1, budget_madds=budget, arch_lr=0.05),
                    SegData(8), seg_collate, tmp_path / "run", seed=tiny_seed())
    assert abs(result.cost["madds"] / budget - 1) <= 0.05
    assert len(result.lambdas) == 4  # one per architecture step
    assert json.loads((tmp_path / "run" / "lambda.json").read_text())[0]["lambda"] == result.lambdas[0]


@pytest.mark.parametrize("factor,match", [(0.5, "below the smallest"), (2.0, "above the largest")])
def test_impossible_budget_is_a_clear_error_up_front(tmp_path, factor, match):
    lo, hi = _search(tmp_path / "probe").table.bounds()
    with pytest.raises(SearchError, match=match):
        _search(tmp_path / "run", budget_madds=(lo if factor < 1 else hi) * factor)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path):
    data = SegData(8)

    def poison(info: dict) -> None:
        if info["global_step"] == 2:  # end of epoch 0: its checkpoint is written
            data.poison = True

    with pytest.raises(SearchError, match="loss is nan; the last checkpoint .* holds finite weights"):
        search(_config(epochs=3), data, seg_collate, tmp_path, seed=tiny_seed(), on_step=poison)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["position"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_a_diverging_search_stops_with_a_clear_error(tmp_path):
    with pytest.raises(SearchError, match="stopped at epoch .*: the weight-step loss diverged"):
        search(_config(epochs=12, lr=1e4, clip_grad=1.0), SegData(8), seg_collate, tmp_path,
               seed=tiny_seed())


def test_two_process_torchrun_derives_the_same_alpha_and_arch_on_both_ranks(tmp_path):
    torchrun("search_worker.py", str(tmp_path))
    debug = tmp_path / "debug"
    a0, a1 = (torch.load(debug / f"alpha_rank{r}.pt") for r in (0, 1))
    assert a0.keys() == a1.keys() and all(torch.equal(a0[k], a1[k]) for k in a0)
    assert any(not torch.equal(a0[k], torch.zeros_like(a0[k])) for k in a0)
    assert (debug / "arch_rank0.json").read_text() == (debug / "arch_rank1.json").read_text()
    assert (tmp_path / "arch.json").is_file()


def test_two_processes_find_the_architecture_one_process_finds_at_the_same_total_batch(tmp_path):
    # BN statistics are gathered over both processes, so the two runs compute the same numbers up to
    # float summation order (which Adam's first steps on near-cancelling α gradients amplify); the
    # head's dropout is off: its masks are drawn per process
    overrides = {"model_kwargs": {"dropout": 0.0}, "arch_lr": 0.05}
    torchrun("search_worker.py", str(tmp_path / "two"), json.dumps(overrides))
    search(two_process_config(**overrides), SegData(16), seg_collate, tmp_path / "one", seed=tiny_seed())
    two, one = (torch.load(tmp_path / run / "debug" / "alpha_rank0.pt") for run in ("two", "one"))
    gap = max(float((two[k] - one[k]).detach().abs().max()) for k in one)
    moved = max(float(one[k].detach().abs().max()) for k in one)  # from ~1e-3 at the start
    assert moved > 0.05 and gap < 0.01 * moved, (gap, moved)  # per-process BN: gap 0.2
    assert load_arch(tmp_path / "two" / "arch.json") == load_arch(tmp_path / "one" / "arch.json")


def test_the_cost_term_sums_only_the_searched_layers_candidates(tmp_path):
    s = _search(tmp_path)
    with torch.no_grad():
        for a in s.arch_params:
            a.zero_()  # uniform α: C is the sum of each searched layer's mean candidate cost
    mean_costs = sum(sum(c) / len(c) for stage in s.table.layers for c in stage)
    with torch.no_grad():
        assert float(s.searched_cost()) == pytest.approx(mean_costs * 1e-9, rel=1e-6)  # float32 α
        assert float(s.expected_cost()) == pytest.approx((mean_costs + s.table.fixed) * 1e-9, rel=1e-6)
    assert s.table.fixed > 0.2 * mean_costs  # so the two really differ here


def test_single_paths_are_sampled_from_softmax_alpha_without_the_mixed_forwards_temperature():
    from fna.supernet import SuperBackbone

    net = SuperBackbone(tiny_seed().arch, tiny_space(), ("stage4",), temperature=0.9)
    with torch.no_grad():
        for a in net.arch_parameters():
            a.zero_()
            a[..., 0] = 2.0
    gen = torch.Generator().manual_seed(0)
    first = [net.sample_path(gen)[0][0] for _ in range(4000)]
    share = first.count(0) / len(first)
    plain, tempered = (float(torch.softmax(torch.tensor([2.0, 0, 0, 0]) / t, 0)[0]) for t in (1.0, 0.9))
    assert abs(share - plain) < 0.022 < abs(share - tempered)  # 0.711 vs 0.755; 4000 draws: std ≈ 0.007
    assert float(net.layer_probs()[0][0][0].detach()) == pytest.approx(tempered)  # the mixed forward keeps T


def test_ssdlite_search_schedule_is_the_papers():
    ssd = SearchConfig.for_task("ssdlite")
    assert (ssd.schedule, ssd.milestones, ssd.warmup_iters, ssd.warmup_factor, ssd.gamma) == \
        ("step", [18 / 30, 25 / 30, 28 / 30], 500, 1 / 3, 0.1)


class _Tagged(torch.utils.data.Dataset):
    """SegData whose images say which pipeline produced them (+1000: augmented)."""

    def __init__(self, augmented: bool) -> None:
        self.data, self.augmented = SegData(8), augmented

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        image, mask = self.data[i]
        return image + (1000.0 if self.augmented else 0.0), mask


@pytest.mark.parametrize("augment,weights_aug,arch_aug", [("arch", False, True), ("weights", True, False),
                                                          ("both", True, True), ("none", False, False)])
def test_the_config_says_which_half_gets_the_augmented_pipeline(augment, weights_aug, arch_aug, tmp_path):
    s = Search(_config(augment=augment), _Tagged(True), seg_collate, tmp_path, seed=tiny_seed(),
               plain_dataset=_Tagged(False))
    assert (float(s.weight_set[0][0].mean()) > 500) == weights_aug
    assert (float(s.arch_set[0][0].mean()) > 500) == arch_aug
    assert SearchConfig.for_task("seg").augment == "arch"  # the original code's default


def test_every_search_writes_diagnostics_that_agree_with_its_layers(tmp_path):
    search(_config(epochs=4), SegData(8), seg_collate, tmp_path, seed=tiny_seed())
    d = json.loads((tmp_path / "diagnostics.json").read_text())
    assert d["arch_steps"] == 6 and len(d["layers"]) == 7
    tested = [layer for layer in d["layers"] if layer["significant"] is not None]
    assert d["decided_fraction"] == sum(layer["significant"] for layer in tested) / len(tested)
    assert all(0 <= layer["alpha_entropy"] <= 1 and 0 <= layer["decision_margin"] <= 1 for layer in d["layers"])
    state = d["supernet_at_arch_start"]
    assert state["epoch"] == 1 and state["score_name"] == "pixel accuracy" and 0 <= state["trivial_score"] <= 1
    assert d["summary"].startswith("The search decided")


def test_seed_path_epochs_train_the_seeds_own_path_then_uniform_paths(tmp_path):
    s = _search(tmp_path, epochs=3, arch_start_epoch=2, seed_path_epochs=1)
    seed_path = s.backbone.arch_path(tiny_seed().arch)
    batch = seg_collate([s.weight_set[i] for i in range(2)])
    s.weight_step(batch)
    assert s.backbone.path == seed_path
    for i, stage in enumerate(seed_path, start=1):  # only the seed's candidates were trained
        for j, k in enumerate(stage):
            for c, op in enumerate(s.backbone.stages[i][j].ops):
                assert all((p.grad is not None) == (c == k) for p in op.parameters())
    s.epoch = 1  # after the seed-path epochs: uniform paths, as without them
    paths = []
    for _ in range(6):
        s.weight_step(batch)
        paths.append(s.backbone.path)
    assert any(p != seed_path for p in paths)
    with pytest.raises(SearchError, match="seed_path_epochs"):
        _config(seed_path_epochs=2, arch_start_epoch=1)


def test_measuring_step_memory_leaves_the_search_as_it_was(tmp_path):
    s = _search(tmp_path)
    before = {k: v.clone() for k, v in s.model.state_dict().items()}
    rng = torch.get_rng_state()
    peaks = memory.step_peaks(s, 2)
    assert all(torch.equal(v, before[k]) for k, v in s.model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng) and s.backbone.path is None
    assert all(p.grad is None for p in s.model.parameters())
    assert peaks["arch"] > 0 and peaks["weight"] > 0


def test_the_batch_probe_finds_the_largest_batch_under_a_memory_limit(tmp_path):
    s = _search(tmp_path)
    at = {n: max(memory.step_peaks(s, n).values()) for n in (2, 4, 5)}  # the larger of the two steps
    assert at[5] > at[4]  # memory grows with the batch
    assert memory.largest_batch(s, (at[4] + at[5]) // 2, most=16) == 4
    assert memory.largest_batch(s, at[2] - 1, most=16) == 0


def test_bf16_and_channels_last_are_cuda_only_and_change_nothing_on_cpu(tmp_path):
    from fna.training import channels_last

    cfg = _config()
    assert (cfg.amp, cfg.channels_last) == (True, True)
    assert channels_last(torch.device("cuda", 0), cfg) and not channels_last(torch.device("cpu"), cfg)
    batch = seg_collate([SegData(4)[i] for i in range(2)])
    losses = []
    for fast in (True, False):
        s = _search(tmp_path / str(fast), amp=fast, channels_last=fast)
        losses.append((s.arch_step(batch), s.weight_step(batch), [a.detach().clone() for a in s.arch_params]))
    (arch_a, weight_a, alpha_a), (arch_b, weight_b, alpha_b) = losses
    assert arch_a == arch_b and weight_a == weight_b
    assert all(torch.equal(a, b) for a, b in zip(alpha_a, alpha_b))

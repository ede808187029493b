"""Latency tables, the additive predictor, latency-budgeted search and the Pareto set (issue 8).

Tiny seed and space at tiny input sizes with few repeats: these tests check structure and arithmetic,
never how long anything takes.
"""

import json
import math
import random

import pytest
import torch
from search_helpers import SegData, seg_collate, tiny_seed, tiny_seed_arch, tiny_space

from fna.arch import SKIP, get_arch, save_arch
from fna.cost import CostTable, CostTableError, model_cost
from fna.latency import (LatencyError, LatencySettings, build_table, check, entry_name, predict,
                         write_to_summary)
from fna.pareto import pareto_search
from fna.remap import remap_seed
from fna.search import Search, SearchConfig, SearchError, search
from fna.tasks import get_task

FAST = dict(warmup=1, repeats=3)


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny convolutions run faster on one thread on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def settings(tmp_path) -> LatencySettings:
    save_arch(tiny_seed_arch(), tmp_path / "tiny.json")
    return LatencySettings("seg", (32, 32), "cpu", "torch", 1, tiny_space().to_dict(), str(tmp_path / "tiny.json"), 3)


@pytest.fixture
def lut(tmp_path, settings):
    build_table(settings, tmp_path / "lut.json", **FAST)
    return tmp_path / "lut.json"


def _candidate_names(settings: LatencySettings) -> list[str]:
    return [entry_name(i, j, op) for i, layers in enumerate(tiny_space().candidates(tiny_seed_arch()), start=1)
            for j, names in enumerate(layers) for op in names if op != SKIP]


def test_table_holds_every_candidate_and_fixed_part_with_median_spread_and_metadata(lut, settings):
    d = json.loads(lut.read_text())
    assert d["complete"] and d["unit"] == "ms"
    assert set(d["entries"]) == {"overhead", "stem", "head", *_candidate_names(settings)}  # seg taps no final conv
    for entry in d["entries"].values():
        assert entry["median_ms"] > 0 and entry["iqr_ms"] >= 0 and entry["repeats"] == 3
    assert d["entries"]["s1.l0.k3_e3"]["input_shapes"] == [[1, 8, 16, 16]]  # after stem (s2) and first block
    assert d["entries"]["s4.l0.k5_e6"]["input_shapes"] == [[1, 16, 2, 2]]  # OS16: the last stage is dilated
    assert d["settings"]["threads"] == 1 and d["settings"]["backend"] == "torch" and d["settings"]["size"] == [32, 32]
    assert d["environment"]["torch"] == torch.__version__ and d["environment"]["device_name"]


def test_cost_table_load_reads_the_built_table(lut):
    table = CostTable.load(lut)
    entries = json.loads(lut.read_text())["entries"]
    overhead = entries["overhead"]["median_ms"]
    assert table.unit == "ms"
    assert table.candidates == [[list(n) for n in layers] for layers in tiny_space().candidates(tiny_seed_arch())]
    assert table.fixed == pytest.approx(overhead + sum(max(entries[p]["median_ms"] - overhead, 0)
                                                       for p in ("stem", "head")))
    assert table.layers[0][1][-1] == 0.0  # skip
    assert table.layers[1][0][2] == pytest.approx(max(entries["s2.l0.k5_e3"]["median_ms"] - overhead, 0))


def test_interrupted_build_resumes_with_only_the_missing_entries(tmp_path, settings):
    out = tmp_path / "partial.json"
    first = build_table(settings, out, limit=4, **FAST)
    assert not first.complete and len(first.entries) == 4
    assert json.loads(out.read_text())["complete"] is False
    with pytest.raises(CostTableError, match="partial latency table"):
        CostTable.load(out)
    measured = []
    full = build_table(settings, out, resume=True, on_entry=lambda name, entry: measured.append(name), **FAST)
    assert set(measured) == set(full.expected) - set(first.entries)
    assert not set(measured) & set(first.entries)
    assert full.complete and set(json.loads(out.read_text())["entries"]) == set(full.expected)


def test_resume_with_other_settings_or_without_a_table_is_a_clear_error(tmp_path, settings):
    out = tmp_path / "partial.json"
    build_table(settings, out, limit=1, **FAST)
    other = LatencySettings(**{**settings.__dict__, "threads": 2})
    with pytest.raises(LatencyError, match="other settings.*threads"):
        build_table(other, out, **FAST)
    with pytest.raises(LatencyError, match="no table to resume"):
        build_table(settings, tmp_path / "none.json", resume=True, **FAST)


def test_predictor_is_the_table_sum_of_the_chosen_ops(lut):
    d = json.loads(lut.read_text())
    entries, overhead = d["entries"], d["entries"]["overhead"]["median_ms"]
    rng = random.Random(0)
    ops = [[rng.choice(names) for names in layers] for layers in d["candidates"]]
    arch = tiny_seed_arch().with_ops(ops).canonical()
    by_hand = overhead + sum(entries[p]["median_ms"] - overhead for p in ("stem", "head"))
    by_hand += sum(entries[entry_name(i, j, op)]["median_ms"] - overhead
                   for i, stage in enumerate(arch.stages[1:], start=1) for j, op in enumerate(stage.ops) if op != SKIP)
    assert predict(CostTable.load(lut), arch) == pytest.approx(by_hand)


def test_arch_outside_the_table_space_is_rejected(lut):
    wide = tiny_seed_arch().with_ops([["k7_e6", "k3_e6"], ["k3_e6", "k3_e6"], ["k3_e6"], ["k3_e6"]])
    with pytest.raises(LatencyError, match="k7_e6 is not a candidate"):
        predict(CostTable.load(lut), wide)


def test_check_measures_end_to_end_and_writes_the_run_summary(lut, tmp_path):
    result = check(lut, tiny_seed_arch(), "seg", 3, **FAST)
    assert result.predicted_ms == pytest.approx(predict(CostTable.load(lut), tiny_seed_arch()))
    assert result.measured_ms > 0 and result.error == pytest.approx(result.predicted_ms / result.measured_ms - 1)
    with pytest.raises(LatencyError, match="task seg, not ssdlite"):
        check(lut, tiny_seed_arch(), "ssdlite", **FAST)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text(json.dumps({"task": "seg"}))
    summary = json.loads(write_to_summary(tmp_path / "run", result, lut).read_text())
    assert summary["latency_ms"] == pytest.approx(result.measured_ms, rel=1e-3)
    assert summary["latency_predicted_ms"] == pytest.approx(result.predicted_ms, rel=1e-3)


def _config(**overrides) -> SearchConfig:
    base = dict(space=tiny_space().to_dict(), num_classes=3, cost_size=(32, 32), epochs=3, arch_start_epoch=1,
                batch_size=2, lr=0.01, warmup_iters=0, progress=False, tensorboard=False, device="cpu", arch_lr=0.05)
    return SearchConfig.for_task("seg", **{**base, **overrides})


def test_search_with_a_built_latency_table_meets_the_latency_budget(lut, tmp_path):
    # The budget is the measured cost of one real path (a random one), so its band holds an architecture
    # whatever latencies this machine measured.
    table = CostTable.load(lut)
    gen = random.Random(0)
    budget = table.path_cost([[gen.randrange(len(c)) for c in stage] for stage in table.candidates])
    result = search(_config(latency_table=str(lut), budget_latency_ms=budget), SegData(8, 32), seg_collate,
                    tmp_path / "run", seed=tiny_seed())
    assert result.cost["table_unit"] == "ms"
    assert abs(result.cost["table_cost"] / budget - 1) <= 0.05
    assert predict(CostTable.load(lut), result.arch) == pytest.approx(result.cost["table_cost"])


def test_search_rejects_a_latency_table_of_another_task(tmp_path):
    save_arch(tiny_seed_arch(), tmp_path / "tiny.json")
    other = LatencySettings("retinanet", (64, 64), "cpu", "torch", 1, tiny_space().to_dict(),
                            str(tmp_path / "tiny.json"), 3)
    build_table(other, tmp_path / "det.json", **FAST)
    with pytest.raises(SearchError, match="task retinanet, not seg"):
        Search(_config(latency_table=str(tmp_path / "det.json")), SegData(8, 32), seg_collate, tmp_path / "run",
               seed=tiny_seed())


def _disjoint_budgets(lo: float, hi: float, tol: float, n: int) -> list[float]:
    """``n`` budgets inside ``[lo, hi]`` whose ``±tol`` bands do not overlap (each 1.5 bands above the last)."""
    budgets = [lo * (1 + 1.5 * tol)]
    for _ in range(n - 1):
        budgets.append(budgets[-1] * (1 + 1.5 * tol) / (1 - 1.5 * tol))
    assert budgets[-1] * (1 + tol) <= hi, "the test space is too narrow for disjoint budget bands"
    assert all(a * (1 + tol) < b * (1 - tol) for a, b in zip(budgets, budgets[1:]))
    return budgets


def test_pareto_set_from_one_warmup_has_increasing_costs_and_trainable_archs(tmp_path):
    # Budgets whose tolerance bands overlap may rightly derive one architecture for two budgets; with
    # disjoint bands every derived net lies in its own band, so the costs must be distinct.
    tol = 0.02
    config = _config(budget_tolerance=tol)
    probe = Search(config, SegData(8, 32), seg_collate, tmp_path / "probe", seed=tiny_seed()).table
    budgets = _disjoint_budgets(*probe.bounds(), tol, 3)
    specs = [str(budgets[i]) for i in (2, 0, 1)]  # any order
    points = pareto_search(config, specs, SegData(8, 32), seg_collate, SegData(4, 32, seed=1), tmp_path / "run",
                           seed=tiny_seed(), calib_batches=2)
    assert [p.budget for p in points] == budgets
    costs = [p.cost for p in points]
    assert all(abs(p.cost / p.budget - 1) <= tol for p in points)
    assert costs == sorted(costs) and len(set(costs)) == 3
    saved = json.loads((tmp_path / "run" / "pareto" / "pareto.json").read_text())
    assert [p["cost"] for p in saved["points"]] == costs and saved["unit"] == "madds"
    assert all(p["metric_name"] == "mIoU" for p in saved["points"])
    assert (tmp_path / "run" / "pareto" / "pareto.png").stat().st_size > 0
    warm_log = (tmp_path / "run" / "warmup" / "search_log.jsonl").read_text().splitlines()
    assert len(warm_log) == 1  # the warm-up ran once, shared by every branch
    for point in points:  # each written architecture file is one a user can fine-tune
        arch = get_arch(point.arch_file)
        assert arch.stages == point.arch.stages
        assert model_cost("seg", arch, (32, 32), 3).madds == point.cost
        backbone, _ = remap_seed(tiny_seed(), arch, get_task("seg").taps(arch), get_task("seg").output_stride)
        model = get_task("seg").head(backbone, 3)
        labels = torch.tensor([0, 1, 2, 1])  # one class per image, its colour says which
        images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 0.1
        images += (labels[:, None, None, None] - 1).float() * torch.ones(3, 1, 1)
        batch = images, labels[:, None, None].expand(4, 32, 32).clone()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        losses = []
        for _ in range(10):  # a net that trains drives the loss on one fixed batch down
            loss = get_task("seg").loss(model.train(), batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.5 * losses[0]

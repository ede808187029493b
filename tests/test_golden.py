"""Golden runs: a tiny fixed-seed search + fine-tune per task must keep giving the recorded architecture,
α, losses, metric and weights. Refactors must not change what the method computes; a change that means to
(the search's loss, its sampling) re-records the values and says why in its commit.

The recorded numbers come from one CPU; another CPU (or another thread count) rounds differently in the
last bits, and a tiny search amplifies that: α's first Adam step is ``lr·sign(g)`` per element, so α
compares equal only where no element of its gradient lies within the rounding noise. The settings are
chosen so that it does, and the tolerances are ≥10× what 1 vs 2 threads moves (measured, see ROBUST):

- batch 4, not 2: at batch 2, BN over the few values of DeepLabv3's ASPP pooling branch (1×1 per image)
  and of SSDLite's last extra blocks turns rounding into a different α (Δα 0.1 between 1 and 2 threads);
  at batch 4 seg and RetinaNet move α by ~1e-6 and the weights by ~1e-6 relative.
- SSDLite stays chaotic at any size and batch we tried, also in float64: its hard-negative mining picks
  among (near-)tied negatives, so its first weight gradient differs by ~1e-3 between thread counts and
  flips the sign of α's small elements. Its golden compares the search's losses and the metric, which
  are smooth in the weights, and not α, the architecture or the weights.

The metric after 3 fine-tuning steps is close to the trivial predictor's (segmentation: one class
everywhere; detection: AP ≈ 0): it pins the evaluation path and the weights it is computed from, not
how well the model learns (the demo's recorded results in docs/demo.md speak to that).

To re-record: ``FNA_RECORD_GOLDEN=1 python -m pytest tests/test_golden.py -s`` and paste the printed dict.
"""

import json
import os

import pytest
import torch

from fna.data.demo import write_demo
from fna.pipeline import load_config, run

SEARCH = ["search.epochs=2", "search.arch_start_epoch=1", "search.batch_size=4", "search.warmup_iters=0",
          "search.arch_lr=0.05", "search.progress=false", "search.tensorboard=false", "search.space.name=tiny",
          "search.space.stages=" + "[" + ",".join(["{max_depth: 2, kernels: [3, 5], expansions: [3, 6]}"] * 5)
          + ",{max_depth: 1, kernels: [3, 5], expansions: [3, 6]}]"]
FINETUNE = ["finetune.iters=3", "finetune.batch_size=4", "finetune.optimizer=adamw", "finetune.lr=0.001"]
SIZE = {"seg": "size=[48,48]", "retinanet": "size=[64,64]", "ssdlite": "size=[64,64]"}

ALPHA_TOL = 1e-4
LOSS_REL = {"seg": 1e-4, "retinanet": 1e-4, "ssdlite": 1e-2}
# what each task's golden can pin across CPUs: everything, or the smooth quantities only (docstring)
ROBUST = {"seg": "all", "retinanet": "all", "ssdlite": "losses"}
GOLDEN: dict = {}  # recorded below


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden")
    write_demo(root, n_train=8, n_val=2, size=64, seed=3)
    return root


def _record(run_dir) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    alpha = json.loads((run_dir / "search" / "alpha_history.json").read_text())[-1]["alpha"]
    log = [json.loads(line) for line in (run_dir / "search" / "search_log.jsonl").read_text().splitlines()]
    weights = torch.load(run_dir / "model.fna.pt", weights_only=True)["state_dict"]
    return {"ops": [s["ops"] for s in summary["arch"]["stages"]], "metric": summary["metric"],
            "alpha": {k: [[round(v, 6) for v in row] for row in rows] for k, rows in alpha.items()},
            "losses": [e["weight_loss"] for e in log] + [e["arch_loss"] for e in log if e["arch_loss"] is not None],
            "weights_abs_sum": sum(float(t.double().abs().sum()) for t in weights.values() if t.is_floating_point())}


@pytest.mark.parametrize("task", ["seg", "retinanet", "ssdlite"])
def test_tiny_fixed_seed_run_gives_the_recorded_result(task, data, tmp_path, mbv2_seed, one_thread):
    fmt = "folder" if task == "seg" else "coco"
    cfg = load_config(None, [SIZE[task], *SEARCH, *FINETUNE], task=task, data={"root": str(data), "format": fmt})
    run(cfg, tmp_path / "run")
    got = _record(tmp_path / "run")
    if os.environ.get("FNA_RECORD_GOLDEN"):
        print(f"\nGOLDEN[{task!r}] = {got!r}")
        return
    want = GOLDEN[task]
    assert got["losses"] == pytest.approx(want["losses"], rel=LOSS_REL[task])
    assert got["metric"] == pytest.approx(want["metric"], abs=5e-3)
    if ROBUST[task] != "all":
        return
    for name, rows in want["alpha"].items():
        assert len(got["alpha"][name]) == len(rows), name
        for got_row, row in zip(got["alpha"][name], rows):
            assert got_row == pytest.approx(row, abs=ALPHA_TOL), name
    margins = [sorted(row)[-1] - sorted(row)[-2] for rows in want["alpha"].values() for row in rows]
    if min(margins) > 2 * ALPHA_TOL:  # otherwise a near-tie could flip on another CPU; α above pins it
        assert got["ops"] == want["ops"]
    assert got["weights_abs_sum"] == pytest.approx(want["weights_abs_sum"], rel=1e-4)


# Recorded on a 2-core AMD EPYC (CPU, 1 thread), torch 2.14.1. Re-recorded at batch 4 (see the docstring:
# at batch 2 one CPU's result did not hold on another), with the search's per-epoch losses, and after every
# sample's random transforms got a stream of their own, seeded by (seed, epoch, index), so that they run
# in the DataLoader workers (issue 14). seg re-recorded once more (2026-12-03, same machine; 2 threads
# pass it) when the search's weight half got a random stream apart from the arch half's: its un-augmented
# pipeline still crops at random, and sample k of both halves had drawn the same crop.
GOLDEN['seg'] = {'ops': [['k3_e1'], ['k5_e6', 'k5_e3'], ['k3_e3', 'skip'], ['k3_e6', 'skip'], ['k3_e6', 'k5_e6'], ['k5_e3', 'k3_e6'], ['k3_e6']], 'metric': 0.20684814453125, 'alpha': {'s1_first': [[-0.050143, 0.048062, -0.049579, 0.050053]], 's1_rest': [[0.050048, -0.050539, 0.050641, -0.050853, 0.049702]], 's2_first': [[0.05073, -0.048661, 0.050244, -0.051202]], 's2_rest': [[0.048795, -0.051431, -0.053399, -0.051076, 0.049891]], 's3_first': [[-0.051619, 0.051185, -0.050426, 0.049342]], 's3_rest': [[-0.05021, -0.049121, -0.05041, -0.050638, 0.048317]], 's4_first': [[-0.049281, 0.051089, -0.049794, 0.050563]], 's4_rest': [[-0.04809, 0.050755, -0.049781, 0.052266, 0.04983]], 's5_first': [[0.050308, -0.04912, 0.050686, -0.049909]], 's5_rest': [[-0.049619, 0.051422, -0.051538, 0.050171, 0.04893]], 's6_first': [[-0.050218, 0.048952, -0.050031, 0.048114]]}, 'losses': [1.795960783958435, 1.661766529083252, 1.6317009925842285], 'weights_abs_sum': 106262.89493911325}
GOLDEN['retinanet'] = {'ops': [['k3_e1'], ['k5_e3', 'k5_e3'], ['k3_e3', 'skip'], ['k3_e6', 'k3_e6'], ['k3_e3', 'k5_e6'], ['k5_e3', 'k3_e6'], ['k3_e6']], 'metric': 0.0, 'alpha': {'s1_first': [[0.049856, -0.051938, 0.050421, -0.049947]], 's1_rest': [[0.050047, -0.050538, 0.050641, -0.050853, 0.049702]], 's2_first': [[0.050728, -0.048658, 0.05024, -0.0512]], 's2_rest': [[0.048805, -0.051432, 0.046578, -0.051076, 0.049888]], 's3_first': [[-0.051618, 0.051184, -0.050426, 0.049341]], 's3_rest': [[-0.05021, 0.050875, -0.05041, 0.049357, 0.048317]], 's4_first': [[0.050716, -0.048907, 0.050202, -0.049434]], 's4_rest': [[-0.048089, 0.050753, -0.04978, 0.052263, 0.049829]], 's5_first': [[0.050295, -0.049106, 0.050672, -0.049897]], 's5_rest': [[-0.049592, 0.051415, -0.051515, 0.050162, -0.051063]], 's6_first': [[-0.05021, 0.048945, -0.050023, 0.048105]]}, 'losses': [2.254951000213623, 2.2266879081726074, 2.607374668121338], 'weights_abs_sum': 151271.82324107533}
GOLDEN['ssdlite'] = {'ops': [['k3_e1'], ['k5_e3', 'k5_e3'], ['k5_e3', 'skip'], ['k3_e6', 'k5_e6'], ['k5_e3', 'k3_e3'], ['k5_e6', 'k3_e6'], ['k3_e3']], 'metric': 0.0017723474475107087, 'alpha': {'s1_first': [[-0.050237, -0.049538, 0.050191, -0.049074]], 's1_rest': [[0.050771, -0.04994, 0.051327, -0.050517, 0.04834]], 's2_first': [[-0.048952, -0.050317, 0.052915, -0.050835]], 's2_rest': [[-0.050963, -0.051336, -0.05017, 0.048919, 0.050891]], 's3_first': [[-0.05031, 0.051567, -0.049578, 0.050116]], 's3_rest': [[-0.049869, 0.050413, -0.053512, 0.052153, -0.050184]], 's4_first': [[0.048764, -0.047933, 0.050411, -0.051028]], 's4_rest': [[0.050521, -0.052782, 0.049627, -0.050817, -0.049482]], 's5_first': [[-0.049082, 0.050482]], 's5_rest': [[-0.04991, 0.050366, 0.050044, 0.049184, -0.050508]], 's6_first': [[0.051194, -0.049876, 0.050115, -0.050878]]}, 'losses': [12.053529739379883, 9.594959259033203, 16.881202697753906], 'weights_abs_sum': 121674.65486143179}

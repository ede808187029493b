"""Golden runs: a tiny fixed-seed search + fine-tune per task must keep giving the recorded architecture,
α, metric and weights. Refactors must not change what the method computes; a change that means to
(the search's loss, its sampling) re-records the values and says why in its commit.

The recorded numbers come from one CPU; on another, float rounding differs in the last bits, so α,
metric and weights compare with tolerances far above rounding and far below what any behaviour
change moves, and the recorded architectures have a clear margin in α (checked below).

To re-record: ``FNA_RECORD_GOLDEN=1 python -m pytest tests/test_golden.py -s`` and paste the printed dict.
"""

import json
import os

import pytest
import torch

from fna.data.demo import write_demo
from fna.pipeline import load_config, run

SEARCH = ["search.epochs=2", "search.arch_start_epoch=1", "search.batch_size=2", "search.warmup_iters=0",
          "search.arch_lr=0.05", "search.progress=false", "search.tensorboard=false", "search.space.name=tiny",
          "search.space.stages=" + "[" + ",".join(["{max_depth: 2, kernels: [3, 5], expansions: [3, 6]}"] * 5)
          + ",{max_depth: 1, kernels: [3, 5], expansions: [3, 6]}]"]
FINETUNE = ["finetune.iters=3", "finetune.batch_size=2", "finetune.optimizer=adamw", "finetune.lr=0.001"]
SIZE = {"seg": "size=[48,48]", "retinanet": "size=[64,64]", "ssdlite": "size=[64,64]"}

ALPHA_TOL = 1e-4
GOLDEN: dict = {}  # recorded below


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden")
    write_demo(root, n_train=8, n_val=2, size=64, seed=3)
    return root


def _record(run_dir) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    alpha = json.loads((run_dir / "search" / "alpha_history.json").read_text())[-1]["alpha"]
    weights = torch.load(run_dir / "model.fna.pt", weights_only=True)["state_dict"]
    return {"ops": [s["ops"] for s in summary["arch"]["stages"]], "metric": summary["metric"],
            "alpha": {k: [[round(v, 6) for v in row] for row in rows] for k, rows in alpha.items()},
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
    for name, rows in want["alpha"].items():
        assert len(got["alpha"][name]) == len(rows), name
        for got_row, row in zip(got["alpha"][name], rows):
            assert got_row == pytest.approx(row, abs=ALPHA_TOL), name
    margins = [sorted(row)[-1] - sorted(row)[-2] for rows in want["alpha"].values() for row in rows]
    if min(margins) > 2 * ALPHA_TOL:  # otherwise a near-tie could flip on another CPU; α above pins it
        assert got["ops"] == want["ops"]
    assert got["metric"] == pytest.approx(want["metric"], abs=5e-3)
    assert got["weights_abs_sum"] == pytest.approx(want["weights_abs_sum"], rel=1e-4)


# Recorded on a 2-core AMD EPYC (CPU, 1 thread), torch 2.14.1, before issue 13's refactor.
GOLDEN['seg'] = {'ops': [['k3_e1'], ['k3_e3', 'k3_e6'], ['k3_e6', 'k3_e3'], ['k3_e3', 'skip'], ['k3_e3', 'skip'], ['k5_e3', 'skip'], ['k3_e6']], 'metric': 0.20684814453125, 'alpha': {'s1_first': [[0.039054, -0.047999, 0.037922, -0.032543]], 's1_rest': [[-0.013774, 0.014634, -0.013497, 0.013297, -0.020579]], 's2_first': [[-0.017041, 0.023326, -0.013694, 0.006218]], 's2_rest': [[0.075465, -0.03366, 0.074708, -0.034806, -0.102753]], 's3_first': [[0.063747, -0.062918, 0.062794, -0.065139]], 's3_rest': [[0.096869, -0.097421, 0.096662, -0.099155, 0.098542]], 's4_first': [[0.008062, -0.006147, 0.007531, -0.006869]], 's4_rest': [[-0.044753, 0.031447, -0.046296, 0.032834, 0.077664]], 's5_first': [[0.100805, -0.099453, 0.101132, -0.100515]], 's5_rest': [[-0.053216, 0.022481, -0.056499, 0.019999, 0.101137]], 's6_first': [[-0.006725, 0.005496, -0.006264, 0.00432]]}, 'weights_abs_sum': 87238.0385261564}
GOLDEN['retinanet'] = {'ops': [['k3_e1'], ['k3_e3', 'k5_e3'], ['k3_e6', 'k3_e3'], ['k3_e6', 'k3_e3'], ['k3_e6', 'k3_e3'], ['k3_e6', 'k3_e6'], ['k3_e6']], 'metric': 0.004351874628456634, 'alpha': {'s1_first': [[0.024937, -0.026457, 0.024624, -0.024692]], 's1_rest': [[0.006899, -0.00732, 0.007321, -0.007636, 0.006495]], 's2_first': [[-0.090929, 0.092862, -0.091253, 0.090429]], 's2_rest': [[0.10139, -0.104041, 0.099166, -0.103713, -0.102572]], 's3_first': [[-0.066211, 0.06575, -0.06493, 0.063953]], 's3_rest': [[0.073241, -0.073028, 0.073041, -0.074455, 0.069136]], 's4_first': [[-0.098369, 0.100214, -0.098881, 0.099611]], 's4_rest': [[0.04445, -0.022873, 0.04254, -0.021433, -0.093596]], 's5_first': [[-0.004295, 0.005201, -0.003949, 0.004867]], 's5_rest': [[0.042469, 0.104111, 0.041459, 0.102861, -0.081142]], 's6_first': [[-0.016418, 0.014995, -0.014835, 0.014451]]}, 'weights_abs_sum': 154725.88519845429}
GOLDEN['ssdlite'] = {'ops': [['k3_e1'], ['k5_e3', 'k5_e3'], ['k5_e3', 'skip'], ['k5_e3', 'k3_e6'], ['k5_e3', 'k3_e3'], ['k3_e6', 'k3_e3'], ['k3_e6']], 'metric': 0.005958433681205958, 'alpha': {'s1_first': [[-0.050237, -0.049538, 0.050191, -0.049074]], 's1_rest': [[-0.049229, -0.04994, 0.051327, 0.049483, 0.04834]], 's2_first': [[-0.048952, -0.050317, 0.052915, -0.050835]], 's2_rest': [[-0.050963, -0.051336, 0.04983, -0.051081, 0.050891]], 's3_first': [[0.04969, -0.048433, 0.050422, 0.050116]], 's3_rest': [[0.050131, 0.050413, 0.046488, -0.047847, 0.049816]], 's4_first': [[0.048764, -0.047933, 0.050411, 0.048972]], 's4_rest': [[0.050521, 0.047218, -0.050373, 0.049183, -0.049482]], 's5_first': [[0.050918, -0.049518]], 's5_rest': [[0.05009, -0.049634, 0.050044, -0.050816, -0.050508]], 's6_first': [[-0.048806, 0.050124, 0.050115, 0.049122]]}, 'weights_abs_sum': 124311.87797334237}

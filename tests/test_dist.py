"""BatchNorm over processes: two gloo processes on halves of a batch compute what one does on all of it."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from bn_worker import batch, bn_net, step

TESTS = Path(__file__).parent


def torchrun(script: str, *args: str) -> None:
    """Run ``script`` (in tests/) under ``torchrun --nproc_per_node=2`` on CPU; fail with its stderr."""
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "FNA_NUM_WORKERS": "0"}
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node=2",
           str(TESTS / script), *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


def test_two_processes_batch_norm_the_whole_batch_as_one_process_does(tmp_path):
    torchrun("bn_worker.py", str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    x, w = batch()
    want = step(bn_net(), x, w)
    assert torch.allclose(torch.cat([r["y"] for r in ranks]), want["y"], atol=1e-5)
    # each rank's loss is the mean over its half: twice the share of the whole batch's mean
    assert torch.allclose(torch.cat([r["dx"] for r in ranks]) / 2, want["dx"], atol=1e-6)
    for key in want:
        if key.startswith("grad.") or "running" in key:
            assert torch.allclose(ranks[0][key], want[key], atol=1e-5), key
            assert torch.equal(ranks[0][key], ranks[1][key]), key

"""BatchNorm over processes: two gloo processes on halves of a batch compute what one does on all of it."""

import torch
from bn_worker import batch, bn_net, step
from launch import torchrun


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

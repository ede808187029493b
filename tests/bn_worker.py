"""Run by ``torchrun --nproc_per_node=2`` in tests/test_dist.py: a BN network's step on this rank's half."""

import sys

import torch
from torch import nn

from fna.dist import Processes


def bn_net() -> nn.Module:
    """conv → affine BN with running statistics → ReLU → conv → BN without either (a candidate's)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 1),
                        nn.BatchNorm2d(5, affine=False, track_running_stats=False))
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.normal_()
    return net


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The whole batch (8 images) and the fixed weighting that makes the loss."""
    g = torch.Generator().manual_seed(3)
    return 2 * torch.randn(8, 3, 6, 6, generator=g) + 1, torch.randn(8, 5, 4, 4, generator=g)


def step(net: nn.Module, x: torch.Tensor, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output, input gradient, parameter gradients and running statistics of one training step."""
    x = x.clone().requires_grad_(True)
    y = net(x)
    (y * w).mean().backward()
    return {"y": y.detach(), "dx": x.grad, **{f"grad.{k}": p.grad for k, p in net.named_parameters()},
            **{k: v for k, v in net.state_dict().items() if "running" in k}}


if __name__ == "__main__":
    procs = Processes("cpu")
    net = procs.sync_batch_norm(bn_net())
    x, w = batch()
    half = slice(4 * procs.rank, 4 * procs.rank + 4)
    out = step(net, x[half], w[half])
    procs.average_grads(list(net.parameters()))
    out.update({f"grad.{k}": p.grad for k, p in net.named_parameters()})
    torch.save(out, f"{sys.argv[1]}/rank{procs.rank}.pt")
    procs.close()

"""Multi-process helpers: ``torchrun`` sets RANK/WORLD_SIZE; without it everything is single-process.

BatchNorm over processes (:meth:`Processes.sync_batch_norm`): with the total batch split over ranks,
each BN would otherwise normalise by its own rank's share, so the numbers a run computes — and the
architecture a search finds — would change with the number of processes. On CUDA torch's
``SyncBatchNorm`` gathers the statistics; on CPU (gloo), which it does not support,
:class:`GlobalBatchNorm2d` does the same with two all-reduces per BN (statistics forward, gradient
sums backward).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def init_from_env(device: torch.device) -> tuple[int, int]:
    """Join the process group ``torchrun`` describes (gloo on CPU, nccl on CUDA); ``(rank, world)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)  # nccl binds each rank to its own GPU
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    """Wait for every process (no-op when single-process)."""
    if dist.is_initialized():
        dist.barrier()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → this rank's CUDA device when there is one, else CPU; ``cuda`` → this rank's CUDA device."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":  # under torchrun every process gets the GPU of its LOCAL_RANK
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def any_true(flag: bool, device: torch.device) -> bool:
    """True on every process if ``flag`` is true on any (so all stop together)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class Processes:
    """This process's place in a ``torchrun`` launch (or a single process), for a training loop.

    Creating it resolves the device (on CUDA: TF32 allowed for float32 matmuls, as for convolutions)
    and joins the process group; :meth:`close` leaves it only if this object created it (a pipeline
    that joined first keeps it across its phases).
    """

    def __init__(self, device: str = "auto") -> None:
        self.device = resolve_device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.set_float32_matmul_precision("high")  # TF32 matmuls where the GPU has them (convs: by default)
        created = not dist.is_initialized()
        self.rank, self.world = init_from_env(self.device)
        self.owns_group = created and dist.is_initialized()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def average_grads(self, params: list[torch.nn.Parameter]) -> None:
        """All-reduce (mean) the gradients that exist; every rank must have the same set."""
        grads = [p.grad for p in params if p.grad is not None]
        if self.world == 1 or not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any."""
        return any_true(flag, self.device)

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the ranks."""
        if self.world == 1:
            return value
        t = torch.tensor([value], device=self.device, dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Make every rank start from rank 0's parameters and buffers."""
        if self.world > 1:
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, 0)

    def gather(self, obj: object) -> list[object]:
        """``obj`` of every rank, in rank order."""
        if self.world == 1:
            return [obj]
        out: list[object] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def sync_batch_norm(self, model: nn.Module) -> nn.Module:
        """``model`` with every BatchNorm computing its statistics over all processes (when there are
        several): torch's ``SyncBatchNorm`` on CUDA, :class:`GlobalBatchNorm2d` elsewhere."""
        if self.world == 1:
            return model
        if self.device.type == "cuda":
            return nn.SyncBatchNorm.convert_sync_batchnorm(model)
        for m in model.modules():
            if type(m) is nn.BatchNorm2d:
                m.__class__ = GlobalBatchNorm2d  # same parameters, buffers and state-dict keys
        return model

    def close(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()
            self.owns_group = False


class _GlobalBatchStats(torch.autograd.Function):
    """Batch normalisation with the mean and variance of the whole batch over every process (NCHW)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        dims = [d for d in range(x.dim()) if d != 1]
        count = torch.tensor([x.numel() // x.shape[1]], dtype=torch.float64, device=x.device)
        sums = torch.cat([x.sum(dims, dtype=torch.float64), (x.double() ** 2).sum(dims), count])
        dist.all_reduce(sums)
        c = x.shape[1]
        n = sums[-1]
        mean = sums[:c] / n
        var = (sums[c:2 * c] / n - mean ** 2).clamp_min(0)
        shape = [1, c] + [1] * (x.dim() - 2)
        shift, invstd = mean.to(x.dtype), (var + eps).rsqrt().to(x.dtype)
        xhat = (x - shift.view(shape)) * invstd.view(shape)
        ctx.save_for_backward(x, shift, invstd, weight)  # not xhat: it may be the output, changed in place
        ctx.count, ctx.has_bias = float(n), bias is not None
        ctx.mark_non_differentiable(mean, var, n)
        y = xhat if weight is None else xhat * weight.view(shape)
        y = y if bias is None else y + bias.view(shape)
        return y, mean, var, n

    @staticmethod
    def backward(ctx, dy: torch.Tensor, *_: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, shift, invstd, weight = ctx.saved_tensors
        dims = [d for d in range(dy.dim()) if d != 1]
        shape = [1, dy.shape[1]] + [1] * (dy.dim() - 2)
        xhat = (x - shift.view(shape)) * invstd.view(shape)
        sum_dy, sum_dy_xhat = dy.sum(dims), (dy * xhat).sum(dims)
        local = (sum_dy_xhat, sum_dy)  # the parameters' gradients: this rank's, averaged later like all others
        total = torch.cat([sum_dy, sum_dy_xhat])
        dist.all_reduce(total)
        c = dy.shape[1]
        scale = invstd if weight is None else invstd * weight
        dx = scale.view(shape) * (dy - (total[:c] / ctx.count).view(shape)
                                  - xhat * (total[c:] / ctx.count).view(shape))
        return (dx, local[0] if weight is not None else None, local[1] if ctx.has_bias else None, None)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training-mode statistics are those of the whole batch over every process
    of the default group (the running statistics too); without a group it is ``BatchNorm2d``.
    :meth:`Processes.sync_batch_norm` turns a model's ``BatchNorm2d`` into it in place."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:  # as SyncBatchNorm: only training batches are gathered
            return super().forward(x)
        y, mean, var, n = _GlobalBatchStats.apply(x, self.weight, self.bias, self.eps)
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            with torch.no_grad():
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_((var * n / (n - 1)).to(self.running_var.dtype), factor)
        return y

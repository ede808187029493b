"""Multi-process helpers: ``torchrun`` sets RANK/WORLD_SIZE; without it everything is single-process."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


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

    :meth:`start` resolves the device and joins the process group; :meth:`close` leaves it only if
    this object created it (a pipeline that joined first keeps it across its phases).
    """

    def __init__(self, device: str = "auto") -> None:
        self.device = resolve_device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
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

    def close(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()
            self.owns_group = False

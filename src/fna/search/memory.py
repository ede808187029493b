"""Memory of the search's two steps: the peak printed before a search starts, and the largest batch
whose two steps both fit (the architecture step runs every candidate, but with ``arch_recompute`` it
keeps less than a weight step on the costliest path, so both are measured).

A measurement runs the step's forward and backward on a batch of the architecture half at the given
batch per process, with the gradients returned instead of stored; the global RNG, the path and the
BatchNorm statistics are put back afterwards, so measuring does not change the search. Peak memory is
the highest live tensor memory above what was live before: ``torch.cuda.max_memory_allocated`` on
CUDA, the torch profiler's allocation events elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import default_collate

from fna.checkpoint import rng_state, set_rng_state
from fna.search.config import SearchError

if TYPE_CHECKING:
    from fna.search.loop import Search

GIB = 2 ** 30


def peak_bytes(step: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated during ``step()`` above what was live before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # Each operator's own allocations minus frees (its children are their own events: counting
    # ``cpu_memory_usage``, which includes them, would count nested calls several times).
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def step_peaks(search: Search, per_rank: int, steps: tuple[str, ...] = ("arch", "weight")) -> dict[str, int]:
    """Peak bytes of the ``steps`` at ``per_rank`` images per process, the search left as it was:
    ``arch`` the architecture step, ``weight`` a weight step on the costliest path (every layer's most
    expensive candidate)."""
    model, backbone = search.model, search.backbone
    saved_rng, saved_path = rng_state(), backbone.path
    saved_buffers = {k: v.clone() for k, v in model.named_buffers()}
    items = [search.arch_set[i % len(search.arch_set)] for i in range(per_rank)]
    batch = (search.collate_fn or default_collate)(items)
    costliest = [[max(range(len(c)), key=c.__getitem__) for c in stage] for stage in search.table.layers]
    weights = [p for p in search.weight_params if p.requires_grad]

    def arch() -> None:
        backbone.set_path(None)
        for p in weights:
            p.requires_grad_(False)
        try:
            torch.autograd.grad(search.task_loss(batch), search.arch_params, allow_unused=True)
        finally:
            for p in weights:
                p.requires_grad_(True)

    def weight() -> None:
        backbone.set_path(costliest)
        torch.autograd.grad(search.task_loss(batch), weights, allow_unused=True)

    model.train()
    try:
        return {name: peak_bytes({"arch": arch, "weight": weight}[name], search.dist.device) for name in steps}
    finally:
        backbone.set_path(saved_path)
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(saved_buffers[k])
        set_rng_state(saved_rng)


def model_bytes(search: Search) -> int:
    """Bytes the super network's parameters and buffers hold (gradients and optimiser state come on top)."""
    return sum(t.numel() * t.element_size() for t in [*search.model.parameters(), *search.model.buffers()])


def describe(search: Search, peaks: dict[str, int]) -> str:
    """One line: the steps' peaks at the search's batch and the weights they come on top of."""
    return (f"estimated peak memory per process at batch {search.per_rank} per process "
            f"(total {search.cfg.batch_size}): architecture step {peaks['arch'] / GIB:.2f} GiB, weight step "
            f"{peaks['weight'] / GIB:.2f} GiB, on top of {model_bytes(search) / GIB:.2f} GiB of weights (plus their "
            "gradients and optimiser state)")


def fits(search: Search, per_rank: int, limit: int) -> bool:
    """Whether both steps at ``per_rank`` images per process stay within ``limit`` bytes on every process
    (a CUDA out-of-memory error counts as not fitting)."""
    try:
        ok = max(step_peaks(search, per_rank).values()) <= limit
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        ok = False
    return not search.dist.any(not ok)


def largest_batch(search: Search, limit: int, most: int = 4096) -> int:
    """The largest total batch (a multiple of the number of processes) whose steps fit
    ``limit`` bytes per process: doubling from 2 per process, then bisecting; 0 if 2 does not fit.

    BatchNorm needs 2 images per process, so 2 is the smallest batch tried; ``most`` bounds the search.
    """
    lo, hi = 0, 2
    while hi <= most and fits(search, hi, limit):
        lo, hi = hi, hi * 2
    hi = min(hi, most + 1)
    while hi - lo > 1 and lo:  # lo fits, hi does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(search, mid, limit) else (lo, mid)
    return lo * search.dist.world


def memory_limit(search: Search, limit_gib: float | None) -> int:
    """The probe's limit in bytes: ``limit_gib``, else on CUDA the device's free memory; CPU needs one."""
    if limit_gib is not None:
        return math.floor(limit_gib * GIB)
    if search.dist.device.type != "cuda":
        raise SearchError("probing the largest batch on a CPU needs a memory limit (--memory-limit-gib)")
    return torch.cuda.mem_get_info(search.dist.device)[0]

"""A search's checkpoint: everything needed to continue it exactly (weights, optimisers, α, data
positions, λ, logs, RNGs), written only from finite, healthy states."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fna.checkpoint import load_checkpoint, rng_state, save_atomic, set_rng_state
from fna.search.config import SearchError
from fna.training import non_finite, scheduler_at

if TYPE_CHECKING:
    from fna.search.loop import Search


def save(search: Search) -> None:
    """Checkpoint ``search`` (rank 0 writes); non-finite weights stop it, a runaway loss skips the write."""
    bad = non_finite(search.model)
    if bad:
        raise search.stopped(f"the weights became non-finite ({', '.join(bad[:3])})")
    if search.epoch < search.cfg.epochs and not all(g.healthy() for g in search.guards.values()):
        return  # a loss that has run away: keep the last good checkpoint
    if not search.dist.main:
        return
    save_atomic({
        "config": search.cfg.model_dump(), "model": search.model.state_dict(),
        "opt_w": search.opt_w.state_dict(), "opt_a": search.opt_a.state_dict(),
        "position": {"epoch": search.epoch, "step": search.step, "global_step": search.global_step,
                     "arch_batches": search.arch_batches},
        "split": {"weights": search.weight_idx, "arch": search.arch_idx},
        "lam": search.lam, "lambdas": search.lambdas, "alpha_history": search.alpha_history, "log": search.log,
        "epoch_losses": search.epoch_losses, "guards": {k: g.state_dict() for k, g in search.guards.items()},
        "grad_stats": search.grad_stats.state_dict(), "supernet_at_arch_start": search.supernet_at_arch_start,
        "rng": rng_state(), "path_rng": search.path_gen.get_state(),
    }, search.ckpt_path)


def load(search: Search) -> None:
    """Continue ``search`` from its checkpoint, with the config's learning rates from there on."""
    state = load_checkpoint(search.ckpt_path)
    if state["split"] != {"weights": search.weight_idx, "arch": search.arch_idx}:
        raise SearchError(f"{search.ckpt_path}: the checkpoint was made on different data (the split differs)")
    cfg = search.cfg
    search.model.load_state_dict(state["model"])
    search.opt_w.load_state_dict(state["opt_w"])
    search.opt_a.load_state_dict(state["opt_a"])
    for group in search.opt_a.param_groups:
        group["lr"] = cfg.arch_lr
    pos = state["position"]
    search.epoch, search.step, search.global_step = pos["epoch"], pos["step"], pos["global_step"]
    search.arch_batches = pos["arch_batches"]
    search.sched_w = scheduler_at(search.opt_w, cfg, cfg.epochs * search.iters_per_epoch, search.global_step)
    search.lam, search.lambdas = state["lam"], state["lambdas"]
    search.alpha_history, search.log = state["alpha_history"], state["log"]
    search.epoch_losses = state["epoch_losses"]
    for kind, guard_state in state["guards"].items():
        search.guards[kind].load_state_dict(guard_state)
    search.grad_stats.load_state_dict(state["grad_stats"])
    search.supernet_at_arch_start = state["supernet_at_arch_start"]
    set_rng_state(state["rng"])
    search.path_gen.set_state(state["path_rng"])

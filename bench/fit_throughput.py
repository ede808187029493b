"""Throughput of our fine-tuning loop (``fna.train.fit``) against a plain torchvision-style loop.

Same model (the task's model on the seed's architecture, remapped), same data (the demo data written
at ``--size``, with the task's training augmentation), same batch, optimiser and number of steps. The
plain loop is what a torchvision reference script does per step: a shuffled ``DataLoader`` (same
``num_workers``), forward, loss, ``zero_grad``, ``backward``, ``step``, scheduler step. ``fit`` adds
its guard (loss and gradient finiteness checks), gradient clipping, progress, TensorBoard scalars,
resumable data order and its final checkpoint.

Two rates per loop, both as images/s: the *steady state*, from the end of step ``log_every + 1`` to
the end of the last step (what a long run sees: loader start-up, the first steps and the final
checkpoint left out; ``fit``'s progress callback marks its steps), and the *whole call*, start-up and
final checkpoint included (what ``--iters`` steps cost). The loops alternate ``--rounds`` times, so
background load hits them alike; medians, with ratios to the plain loop (goal: ≥ 1.0). ``--compile``
adds ``fit`` with ``finetune.compile=true`` (``torch.compile``; its first round, which compiles, is
the warm-up round and not counted).

    python bench/fit_throughput.py --task seg --size 96 --batch 8 --iters 60 --rounds 3 [--compile]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from torch.utils.data import DataLoader, Dataset

from fna.arch import BUILTIN_ARCHS
from fna.data.demo import write_demo
from fna.pipeline import load_config, prepare
from fna.remap import remap_seed
from fna.tasks import Task
from fna.train import TrainConfig, fit
from fna.training import make_optimizer, make_scheduler, num_workers, to_device


def plain_loop(model: torch.nn.Module, task: Task, dataset: Dataset, collate: Callable, cfg: TrainConfig,
               device: torch.device) -> tuple[float, dict[int, float]]:
    """``cfg.iters`` steps of a plain training loop: its start time and the end time of every step."""
    workers = num_workers(cfg.num_workers)
    t0 = time.perf_counter()
    loader = DataLoader(dataset, cfg.batch_size, shuffle=True, collate_fn=collate, drop_last=True,
                        num_workers=workers, persistent_workers=workers > 0)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    scheduler = make_scheduler(optimizer, cfg, cfg.iters)
    model.to(device).train()
    steps: dict[int, float] = {}
    while len(steps) < cfg.iters:
        for batch in loader:
            loss = task.loss(model, to_device(batch, device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            steps[len(steps) + 1] = time.perf_counter()
            if len(steps) == cfg.iters:
                break
    return t0, steps


def rates(start: float, steps: dict[int, float], end: float, batch: int, first: int,
          iters: int) -> tuple[float, float]:
    """(steady-state, whole-call) images/s of a call from ``start`` to ``end`` whose steps ended at
    ``steps[step]``: the steady state runs from the end of step ``first`` to the end of step ``iters``."""
    return batch * (iters - first) / (steps[iters] - steps[first]), batch * iters / (end - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="seg", choices=["seg", "retinanet", "ssdlite"])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true", help="also time fit with torch.compile")
    args = ap.parse_args()
    size = [args.size, args.size] if args.task != "retinanet" else [args.size, args.size * 3 // 2]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        write_demo(root, n_train=4 * args.batch, n_val=2, size=args.size, seed=0)
        fmt = "folder" if args.task == "seg" else "coco"
        cfg = load_config(None, [f"size={size}", f"finetune.iters={args.iters}", f"finetune.batch_size={args.batch}",
                                 "finetune.checkpoint_every=0", f"device={args.device}"], task=args.task,
                          data={"root": str(root), "format": fmt}, arch="mobilenet_v2")
        plan = prepare(cfg, Console(quiet=True))
        train_cfg = plan.train_cfg
        device = torch.device(args.device)
        arch = BUILTIN_ARCHS["mobilenet_v2"]

        def model() -> torch.nn.Module:
            torch.manual_seed(0)
            backbone, _ = remap_seed(plan.seed, arch, cfg.spec.taps(arch), cfg.spec.output_stride)
            return cfg.spec.head(backbone, len(plan.class_names), **cfg.model_kwargs())

        fits = {"fit": train_cfg} | ({"fit, compiled": train_cfg.model_copy(update={"compile": True})}
                                     if args.compile else {})
        first = train_cfg.log_every + 1  # fit reports steps 1, log_every + 1, 2 log_every + 1, ..., iters
        if args.iters <= first:
            raise SystemExit(f"--iters must exceed {first} for a steady-state rate")
        measured: dict[str, list[tuple[float, float]]] = {"plain": []} | {name: [] for name in fits}
        for r in range(args.rounds + 1):  # the first round warms up
            start, steps = plain_loop(model(), cfg.spec, plan.train_set, plan.collate, train_cfg, device)
            if r:
                measured["plain"].append(rates(start, steps, steps[args.iters], args.batch, first, args.iters))
            for name, fit_cfg in fits.items():
                steps = {}
                start = time.perf_counter()
                fit(model(), cfg.spec, plan.train_set, plan.collate, fit_cfg, Path(tmp) / f"{name}{r}",
                    progress=lambda it, loss: steps.__setitem__(it, time.perf_counter()))
                end = time.perf_counter()
                if r:
                    measured[name].append(rates(start, steps, end, args.batch, first, args.iters))
    steady = {k: statistics.median(v[0] for v in vs) for k, vs in measured.items()}
    whole = {k: statistics.median(v[1] for v in vs) for k, vs in measured.items()}
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, device {args.device}")
    print(f"task {args.task}, input {'x'.join(map(str, size))}, batch {args.batch}, {args.iters} steps, "
          f"num_workers {num_workers(train_cfg.num_workers)}, steady state from step {first}")
    print(f"plain loop: steady {steady['plain']:.2f} images/s, whole call {whole['plain']:.2f} images/s")
    for name in fits:
        print(f"fna {name}: steady {steady[name]:.2f} images/s ({steady[name] / steady['plain']:.3f} x plain, "
              f"goal >= 1.0), whole call {whole[name]:.2f} images/s ({whole[name] / whole['plain']:.3f} x plain)")


if __name__ == "__main__":
    main()

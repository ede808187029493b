"""Throughput of our fine-tuning loop (``fna.train.fit``) against a plain torchvision-style loop.

Same model (the task's model on the seed's architecture, remapped), same data (the demo data written
at ``--size``), same batch, optimiser and number of steps. The plain loop is what a torchvision
reference script does per step: a shuffled ``DataLoader`` (same ``num_workers``), forward, loss,
``zero_grad``, ``backward``, ``step``, scheduler step. ``fit`` adds its guard (loss and gradient
finiteness checks), gradient clipping, progress, resumable data order and its final checkpoint.
The two alternate ``--rounds`` times, so background load hits both alike; the median images/s of
each is printed with their ratio (goal: ``fit`` ≥ the plain loop, ratio ≥ 1.0).

    python bench/fit_throughput.py --task seg --size 128 --batch 8 --iters 20 --rounds 3
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
               device: torch.device) -> float:
    """Seconds for ``cfg.iters`` steps of a plain training loop."""
    workers = num_workers(cfg.num_workers)
    loader = DataLoader(dataset, cfg.batch_size, shuffle=True, collate_fn=collate, drop_last=True,
                        num_workers=workers, persistent_workers=workers > 0)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    scheduler = make_scheduler(optimizer, cfg, cfg.iters)
    model.to(device).train()
    t0, done = time.perf_counter(), 0
    while done < cfg.iters:
        for batch in loader:
            loss = task.loss(model, to_device(batch, device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            done += 1
            if done == cfg.iters:
                break
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="seg", choices=["seg", "retinanet", "ssdlite"])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
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

        times: dict[str, list[float]] = {"fit": [], "plain": []}
        for r in range(args.rounds + 1):  # the first round warms up
            t = plain_loop(model(), cfg.spec, plan.train_set, plan.collate, train_cfg, device)
            if r:
                times["plain"].append(t)
            t0 = time.perf_counter()
            fit(model(), cfg.spec, plan.train_set, plan.collate, train_cfg, Path(tmp) / f"fit{r}")
            if r:
                times["fit"].append(time.perf_counter() - t0)
    ips = {k: args.iters * args.batch / statistics.median(v) for k, v in times.items()}
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, device {args.device}")
    print(f"task {args.task}, input {'x'.join(map(str, size))}, batch {args.batch}, {args.iters} steps, "
          f"num_workers {num_workers(train_cfg.num_workers)}")
    print(f"plain loop: {ips['plain']:.2f} images/s; fna fit: {ips['fit']:.2f} images/s; "
          f"fit / plain: {ips['fit'] / ips['plain']:.3f} (goal >= 1.0)")


if __name__ == "__main__":
    main()

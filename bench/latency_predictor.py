"""Latency predictor accuracy on CPU, and a latency-budgeted search checked by measurement (issue 8).

1. Builds (or continues) a latency table for ``--task`` at ``--size`` (MobileNetV2 seed, the task's
   search space, random weights: speed does not depend on their values).
2. Draws ``--archs`` random architectures of the space (seeded) and prints the table's prediction vs the
   measured end-to-end latency (``dense_forward``, same backend and threads), with the relative error.
3. With ``--search``: runs a short search on the built-in demo data with the table and a latency budget
   in the middle of the space's range, then measures the derived network against the budget.

    python bench/latency_predictor.py --task ssdlite --size 320 320 --threads 1 --search
"""

from __future__ import annotations

import argparse
import platform
import random
import tempfile
from pathlib import Path

import torch

from fna.arch import BUILTIN_ARCHS
from fna.seeds import random_mobilenet_v2
from fna.cost import CostTable
from fna.latency import (DenseModel, LatencySettings, TorchThreads, build_table, make_runner, measure_arch, predict,
                         time_runners)
from fna.tasks import build_model


def random_archs(table: CostTable, n: int, seed: int) -> list:
    """``n`` architectures with one uniformly drawn candidate per searched layer."""
    rng = random.Random(seed)
    base = BUILTIN_ARCHS["mobilenet_v2"]
    return [base.with_ops([[rng.choice(names) for names in layers] for layers in table.candidates]).canonical()
            for _ in range(n)]


def budget_search(lut: Path, settings: LatencySettings, budget: float, work: Path) -> tuple:
    """A short search with ``budget`` ms on demo data; returns (table cost, derived arch).

    The demo has few classes; the searched layers' latency does not depend on them, and the derived
    net is measured as the table's model (with the table's class count), which the budget is about.
    """
    from fna.data import det_collate, open_detection, ssdlite_train_transforms
    from fna.data.demo import write_demo
    from fna.search import SearchConfig, search

    write_demo(work / "data", 8, 2, 128, 0)
    dataset = open_detection(work / "data", "coco", "train", ssdlite_train_transforms(settings.size[0]))
    cfg = SearchConfig.for_task("ssdlite", num_classes=len(dataset.class_names), epochs=2, arch_start_epoch=1,
                                weight_steps_per_arch_step=1, batch_size=2, arch_lr=0.05, device="cpu",
                                model_kwargs={"size": settings.size[0]}, latency_table=str(lut),
                                budget_latency_ms=budget, progress=False, tensorboard=False)
    result = search(cfg, dataset, det_collate, work / "search", seed=random_mobilenet_v2())
    return result.cost["table_cost"], result.arch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="ssdlite")
    p.add_argument("--size", type=int, nargs=2, default=(320, 320))
    p.add_argument("--backend", default="torch")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--e2e-repeats", type=int, default=60)
    p.add_argument("--archs", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lut", type=Path, default=Path("bench/out/lut.json"))
    p.add_argument("--search", action="store_true", help="also check a latency-budgeted search")
    args = p.parse_args()

    settings = LatencySettings(args.task, tuple(args.size), "cpu", args.backend, args.threads)
    table = build_table(settings, args.lut, args.warmup, args.repeats).cost_table()
    lo, hi = table.bounds()
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.backend}, "
          f"{args.threads} thread(s); {args.task} {args.size[0]}x{args.size[1]}; space range {lo:.2f}-{hi:.2f} ms")
    print("| arch | predicted ms | measured ms (IQR) | error |\n|---|---|---|---|")
    archs = random_archs(table, args.archs, args.seed)
    h, w = settings.size
    runners = [make_runner(DenseModel(build_model(args.task, a, settings.classes)), [(1, 3, h, w)], settings)
               for a in archs]
    with TorchThreads(args.threads):  # the archs' calls interleaved, like the table's entries
        measured = time_runners(runners, args.warmup, args.e2e_repeats)
    errors = []
    for n, (arch, m) in enumerate(zip(archs, measured)):
        predicted = predict(table, arch)
        errors.append(predicted / m["median_ms"] - 1)
        print(f"| random {n} | {predicted:.2f} | {m['median_ms']:.2f} ({m['iqr_ms']:.2f}) | {errors[-1]:+.1%} |")
    print(f"max |error| {max(abs(e) for e in errors):.1%}")
    if args.search:
        budget = lo + 0.5 * (hi - lo)
        with tempfile.TemporaryDirectory() as tmp:
            cost, arch = budget_search(args.lut, settings, budget, Path(tmp))
        measured = measure_arch(arch, settings, args.warmup, args.e2e_repeats)  # the table's model (its classes)
        print(f"budget {budget:.2f} ms: derived table cost {cost:.2f} ms, measured {measured['median_ms']:.2f} ms "
              f"(IQR {measured['iqr_ms']:.2f}), {measured['median_ms'] / budget - 1:+.1%} vs the budget")
        print(arch.describe())


if __name__ == "__main__":
    main()

"""Is the found architecture better than chance? The search against the seed and random architectures.

For one task, dataset and cost budget (default: the demo's task settings on the demo data, budget =
the seed's own MAdds), this

1. searches once (``random_seed`` 0) and keeps the super network;
2. draws ``K`` random architectures of the same space whose whole-network cost lies in the search's
   budget band (uniform paths, rejection-sampled against the cost table);
3. fine-tunes the seed's architecture, the found one and the ``K`` random ones from the remapped seed,
   with identical settings, each over ``S`` random seeds, and evaluates each on the val split;
4. scores every architecture with the super network's weights: its task loss on the architecture half
   of the training set (the data the architecture steps saw, without augmentation), in train mode so
   BN uses each batch's statistics — what a recalibrated BN would hold;

and prints the found architecture's percentile among the random ones, (found − seed) as mean ± std over
the seeds, and Kendall τ between the super network's score (−loss) and the mean fine-tuned metric.

    python bench/search_quality.py --task seg                 # ≈ 30 min on 2 CPU cores
    python bench/search_quality.py --task ssdlite --random 8 --seeds 3 --scale 10 --device cuda

``--scale`` multiplies images and steps as ``fna demo --scale`` does. Every run keeps its directory
under ``--out``; rerunning with the same ``--out`` continues (finished runs are reused).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from scipy.stats import kendalltau
from torch.utils.data import Subset

from fna.arch import BUILTIN_ARCHS, Arch, get_arch, save_arch
from fna.cost import model_cost
from fna.data.demo import write_demo
from fna.demo import DEMO_DATA, DEMO_TASKS, run_overrides
from fna.pipeline import load_config, prepare, run
from fna.search import Search
from fna.training import batches, to_device

MAX_DRAWS = 200_000  # uniform paths tried per random architecture before giving up on the band


def random_archs(search: Search, k: int, exclude: list[Arch], seed: int = 0) -> list[Arch]:
    """``k`` distinct random architectures of ``search``'s space inside its budget band."""
    gen = torch.Generator().manual_seed(seed)
    seen = {a.to_net_config() for a in exclude}
    out: list[Arch] = []
    for _ in range(MAX_DRAWS * k):
        if len(out) == k:
            return out
        path = search.backbone.sample_path(gen, uniform=True)
        arch = search.backbone.path_arch(path)
        if search.budget.contains(search.table.path_cost(path)) and arch.to_net_config() not in seen:
            seen.add(arch.to_net_config())
            out.append(arch)
    raise SystemExit(f"found only {len(out)} of {k} random architectures inside the budget band")


@torch.no_grad()
def supernet_loss(search: Search, arch: Arch, batches: list) -> float:
    """Mean task loss of ``arch``'s path through the super network over ``batches``."""
    search.backbone.set_path(search.backbone.arch_path(arch))
    search.model.train()
    torch.manual_seed(0)  # detectors sample negatives: the same draws for every architecture
    return statistics.mean(float(search.spec.loss(search.model, to_device(b, search.dist.device))) for b in batches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="seg", choices=sorted(DEMO_TASKS))
    ap.add_argument("--data", help="dataset root (default: the demo data, written under --out)")
    ap.add_argument("--format", help="dataset format (default: the demo's for the task)")
    ap.add_argument("--random", type=int, default=5, help="K random architectures in the budget band")
    ap.add_argument("--seeds", type=int, default=2, help="S random seeds of every fine-tune")
    ap.add_argument("--scale", type=float, default=1.0, help="images and steps × scale (as fna demo --scale)")
    ap.add_argument("--budget", type=float, help="whole-network MAdds budget (default: the seed's own)")
    ap.add_argument("--seed-weights", help="the MobileNetV2 seed's weights file (default: the packaged one)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="runs/search_quality")
    args = ap.parse_args()
    console = Console()
    t0 = time.perf_counter()
    out = Path(args.out) / args.task
    spec = DEMO_TASKS[args.task]
    fmt = args.format or spec["format"]
    data = Path(args.data) if args.data else out / "data"
    if not args.data:
        write_demo(data, n_train=round(DEMO_DATA["n_train"] * args.scale), n_val=round(DEMO_DATA["n_val"] * args.scale),
                   **{k: v for k, v in DEMO_DATA.items() if k not in ("n_train", "n_val")})

    def config(arch: str | None, random_seed: int, budget: float | None = None):
        overrides = run_overrides(args.task, args.scale, search=arch is None, budget=budget)
        return load_config(None, overrides + [f"random_seed={random_seed}", f"device={args.device}"], task=args.task,
                           data={"root": str(data), "format": fmt}, arch=arch, init="remap",
                           seed_weights=args.seed_weights)

    def finetuned(run_dir: Path, cfg) -> float:
        resume = (run_dir / "config.yaml").exists()
        summary = run(cfg, run_dir, resume=resume, console=Console(quiet=True))
        return summary["metric"] if summary["metric"] is not None else float("nan")

    # 1. the search (its run also fine-tunes the found architecture with random seed 0)
    probe = config("mobilenet_v2", 0)
    plan = prepare(probe, Console(quiet=True))
    budget = args.budget or model_cost(args.task, BUILTIN_ARCHS["mobilenet_v2"], plan.data_size,
                                       len(plan.class_names)).madds
    search_cfg = config(None, 0, budget)
    console.print(f"[bold]search[/] {args.task} on {data}, budget {budget / 1e6:.1f}M MAdds")
    found_metric0 = finetuned(out / "found_s0", search_cfg)
    found = get_arch(out / "found_s0" / "arch.json")

    # 2. the super network as the search left it, and K random architectures in its band
    splan = prepare(search_cfg, Console(quiet=True))
    plain = search_cfg.spec.without_augmentation(splan.train_set, search_cfg.input_size, search_cfg.scale)
    search = Search(splan.search_cfg, splan.train_set, splan.collate, out / "found_s0" / "search", resume=True,
                    seed=splan.seed, plain_dataset=plain)
    seed_arch = search.backbone.path_arch(search.backbone.arch_path(BUILTIN_ARCHS["mobilenet_v2"]))
    archs = {"seed": seed_arch, "found": found}
    archs.update({f"random{i}": a for i, a in enumerate(random_archs(search, args.random, [seed_arch, found]))})
    arch_half = Subset(plain, search.arch_idx)
    stream = batches(arch_half, splan.collate, search.per_rank, 0, 0)
    score_batches = [next(stream) for _ in range(max(1, len(arch_half) // search.per_rank))]
    scores = {name: -supernet_loss(search, arch, score_batches) for name, arch in archs.items()}
    search.dist.close()

    # 3. fine-tune every architecture over S seeds
    metrics: dict[str, list[float]] = {}
    for name, arch in archs.items():
        arch_file = out / "archs" / f"{name}.json"
        arch_file.parent.mkdir(parents=True, exist_ok=True)
        save_arch(arch, arch_file, source=name)
        metrics[name] = []
        for s in range(args.seeds):
            if name == "found" and s == 0:
                metrics[name].append(found_metric0)
                continue
            metrics[name].append(finetuned(out / f"{name}_s{s}", config(str(arch_file), s)))
            console.print(f"{name} seed {s}: {metrics[name][-1]:.4f}  (supernet score {scores[name]:.4f})")

    # 4. the numbers
    mean = {name: statistics.mean(v) for name, v in metrics.items()}
    randoms = [mean[n] for n in archs if n.startswith("random")]
    percentile = 100 * (sum(r < mean["found"] for r in randoms) + 0.5 * sum(r == mean["found"] for r in randoms)) \
        / len(randoms)
    gain = [f - s for f, s in zip(metrics["found"], metrics["seed"])]
    tau, p_value = kendalltau([scores[n] for n in archs], [mean[n] for n in archs])
    result = {
        "task": args.task, "data": str(data), "budget_madds": budget, "scale": args.scale, "K": args.random,
        "S": args.seeds, "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "seconds": round(time.perf_counter() - t0, 1),
        "archs": {n: {"arch": a.to_net_config(), "metrics": metrics[n], "mean": mean[n], "supernet_score": scores[n],
                      "madds": search.table.path_cost(search.backbone.arch_path(a))} for n, a in archs.items()},
        "found_percentile": percentile, "found_minus_seed_mean": statistics.mean(gain),
        "found_minus_seed_std": statistics.stdev(gain) if len(gain) > 1 else 0.0,
        "kendall_tau": tau, "kendall_p": p_value,
    }
    (out / "search_quality.json").write_text(json.dumps(result, indent=2))
    console.print(f"found architecture: {mean['found']:.4f} mean over {args.seeds} seeds; percentile among "
                  f"{len(randoms)} random in-band architectures: {percentile:.0f}")
    console.print(f"found − seed: {result['found_minus_seed_mean']:+.4f} ± {result['found_minus_seed_std']:.4f}")
    console.print(f"Kendall τ (super network score vs fine-tuned metric, {len(archs)} architectures): "
                  f"{tau:+.3f} (p {p_value:.2f})")
    console.print(f"{out / 'search_quality.json'} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()

"""``make demo``: the whole FNA pipeline on the built-in dataset, on a CPU, with baselines.

1. Sanity: the ImageNet seed classifies scikit-image's ``chelsea`` photo; our counter reproduces the
   paper's MAdds/params table.
2. Writes the built-in shapes-on-photos dataset (``fna data make-demo``) and, for segmentation
   (DeepLabv3) and detection (SSDLite), runs through the same loaders a user's data goes through:

   * ``fna``    — search → derive → remap → fine-tune → evaluate (the method);
   * ``seed``   — (a) the seed's own architecture with its ImageNet weights;
   * ``random`` — (c) the architecture FNA found, from random initialisation;

   all fine-tuned with the identical budget, so (b) = ``fna`` vs (c) shows what remapping gives and
   (b) vs (a) what the architecture adaptation gives.
3. Writes ``summary.json`` (one row per task and variant) and prints a table and the report paths.

``scale`` multiplies the images (so the search's steps) and the fine-tuning steps (e.g. ``--scale 10``
on a GPU).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from fna.arch import BUILTIN_ARCHS
from fna.checkpoint import write_text_atomic
from fna.cost import model_cost
from fna.data.demo import write_demo
from fna.pipeline import load_config, run
from fna.seeds import load_seed
from fna.tasks import TASKS, get_task


IMAGE_SIZE = 96
# Per task: data format, input size, search and fine-tuning settings sized for ~15 minutes on 2 CPU cores,
# chosen from the measurements in docs/demo.md. Fine-tuning: AdamW (SGD needs several times more steps to
# leave the all-background solution) on 2000 generated images without augmentation (on 96 images every
# detector memorised the training set: train AP 0.82, val AP 0.05; the SSD augmentation halves the AP
# reached in 1200 steps). Search: the seed's own path first, one epoch of uniform paths, then α with an
# architecture learning rate scaled to its ~125 steps (the paper's 3e-4 is for ~10^4).
_SEARCH = {"epochs": 4, "seed_path_epochs": 1, "arch_start_epoch": 2, "batch_size": 8, "optimizer": "adamw",
           "lr": 1e-3, "weight_decay": 1e-4, "schedule": "constant", "arch_lr": 1e-2,
           "weight_steps_per_arch_step": 2, "warmup_iters": 5}
_FINETUNE = {"iters": 800, "batch_size": 8, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4,
             "schedule": "constant"}
DEMO_TASKS = {
    "seg": {"format": "folder", "size": [IMAGE_SIZE, IMAGE_SIZE], "search": _SEARCH, "finetune": _FINETUNE},
    "ssdlite": {"format": "coco", "size": [IMAGE_SIZE, IMAGE_SIZE], "search": _SEARCH, "finetune": _FINETUNE},
}
# The demo dataset (fna.data.demo.write_demo's arguments; images and steps scale with ``scale``).
DEMO_DATA = {"n_train": 2000, "n_val": 64, "size": IMAGE_SIZE, "seed": 0}
VARIANTS = {  # variant: (arch, init); "found" is the architecture of the fna run
    "fna": (None, "remap"),
    "seed": ("mobilenet_v2", "remap"),
    "random": ("found", "random"),
}


def classify_chelsea(console: Console, seed_weights: str | None = None) -> dict:
    """Top-3 ImageNet classes of the seed on scikit-image's cat photo."""
    import torchvision
    from skimage.data import chelsea

    seed = load_seed("mobilenet_v2", seed_weights)
    weights = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
    image = torch.from_numpy(np.ascontiguousarray(chelsea())).permute(2, 0, 1)
    with torch.no_grad():
        probs = seed.classifier()(weights.transforms()(image)[None]).softmax(1)[0]
    top = probs.topk(3)
    names = weights.meta["categories"]
    rows = [{"class": int(i), "name": names[i], "prob": round(float(p), 4)} for p, i in zip(top.values, top.indices)]
    console.print(f"seed [bold]mobilenet_v2[/] (sha256 {seed.sha256[:12]}…) on chelsea.png: "
                  + ", ".join(f"{r['name']} {r['prob']:.1%}" for r in rows))
    return {"seed": seed.provenance, "top3": rows}


def madds_table(console: Console) -> list[dict]:
    """Our counts of the paper's models next to the paper's numbers."""
    table = Table(title="MAdds / params at the paper's input sizes (ours vs the paper's)")
    for col in ("task", "arch", "MAdds", "paper", "Δ", "params", "paper ", "Δ "):
        table.add_column(col, justify="left" if col in ("task", "arch") else "right")
    rows = []
    counted = [(name, arch, paper) for name, task in TASKS.items() for arch, paper in task.paper_costs.items()]
    for task, arch, (p_madds, p_params) in counted:
        cost = model_cost(task, BUILTIN_ARCHS[arch])
        rows.append({"task": task, "arch": arch, "madds": cost.madds, "params": cost.params,
                     "paper_madds": p_madds, "paper_params": p_params})
        dm, dp = cost.madds / p_madds - 1, cost.params / p_params - 1
        table.add_row(task, arch, f"{cost.madds / 1e9:.3f}G", f"{p_madds / 1e9:.3f}G", f"{dm:+.2%}",
                      f"{cost.params / 1e6:.3f}M", f"{p_params / 1e6:.3f}M", f"{dp:+.2%}")
    console.print(table)
    return rows


def _scaled(settings: dict, scale: float) -> dict:
    """``settings`` with fine-tuning ``iters`` times ``scale``; search epochs stay, as the images scale."""
    out = dict(settings)
    if "iters" in out:
        out["iters"] = max(1, round(out["iters"] * scale))
    return out


def run_overrides(task: str, scale: float, search: bool, budget: float | None = None) -> list[str]:
    """The demo's ``key=value`` settings of a ``task`` run: fine-tuning, and the search's with ``search``
    (hard budget ``budget`` MAdds, if given)."""
    spec = DEMO_TASKS[task]
    overrides = [f"size={spec['size']}", "data.augment=false"]
    overrides += [f"finetune.{k}={v}" for k, v in _scaled(spec["finetune"], scale).items()]
    if search:
        overrides += [f"search.{k}={v}" for k, v in _scaled(spec["search"], scale).items()]
        if budget is not None:
            overrides += [f"search.budget_madds={budget}"]
    return overrides


def run_task(task: str, data: Path, out: Path, scale: float, seed_weights: str | None, resume: bool,
             console: Console) -> list[dict]:
    """The three variants of one task; one summary row each."""
    spec = DEMO_TASKS[task]
    # As in the paper, the search targets the seed's own cost, so (b) and (a) compare at equal MAdds.
    num_classes = len(get_task(task).open_dataset(data, spec["format"], "train").class_names)
    budget = model_cost(task, BUILTIN_ARCHS["mobilenet_v2"], tuple(spec["size"]), num_classes).madds
    rows = []
    for variant, (arch, init) in VARIANTS.items():
        run_dir = out / task / variant
        if arch == "found":
            arch = str(out / task / "fna" / "arch.json")
        overrides = run_overrides(task, scale, search=arch is None, budget=budget)
        cfg = load_config(None, overrides, task=task, data={"root": str(data), "format": spec["format"]},
                          arch=arch, init=init, seed_weights=seed_weights)
        console.rule(f"{task} · {variant}")
        t0 = time.perf_counter()
        summary = run(cfg, run_dir, resume=resume and (run_dir / "config.yaml").exists(), console=console)
        rows.append({"task": task, "variant": variant, "metric_name": summary["metric_name"],
                     "metric": summary["metric"], "madds": summary["madds_data"], "params": summary["params"],
                     "seconds": round(time.perf_counter() - t0, 1), "run_dir": str(run_dir),
                     "search_over_finetune": summary["search_over_finetune"]})
    return rows


def run_demo(out: Path, seed_weights: str | None = None, scale: float = 1.0, resume: bool = False) -> dict:
    """Run every demo step into ``out`` and write ``summary.json``."""
    console = Console()
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    checks = {"seed_check": classify_chelsea(console, seed_weights), "madds": madds_table(console)}
    data = out / "data"
    counts = write_demo(data, **{**DEMO_DATA, "n_train": round(DEMO_DATA["n_train"] * scale),
                                 "n_val": round(DEMO_DATA["n_val"] * scale)})
    console.print(f"demo dataset: {counts['train_images']} train / {counts['val_images']} val images in {data}")
    rows = []
    for task in DEMO_TASKS:
        rows += run_task(task, data, out, scale, seed_weights, resume, console)
    table = Table(title=f"FNA demo · identical fine-tuning budget per task · scale {scale}")
    for col in ("task", "variant", "metric", "MAdds", "params", "seconds", "search ÷ fine-tune"):
        table.add_column(col, justify="left" if col in ("task", "variant") else "right")
    for r in rows:
        ratio = r["search_over_finetune"]
        table.add_row(r["task"], r["variant"], f"{r['metric_name']} {get_task(r['task']).format_metric(r['metric'])}",
                      f"{r['madds'] / 1e6:.1f}M", f"{r['params'] / 1e6:.3f}M", f"{r['seconds']:.0f}",
                      "—" if ratio is None else f"{ratio:.2f}")
    console.print(table)
    summary = {"rows": rows, "scale": scale, "seconds": round(time.perf_counter() - t0, 1),
               "random_seeds": 1, **checks}
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    for task in DEMO_TASKS:
        report = out / task / "fna" / "report.html"
        if report.exists():
            console.print(f"report: {report}")
    console.print(f"summary: {out / 'summary.json'} ({summary['seconds']:.0f} s)")
    return summary

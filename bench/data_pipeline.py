"""Does the data pipeline keep up with the model? Images/s of each, at the paper's input sizes.

For each task, on demo data written to a temporary folder at a size like the paper's data
(segmentation: 1024×2048 Cityscapes-size images, 769×769 crops after random scaling 0.75–2.0 and
flip; RetinaNet: 800×1333 images, flip, the model resizes to 800/1333 itself; SSDLite: 480×640
COCO-size images, the SSD augmentation and resize to 320×320), it prints:

* the pipeline's images/s as the loops draw it (``fna.training.batches``: loading, the random
  transforms and collate in ``num_workers`` worker processes, each sample's transforms seeded by its
  (seed, epoch, index)), with no workers and with the ``auto`` count;
* the model's train-step images/s (MobileNetV2 task model, forward + backward + SGD step) on one
  such batch;
* their ratio (≥ 1: the data keeps up with this device).

Rounds interleave the measurements, medians over ``--repeats``. On a CPU the workers and the model
share the cores, so the ratio there is a lower bound for a GPU run.

    python bench/data_pipeline.py --tasks seg retinanet ssdlite --images 8 --repeats 3
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fna.data.demo import write_demo
from fna.seeds import random_mobilenet_v2
from fna.tasks import build_model, get_task
from fna.training import batches, num_workers

# task: (demo image size H W, the task's size setting, data format, batch per process)
SETTINGS = {"seg": ((1024, 2048), (769, 769), "folder", 2),
            "retinanet": ((800, 1333), (800, 1333), "coco", 2),
            "ssdlite": ((480, 640), (320, 320), "coco", 8)}


def images_per_second(step, images: int, repeats: int) -> float:
    """Median images/s of ``step`` (which handles ``images`` images), after one warm-up call."""
    step()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return images / statistics.median(times)


def bench_task(task: str, root: Path, n_images: int, repeats: int) -> dict[str, float]:
    """Data images/s (no workers, auto workers) and model train-step images/s for ``task``."""
    image_size, size, fmt, batch = SETTINGS[task]
    spec = get_task(task)
    data_root = root / f"demo-{image_size[0]}x{image_size[1]}"
    if not data_root.is_dir():
        write_demo(data_root, n_train=n_images, n_val=1, size=image_size, seed=0)
    dataset = spec.open_dataset(data_root, fmt, "train", train_size=size)
    auto = num_workers("auto")
    streams = {w: batches(dataset, spec.collate, batch, seed=0, num_workers=w) for w in sorted({0, auto})}
    model = build_model(task, random_mobilenet_v2().arch, 6 if task == "seg" else 5,
                        **spec.model_kwargs(size)).train()
    opt = torch.optim.SGD(model.parameters(), 0.001, momentum=0.9)
    fixed = next(streams[0])

    def train_step() -> None:
        loss = spec.loss(model, fixed)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    rates: dict[str, list[float]] = {f"data, {w} workers": [] for w in streams} | {"model": []}
    for _ in range(repeats):  # interleaved rounds: background load hits every measurement alike
        for w, stream in streams.items():
            rates[f"data, {w} workers"].append(images_per_second(lambda: next(stream), batch, 2))
        rates["model"].append(images_per_second(train_step, batch, 1))
    return {k: statistics.median(v) for k, v in rates.items()} | {"batch": batch, "auto": auto}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--images", type=int, default=8, help="demo training images per task")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, CPU")
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks:
            r = bench_task(task, Path(tmp), args.images, args.repeats)
            image_size, size, _, batch = SETTINGS[task]
            data = {k: v for k, v in r.items() if k.startswith("data")}
            best = max(data.values())
            print(f"{task}: images {image_size[0]}x{image_size[1]}, size {size[0]}x{size[1]}, batch {batch}: "
                  + ", ".join(f"{k} {v:.2f} img/s" for k, v in data.items())
                  + f"; model train step {r['model']:.2f} img/s; data/model {best / r['model']:.2f}")


if __name__ == "__main__":
    main()

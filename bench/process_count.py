"""Does the searched architecture depend on the number of processes? One process vs ``torchrun`` with two.

Runs the same ``fna search`` twice on the demo data (same data, seed and *total* batch): once in one
process, once under ``torchrun --nproc_per_node=2`` on CPU (gloo), and prints how far the final α
are apart (max |Δα|, and the largest α move of the one-process run for scale) and in how many of
the searched layers the derived ops differ — beside the same comparison between one process on all
threads and one process on one thread, which differ by float rounding alone. The data augmentation
and the segmentation head's dropout draw from each process's random stream, so ``--augment none
--dropout 0`` (``--size`` is both the crop and the images' size, so the plain pipeline's crop has
one place) shows what is left without them.

    python bench/process_count.py --size 64 --images 16 --epochs 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from fna.data.demo import write_demo
from fna.supernet import alpha_logits


def search(data: Path, out: Path, processes: int, threads: int, args: argparse.Namespace) -> dict:
    """Run ``fna search`` in ``processes`` processes of ``threads`` threads; the final α by name."""
    launcher = ([sys.executable, "-m", "fna"] if processes == 1 else
                [str(Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc_per_node={processes}",
                 "-m", "fna"])
    cmd = [*launcher, "search", "--task", "seg", "--data", str(data), "--format", "folder", "--out", str(out),
           "--size", str(args.size), str(args.size), f"epochs={args.epochs}", f"arch_start_epoch={args.epochs // 2}",
           f"batch_size={args.batch}", "warmup_iters=0", f"arch_lr={args.arch_lr}", "progress=false",
           "tensorboard=false", "device=cpu", f"augment={args.augment}",
           *([f"model_kwargs.dropout={args.dropout}"] if args.dropout is not None else [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    return json.loads((out / "alpha_history.json").read_text())[-1]["alpha"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4, help="total batch")
    ap.add_argument("--arch-lr", type=float, default=0.05)
    ap.add_argument("--dropout", type=float, default=None, help="the head's dropout (default: the model's, 0.1)")
    ap.add_argument("--augment", default="arch", choices=["arch", "weights", "both", "none"])
    ap.add_argument("--rounding", action=argparse.BooleanOptionalAction, default=True,
                    help="also run one process on one thread: how far float rounding alone moves the search")
    args = ap.parse_args()
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "demo"
        write_demo(data, n_train=args.images, n_val=2, size=args.size, seed=0)
        one = search(data, Path(tmp) / "one", 1, threads, args)
        runs = {"1 vs 2 processes": search(data, Path(tmp) / "two", 2, max(1, threads // 2), args)}
        if args.rounding and threads > 1:
            rounding = f"1 process, {threads} vs 1 threads (float rounding alone)"
            runs[rounding] = search(data, Path(tmp) / "t1", 1, 1, args)
    print(f"seg search, demo {args.images} images at {args.size}x{args.size}, total batch {args.batch}, "
          f"{args.epochs} epochs, arch_lr {args.arch_lr}, dropout {args.dropout}, augment {args.augment}, "
          f"torch {torch.__version__}")
    for name, other in runs.items():
        gap, moved, differ, layers = compare(one, other)
        print(f"{name}: max |Δα| {gap:.3g} (largest |α| {moved:.3g}); derived ops differ in {differ} of {layers} "
              "layers")


def compare(one: dict, other: dict) -> tuple[float, float, int, int]:
    """max |Δα|, the largest |α| of ``one``, and in how many of how many layers the argmax differs."""
    gap = max(abs(a - b) for k in one for ra, rb in zip(one[k], other[k]) for a, b in zip(ra, rb))
    moved = max(abs(a) for rows in one.values() for row in rows for a in row)
    layers = [(int(a.argmax()), int(b.argmax())) for sa, sb in zip(alpha_logits(one), alpha_logits(other))
              for a, b in zip(sa, sb)]
    return gap, moved, sum(int(a != b) for a, b in layers), len(layers)


if __name__ == "__main__":
    main()

"""Cost of searching, measured in one run on the same input.

Prints (1) the super network's single-path weight-step time ÷ the train-step time of the derived
network on the same path (the overhead of training through the super network; goal ≤ 1.03), (2) the
architecture step's time ÷ the weight step's (goal ≤ 1.5), and (3) the architecture step's peak memory
÷ the weight step's peak memory (all candidates vs one path; goal ≤ 2.0), each with the architecture
step recomputing the candidates in its backward pass (the default) and without.
Peak memory is the highest live tensor memory during the step, from the torch profiler's allocation
events (CPU) or ``torch.cuda.max_memory_allocated`` (CUDA).

    python bench/search_step.py --task seg --size 128 128 --batch 2 --repeats 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import torch

from fna.seeds import random_mobilenet_v2
from fna.search import Search, SearchConfig
from fna.search.memory import peak_bytes
from fna.supernet import MixedLayer
from fna.tasks import build_model, get_task
from fna.training import to_device


def _batch(task: str, n: int, size: tuple[int, int], classes: int) -> tuple:
    h, w = size
    if task == "seg":
        return torch.randn(n, 3, h, w), torch.randint(0, classes, (n, h, w))
    box = torch.tensor([[h * 0.1, w * 0.1, h * 0.6, w * 0.7]])
    return [torch.rand(3, h, w) for _ in range(n)], [{"boxes": box, "labels": torch.tensor([1])} for _ in range(n)]


def _timed(steps: list, repeats: int) -> list[float]:
    """Median seconds of each step, run interleaved so background load hits them alike."""
    times: list[list[float]] = [[] for _ in steps]
    for r in range(repeats + 1):
        for i, step in enumerate(steps):
            t = time.perf_counter()
            step()
            if r:  # the first round warms up
                times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="seg", choices=["seg", "retinanet", "ssdlite"])
    ap.add_argument("--size", type=int, nargs=2, default=(128, 128))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    size, classes = tuple(args.size), 3
    kwargs = {"retinanet": {"min_size": size[0], "max_size": size[1]}, "ssdlite": {"size": size[0]}}.get(args.task, {})
    cfg = SearchConfig.for_task(args.task, num_classes=classes, cost_size=size, model_kwargs=kwargs, batch_size=2,
                                progress=False, tensorboard=False, device=args.device)
    placeholder = [(torch.zeros(1), 0)] * 4  # Search needs a dataset to split; the steps below get `batch`
    with tempfile.TemporaryDirectory() as run_dir:
        s = Search(cfg, placeholder, None, run_dir, seed=random_mobilenet_v2())
        batch = to_device(_batch(args.task, args.batch, size, classes), s.dist.device)
        path = s.backbone.sample_path(torch.Generator().manual_seed(0))
        spec = get_task(args.task)
        derived = build_model(args.task, s.backbone.path_arch(path), classes, **kwargs).to(s.dist.device).train()
        opt = torch.optim.SGD(derived.parameters(), cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

        def derived_step() -> None:
            loss = spec.loss(derived, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def weight_step() -> None:  # sample as the search does, but time the derived network's path
            s.backbone.sample_path(s.path_gen)
            s.backbone.set_path(path)
            loss = spec.loss(s.model, batch)
            s.opt_w.zero_grad(set_to_none=True)
            loss.backward()
            s.opt_w.step()

        def arch_step(recompute: bool):
            def step() -> None:
                for layer in s.backbone.modules():
                    if isinstance(layer, MixedLayer):
                        layer.recompute = recompute
                s.arch_step(batch)
            return step

        t_super, t_derived, t_weight, t_arch, t_arch_keep = _timed(
            [weight_step, derived_step, lambda: s.weight_step(batch), arch_step(True), arch_step(False)], args.repeats)
        m_weight = peak_bytes(lambda: s.weight_step(batch), s.dist.device)
        m_arch = peak_bytes(arch_step(True), s.dist.device)
        m_arch_keep = peak_bytes(arch_step(False), s.dist.device)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, device {args.device}")
    print(f"task {args.task}, input {args.batch}x3x{size[0]}x{size[1]}, path {' | '.join(' '.join(st.ops) for st in s.backbone.path_arch(path).stages[1:])}")
    print(f"weight step (super network, single path): {t_super * 1e3:.1f} ms")
    print(f"train step (derived network):              {t_derived * 1e3:.1f} ms")
    print(f"time ratio super/derived: {t_super / t_derived:.3f}  (goal <= 1.03)")
    print(f"arch step {t_arch * 1e3:.1f} ms recomputing, {t_arch_keep * 1e3:.1f} ms keeping activations; "
          f"weight step {t_weight * 1e3:.1f} ms; arch/weight time {t_arch / t_weight:.2f} (goal <= 1.5), "
          f"{t_arch_keep / t_weight:.2f} without recompute")
    print(f"peak memory: weight step {m_weight / 2**20:.1f} MiB; arch step {m_arch / 2**20:.1f} MiB recomputing "
          f"(ratio {m_arch / m_weight:.2f}, goal <= 2.0), {m_arch_keep / 2**20:.1f} MiB keeping activations "
          f"(ratio {m_arch_keep / m_weight:.2f})")


if __name__ == "__main__":
    main()

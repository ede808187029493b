"""The whole adaptation in one run directory: search → derive → remap → fine-tune → evaluate.

``fna adapt`` runs every phase; ``fna train`` starts from a given architecture (no search). Each phase
records its seconds and device in ``ledger.json`` and is skipped on ``--resume`` once done; the phase
that was interrupted continues from its own checkpoint. Layout of a run directory::

    config.yaml            the resolved run config
    search/                super-network checkpoint, α history, TensorBoard (adapt only)
    arch.json, arch.net_config.txt
    remap_report.md        what the seed gave the target, per layer
    finetune/              fine-tuning checkpoint, TensorBoard
    model.fna.pt           the fine-tuned model, rebuildable with `fna.load`
    metrics.json, ledger.json, summary.json
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Literal

import torch
from omegaconf import OmegaConf
from pydantic import BaseModel, ConfigDict, ValidationError
from rich.console import Console
from rich.progress import Progress

from fna import dist
from fna.arch import Arch, get_arch, save_arch
from fna.artifact import load_model, save_model
from fna.cost import model_cost
from fna.data import (det_collate, det_eval_transforms, open_detection, open_segmentation,
                      retinanet_train_transforms, seg_collate, seg_eval_transforms, seg_train_transforms,
                      ssdlite_train_transforms)
from fna.errors import FnaError
from fna.evaluate import evaluate_detection, evaluate_segmentation, format_metric
from fna.remap import remap_seed
from fna.seeds import load_seed
from fna.tasks import get_task
from fna.train import TrainConfig, fit, paper_recipe

DEFAULT_SIZE = {"seg": (769, 769), "retinanet": (800, 1333), "ssdlite": (320, 320)}
METRIC = {"seg": "mIoU", "retinanet": "AP", "ssdlite": "AP"}


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    root: str
    format: str  # seg: cityscapes | voc | folder; detection: coco | voc
    train_split: str = "train"
    val_split: str = "val"
    skip_bad: bool = False


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    window: tuple[int, int] | None = None  # sliding-window size for segmentation; None: whole image
    stride_rate: float = 2 / 3
    flip: bool = False
    batch_size: int = 4


class RunConfig(BaseModel):
    """One run. ``size``: segmentation training crop (H, W); RetinaNet (min_size, max_size); SSDLite (S, S)."""

    model_config = ConfigDict(extra="forbid")

    task: Literal["seg", "retinanet", "ssdlite"]
    data: DataConfig
    seed: str = "mobilenet_v2"
    seed_weights: str | None = None
    arch: str | None = None  # a given architecture (built-in name or file): no search
    init: Literal["remap", "random"] = "remap"  # target weights: remapped from the seed, or fresh
    size: tuple[int, int] | None = None
    scale: tuple[float, float] = (0.75, 2.0)  # segmentation random scale range
    search: dict[str, Any] = {}  # overrides of fna.search.SearchConfig.for_task(task)
    finetune: dict[str, Any] = {}  # overrides of fna.train.paper_recipe(task, batch_size, iters)
    eval: EvalConfig = EvalConfig()
    device: str = "auto"
    random_seed: int = 0

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.size or DEFAULT_SIZE[self.task])

    def model_kwargs(self) -> dict[str, Any]:
        """Arguments of the task model that depend on the input size."""
        h, w = self.input_size
        return {"retinanet": {"min_size": h, "max_size": w}, "ssdlite": {"size": h}}.get(self.task, {})

    def train_config(self) -> TrainConfig:
        over = dict(self.finetune)
        recipe = paper_recipe(self.task, over.pop("batch_size", 8), over.pop("iters", 1000))
        try:
            return TrainConfig(**{**recipe.model_dump(), "device": self.device, "seed": self.random_seed, **over})
        except ValidationError as e:
            raise FnaError(f"finetune config: {_first_error(e)}") from None


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    return f"{'.'.join(str(x) for x in err['loc']) or 'config'}: {err['msg']}"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, **fields: Any) -> RunConfig:
    """A run config from a YAML file, ``key=value`` overrides (``search.epochs=2``) and keyword fields."""
    base = OmegaConf.create({k: v for k, v in fields.items() if v is not None})
    if path is not None:
        if not Path(path).is_file():
            raise FnaError(f"{path}: config file not found")
        try:
            base = OmegaConf.merge(OmegaConf.load(path), base)
        except Exception as e:
            raise FnaError(f"{path}: malformed config ({e})") from None
    try:
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides or [])))
    except Exception as e:
        raise FnaError(f"bad override in {overrides}: {e}") from None
    try:
        return RunConfig(**OmegaConf.to_container(merged, resolve=True))
    except ValidationError as e:
        raise FnaError(f"run config: {_first_error(e)}") from None


class Ledger:
    """Seconds and device per phase, persisted in ``ledger.json`` (time before an interruption is kept)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.phases: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.exists() else {}

    def done(self, phase: str) -> bool:
        return self.phases.get(phase, {}).get("done", False)

    @contextlib.contextmanager
    def phase(self, name: str, device: torch.device):
        entry = self.phases.setdefault(name, {"seconds": 0.0, "device": _device_name(device), "done": False})
        t0 = time.perf_counter()
        try:
            yield entry
            entry["done"] = True
        finally:
            entry["seconds"] = round(entry["seconds"] + time.perf_counter() - t0, 3)
            if dist.is_main():
                self.path.write_text(json.dumps(self.phases, indent=2))


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def eval_dataset(task: str, root: str | Path, fmt: str, split: str, skip_bad: bool = False) -> Any:
    """A split with evaluation transforms, bad items dropped up front (so none is replaced mid-run)."""
    if task == "seg":
        dataset = open_segmentation(root, fmt, split, seg_eval_transforms(), skip_bad)
    else:
        dataset = open_detection(root, fmt, split, det_eval_transforms(), skip_bad)
    return dataset.verify() if skip_bad else dataset


def open_datasets(cfg: RunConfig) -> tuple[Any, Any, Any]:
    """(train set with training transforms, val set with eval transforms, collate function)."""
    d = cfg.data
    val = eval_dataset(cfg.task, d.root, d.format, d.val_split, d.skip_bad)
    if cfg.task == "seg":
        train = open_segmentation(d.root, d.format, d.train_split, seg_train_transforms(cfg.input_size, cfg.scale),
                                  d.skip_bad)
        return train, val, seg_collate
    h, w = cfg.input_size
    train_tf = retinanet_train_transforms(h, w) if cfg.task == "retinanet" else ssdlite_train_transforms(h)
    train = open_detection(d.root, d.format, d.train_split, train_tf, d.skip_bad)
    return train, val, det_collate


def data_input_size(cfg: RunConfig, val_set: Any) -> tuple[int, int]:
    """The network's input size on this data: segmentation evaluates whole images, detectors resize."""
    image = val_set[0][0]
    h, w = image.shape[-2:]
    if cfg.task == "ssdlite":
        return cfg.input_size
    if cfg.task == "retinanet":  # torchvision's rule: short side to min_size unless the long side passes max_size
        lo, hi = cfg.input_size
        s = min(lo / min(h, w), hi / max(h, w))
        return round(h * s), round(w * s)
    return h, w


def evaluate_model(task: str, model: torch.nn.Module, val_set: Any, cfg: EvalConfig, device: torch.device,
                   num_classes: int, class_names: tuple[str, ...], results_path: Path | None = None) -> dict:
    """The task's metrics on ``val_set`` (mIoU for segmentation, COCO mAP for detection)."""
    if task == "seg":
        return evaluate_segmentation(model, val_set, num_classes, class_names, device, cfg.window,
                                     cfg.stride_rate, cfg.flip)
    return evaluate_detection(model, val_set, device, cfg.batch_size, results_path)


def run(cfg: RunConfig, run_dir: str | Path, resume: bool = False, console: Console | None = None) -> dict:
    """Run (or continue, with ``resume``) every phase into ``run_dir``; returns ``summary.json``'s content."""
    console = console or Console()
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    resolved = OmegaConf.to_yaml(OmegaConf.create(cfg.model_dump(mode="json")))
    device = dist.resolve_device(cfg.device)
    dist.init_from_env(device)  # under torchrun: before any rank looks at the run directory
    if not dist.is_main():
        console = Console(quiet=True)
    if dist.is_main():
        if config_path.exists() and not resume:
            raise FnaError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
        if resume and config_path.exists() and config_path.read_text() != resolved:
            raise FnaError(f"{run_dir}: --resume with a different config than the run was started with "
                           f"(see {config_path})")
        run_dir.mkdir(parents=True, exist_ok=True)
        config_path.write_text(resolved)
    dist.barrier()
    ledger = Ledger(run_dir / "ledger.json")
    spec = get_task(cfg.task)
    train_set, val_set, collate = open_datasets(cfg)
    class_names = tuple(train_set.class_names)
    for name, ds in (("train", train_set), ("val", val_set)):
        if getattr(ds, "skipped", None):
            console.print(f"[yellow]skipped {len(ds.skipped)} bad {name} item(s)[/]: "
                          + "; ".join(f"{p}: {r}" for p, r in ds.skipped[:5]))

    data_size = data_input_size(cfg, val_set)
    arch = _architecture(cfg, run_dir, ledger, device, train_set, collate, class_names, data_size, resume, console)
    model_path = run_dir / "model.fna.pt"
    if ledger.done("finetune") and model_path.exists():
        model, _ = load_model(model_path)
    else:
        model, provenance = _remapped_model(cfg, arch, run_dir, ledger, device, len(class_names), console)
        train_cfg = cfg.train_config()
        console.print(f"[bold]fine-tune[/] {train_cfg.iters} iterations, batch {train_cfg.batch_size}")
        with ledger.phase("finetune", device), Progress(console=console, transient=True,
                                                         disable=not dist.is_main()) as bar:
            bar_id = bar.add_task("fine-tune", total=train_cfg.iters)
            fit(model, spec, train_set, collate, train_cfg, run_dir / "finetune", resume=resume,
                progress=lambda it, loss: bar.update(bar_id, completed=it, description=f"fine-tune loss {loss:.3f}"))
            if dist.is_main():
                save_model(model_path, model, cfg.task, arch, list(class_names), cfg.model_kwargs(), provenance,
                           cfg.model_dump(mode="json"))

    metrics_path = run_dir / "metrics.json"
    if ledger.done("eval") and metrics_path.exists():
        metrics = json.loads(metrics_path.read_text())
    else:
        with ledger.phase("eval", device):
            metrics = evaluate_model(cfg.task, model, val_set, cfg.eval, device, len(class_names), class_names,
                                     run_dir / "detections.json")
        if dist.is_main():
            metrics_path.write_text(json.dumps(metrics, indent=2))
    summary = _summary(cfg, arch, metrics, ledger, data_size, len(class_names))
    if dist.is_main():
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"[bold]{METRIC[cfg.task]}[/] {format_metric(summary['metric'], cfg.task)} · "
                  f"{summary['madds_data'] / 1e9:.3f} GMAdds at {summary['data_size'][0]}×{summary['data_size'][1]} · "
                  f"{summary['params'] / 1e6:.3f}M params · run in {run_dir}")
    if dist.is_main():
        from fna.report import write_report

        console.print(f"[bold]report[/] {write_report(run_dir)[1]}", highlight=False)
    return summary


def _architecture(cfg: RunConfig, run_dir: Path, ledger: Ledger, device: torch.device, train_set: Any,
                  collate: Any, class_names: tuple[str, ...], data_size: tuple[int, int], resume: bool,
                  console: Console) -> Arch:
    """The given architecture, or the one the search derives (``arch.json`` once done)."""
    arch_path = run_dir / "arch.json"
    if cfg.arch is not None:
        arch = get_arch(cfg.arch)
    elif ledger.done("search") and arch_path.exists():
        arch = get_arch(arch_path)
    else:
        from fna.search import SearchConfig, search

        search_cfg = SearchConfig.for_task(cfg.task, **{
            "seed": cfg.seed, "seed_weights": cfg.seed_weights, "num_classes": len(class_names),
            "model_kwargs": cfg.model_kwargs(), "cost_size": data_size,
            "device": cfg.device, "random_seed": cfg.random_seed, **cfg.search})
        console.print(f"[bold]search[/] {search_cfg.epochs} epochs on {len(train_set)} images")
        with ledger.phase("search", device):
            arch = search(search_cfg, train_set, collate, run_dir / "search", resume=resume).arch
    if dist.is_main():
        save_arch(arch, arch_path)
        save_arch(arch, run_dir / "arch.net_config.txt")
    console.print(f"[bold]architecture[/]\n{arch.describe()}", highlight=False)
    return arch


def _remapped_model(cfg: RunConfig, arch: Arch, run_dir: Path, ledger: Ledger, device: torch.device,
                    num_classes: int, console: Console) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The task model on ``arch`` with the seed's weights remapped into its backbone (or fresh ones),
    and the seed provenance to store with it."""
    spec = get_task(cfg.task)
    with ledger.phase("remap", device):
        if cfg.init == "random":
            backbone = spec.backbone(arch)
            note, provenance = "random initialisation (no remapping)", {"seed": None, "init": "random"}
        else:
            seed = load_seed(cfg.seed, cfg.seed_weights)
            provenance = {**seed.provenance, "init": "remap"}
            backbone, report = remap_seed(seed, arch, spec.taps(arch), spec.output_stride)
            note = f"{report.fraction:.1%} of the backbone's parameters inherited from the seed"
            if dist.is_main():
                (run_dir / "remap_report.md").write_text(report.to_markdown())
    console.print(f"[bold]remap[/] {note}")
    return spec.head(backbone, num_classes, **cfg.model_kwargs()), provenance


def _summary(cfg: RunConfig, arch: Arch, metrics: dict, ledger: Ledger, data_size: tuple[int, int],
             num_classes: int) -> dict:
    paper = model_cost(cfg.task, arch, None, num_classes)
    at_data = model_cost(cfg.task, arch, data_size, num_classes)
    return {"task": cfg.task, "arch": arch.to_dict(), "net_config": arch.to_net_config(),
            "metric_name": METRIC[cfg.task], "metric": metrics[METRIC[cfg.task]], "metrics": metrics,
            "madds_paper_size": paper.madds, "paper_size": list(get_task(cfg.task).paper_size),
            "madds_data": at_data.madds, "data_size": list(data_size), "params": at_data.params,
            "init": cfg.init, "phases": ledger.phases}

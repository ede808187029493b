"""The whole adaptation in one run directory: search → derive → remap → fine-tune → evaluate.

``fna adapt`` runs every phase; ``fna train`` starts from a given architecture (no search). Before the
first phase every setting and every file of the train and val splits is checked, so a typo or a bad
image stops the run before any work is done. Each phase records its seconds and device in
``ledger.json`` (also while it runs) and is skipped on ``--resume`` once done; the phase that was
interrupted continues from its own checkpoint, or starts over when it had none yet. A resumed run
may change the settings of phases that have not started, how it runs (device, logging, checkpoint
interval, ``--skip-bad``) and the learning rates of the phase it continues (see :func:`check_resume`).
The layout of a run directory is :mod:`fna.rundir`'s.
"""

from __future__ import annotations

import contextlib
import fnmatch
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from omegaconf import OmegaConf
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator
from rich.console import Console
from rich.markup import escape

from fna import dist
from fna.arch import Arch, get_arch, save_arch
from fna.artifact import load_model, save_model
from fna.checkpoint import clear_stale_tmp, seed_everything, write_text_atomic
from fna.cost import model_cost
from fna.errors import FnaError
from fna.evaluate import EvalConfig
from fna.progress import Progress
from fna.remap import check_compatible, remap_seed
from fna.report import write_report
from fna.rundir import RunDir, read_json, read_jsonl, write_json, write_jsonl
from fna.search import SearchConfig, search
from fna.seeds import Seed, load_seed
from fna.tasks import TASKS, Task, get_task
from fna.train import TrainConfig, fit


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    root: str
    format: str  # seg: cityscapes | voc | folder; detection: coco | voc
    train_split: str = "train"
    val_split: str = "val"
    skip_bad: bool = False
    augment: bool = True  # the task's training augmentation; false: the training pipeline without it


class RunConfig(BaseModel):
    """One run. ``size``: segmentation training crop (H, W); RetinaNet (min_size, max_size); SSDLite (S, S)."""

    model_config = ConfigDict(extra="forbid")

    task: str  # a registered task with datasets: seg | retinanet | ssdlite (see fna.tasks)
    data: DataConfig
    seed: str = "mobilenet_v2"
    seed_weights: str | None = None
    arch: str | None = None  # a given architecture (built-in name or file): no search
    init: Literal["remap", "random"] = "remap"  # target weights: remapped from the seed, or fresh
    size: tuple[PositiveInt, PositiveInt] | None = None
    scale: tuple[float, float] = (0.75, 2.0)  # segmentation random scale range
    search: dict[str, Any] = {}  # overrides of fna.search.SearchConfig.for_task(task)
    finetune: dict[str, Any] = {}  # overrides of the task's recipe(batch_size, iters) (fna.train.TrainConfig)
    eval: EvalConfig = EvalConfig()
    device: str = "auto"
    random_seed: int = 0

    @field_validator("scale")
    @classmethod
    def _scale_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {list(v)}")
        return v

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str) -> str:
        if v not in TASKS:
            raise ValueError(f"unknown task {v!r}: expected one of {', '.join(t for t in TASKS if TASKS[t].formats)}")
        task = TASKS[v]
        if not task.formats:
            raise ValueError(f"task {v!r} reads no datasets; a run needs one of "
                             f"{', '.join(t for t, spec in TASKS.items() if spec.formats)}")
        return v

    @model_validator(mode="after")
    def _size_fits_task(self) -> RunConfig:
        if self.size is not None:
            get_task(self.task).check_size(self.size)
        return self

    @property
    def spec(self) -> Task:
        """The run's :class:`~fna.tasks.Task`."""
        return get_task(self.task)

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.size or self.spec.default_size)

    def model_kwargs(self) -> dict[str, Any]:
        """Arguments of the task model that depend on the input size."""
        return self.spec.model_kwargs(self.input_size)

    def train_config(self) -> TrainConfig:
        over = dict(self.finetune)
        try:
            sized = TrainConfig(**{k: over.pop(k) for k in ("iters", "batch_size") if k in over})
            recipe = self.spec.recipe(sized.batch_size, sized.iters)
            return TrainConfig(**{**recipe.model_dump(), "device": self.device, "seed": self.random_seed, **over})
        except ValidationError as e:
            raise FnaError(f"finetune config: {_first_error(e)}") from None

    def search_config(self, num_classes: int | None = None, cost_size: tuple[int, int] | None = None) -> SearchConfig:
        """The :class:`~fna.search.SearchConfig` of this run (``search.*`` over the task's defaults)."""
        return SearchConfig.for_task(self.task, **{
            "seed": self.seed, "seed_weights": self.seed_weights, "num_classes": num_classes,
            "model_kwargs": self.model_kwargs(), "cost_size": cost_size, "device": self.device,
            "random_seed": self.random_seed, **self.search})


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


# -- which settings a resumed run may change ----------------------------------------------------------

PHASES = ("search", "remap", "finetune", "eval")
# The settings each phase's result depends on ("search.*": every search setting).
PHASE_SETTINGS = {
    "search": ("task", "data.root", "data.format", "data.train_split", "data.augment", "seed", "seed_weights", "arch", "size",
               "scale", "search.*", "random_seed"),
    "remap": ("task", "seed", "seed_weights", "arch", "init", "random_seed"),
    "finetune": ("task", "data.root", "data.format", "data.train_split", "data.augment", "seed", "seed_weights", "arch", "init",
                 "size", "scale", "finetune.*", "random_seed"),
    "eval": ("task", "data.root", "data.format", "data.val_split", "eval.*"),
}
# How a run executes, not what it computes: may change at any resume.
ANYTIME = ("device", "data.skip_bad", "search.device", "search.arch_recompute", "search.progress", "search.tensorboard", "search.num_workers",
           "search.checkpoint_every", "finetune.device", "finetune.checkpoint_every", "finetune.log_every",
           "finetune.num_workers", "eval.batch_size")
# May change in the phase a resume continues: the learning rates (e.g. lower after a divergence).
MID_PHASE = ("search.lr", "search.arch_lr", "search.divergence_factor", "finetune.lr", "finetune.divergence_factor")


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    """``{"data": {"root": r}}`` → ``{"data.root": r}`` (one level down; deeper values compare whole)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def check_resume(old: dict[str, Any], new: dict[str, Any], phases: dict[str, dict[str, Any]]) -> dict[str, tuple]:
    """The settings that differ between ``old`` and ``new`` configs, if a resume may change them.

    ``phases`` is the ledger (``{"search": {"done": bool, ...}}`` per phase that started). A change is
    refused (:class:`FnaError` listing every refused setting and why) when a finished phase depends on
    it, or a started one and it is not one of :data:`MID_PHASE`; :data:`ANYTIME` settings always pass.
    """
    a, b = _flat(old), _flat(new)
    changed = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    refused = []
    for key in changed:
        if _matches(key, ANYTIME):
            continue
        for phase in PHASES:
            if phase not in phases or not _matches(key, PHASE_SETTINGS[phase]):
                continue
            if phases[phase].get("done"):
                refused.append(f"{key} ({phase} is done)")
                break
            if not _matches(key, MID_PHASE):
                refused.append(f"{key} ({phase} has started; of its settings only "
                               f"{', '.join(m for m in MID_PHASE if m.startswith(phase))} may change)".replace(
                                   "only  may", "none may"))
                break
    if refused:
        raise FnaError("--resume with changed settings the run's finished or started phases depend on: "
                       + "; ".join(refused) + ". Settings of phases not started yet may change, and device, "
                       "logging, checkpoint interval and --skip-bad at any time; for the rest start a new run "
                       "with another --out")
    return changed


# -- the run directory ---------------------------------------------------------------------------------

class Ledger:
    """Seconds and device per phase in ``ledger.json``, written when a phase starts, at every
    :meth:`Clock.tick` while it runs (each progress report) and when it ends, so a killed run keeps
    the time it spent."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.phases: dict[str, dict[str, Any]] = read_json(path) or {}

    def done(self, phase: str) -> bool:
        return self.phases.get(phase, {}).get("done", False)

    def write(self) -> None:
        if dist.is_main():
            write_json(self.path, self.phases)

    @contextlib.contextmanager
    def phase(self, name: str, device: torch.device) -> Iterator[Clock]:
        entry = self.phases.setdefault(name, {"seconds": 0.0, "device": _device_name(device), "done": False})
        clock = Clock(self, entry)
        self.write()
        try:
            yield clock
            entry["done"] = True
        finally:
            clock.tick()


class Clock:
    """The running time of one ledger phase, added to what earlier (interrupted) runs of it spent."""

    def __init__(self, ledger: Ledger, entry: dict[str, Any]) -> None:
        self.ledger, self.entry = ledger, entry
        self.base, self.t0 = entry["seconds"], time.perf_counter()

    def tick(self) -> None:
        """Record the time spent so far (a small atomic write)."""
        self.entry["seconds"] = round(self.base + time.perf_counter() - self.t0, 3)
        self.ledger.write()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def open_run_dir(cfg: RunConfig, rd: RunDir, resume: bool, console: Console) -> None:
    """Create the run directory or check that ``cfg`` may continue the run in it; write its config.

    A directory whose run never started a phase is started over; one that did needs ``resume``.
    """
    run_dir, config_path = rd.root, rd.config
    if run_dir.exists() and not run_dir.is_dir():
        raise FnaError(f"{run_dir}: --out names a file, not a directory")
    if run_dir.is_dir():
        clear_stale_tmp(config_path)  # what a kill during the first config write leaves is not a run
    new = cfg.model_dump(mode="json")
    phases = read_json(rd.ledger) or {}
    if config_path.is_file() and phases:
        if not resume:
            raise FnaError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
        old = yaml_load(config_path)
        try:  # settings added since the run was written take their defaults, as the run had them
            old = RunConfig(**old).model_dump(mode="json")
        except (ValidationError, TypeError):
            pass  # compared as written: check_resume names what differs
        changed = check_resume(old, new, phases)
        if changed:
            console.print("resuming with changed settings: " + "; ".join(f"{k}: {a!r} → {b!r}"
                                                                         for k, (a, b) in changed.items()),
                          markup=False, highlight=False)
            change = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                      "done": [p for p in phases if phases[p].get("done")], "changed": changed}
            write_jsonl(rd.config_changes, [*read_jsonl(rd.config_changes), change])
    elif run_dir.is_dir() and any(run_dir.iterdir()) and not config_path.is_file():
        raise FnaError(f"{run_dir} exists and is not a run directory (no config.yaml); choose a new or empty --out")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FnaError(f"{run_dir}: cannot create the run directory ({e.strerror})") from None
    write_text_atomic(config_path, OmegaConf.to_yaml(OmegaConf.create(new)))


def yaml_load(path: Path) -> dict[str, Any]:
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[return-value]
    except Exception as e:
        raise FnaError(f"{path}: unreadable run config ({e})") from None


# -- data ----------------------------------------------------------------------------------------------

def eval_dataset(task: str, root: str | Path, fmt: str, split: str, skip_bad: bool = False) -> Any:
    """A split with evaluation transforms, every item checked up front (bad ones dropped with ``skip_bad``)."""
    return get_task(task).open_dataset(root, fmt, split, skip_bad=skip_bad).verify()


def open_datasets(cfg: RunConfig) -> tuple[Any, Any]:
    """(train set with training transforms, val set with eval transforms), every item of both checked
    (images decode, masks in the class range, annotations valid)."""
    d = cfg.data
    val = eval_dataset(cfg.task, d.root, d.format, d.val_split, d.skip_bad)
    train = cfg.spec.open_dataset(d.root, d.format, d.train_split, cfg.input_size, cfg.scale, d.skip_bad)
    if not d.augment:
        train = cfg.spec.without_augmentation(train, cfg.input_size, cfg.scale)
    return train.verify(), val


def data_input_size(cfg: RunConfig, val_set: Any) -> tuple[int, int]:
    """The network's input size on this data: that of the val split's first image (see ``Task.network_input``)."""
    return cfg.spec.network_input(cfg.input_size, tuple(val_set[0][0].shape[-2:]))


@dataclass
class Plan:
    """A run's checked settings and data: everything the phases need, known before the first one starts."""

    train_set: Any
    val_set: Any
    collate: Any
    class_names: tuple[str, ...]
    data_size: tuple[int, int]
    train_cfg: TrainConfig
    search_cfg: Any  # fna.search.SearchConfig, or None with a given architecture
    arch: Arch | None  # the given architecture
    seed: Seed | None  # loaded when the run remaps or searches


def prepare(cfg: RunConfig, console: Console) -> Plan:
    """Check every setting, the seed and every file of both splits; :class:`FnaError` on the first problem."""
    train_cfg = cfg.train_config()
    if cfg.arch is None:
        cfg.search_config()  # the search settings alone, before the data is read
    arch = get_arch(cfg.arch) if cfg.arch is not None else None
    seed = load_seed(cfg.seed, cfg.seed_weights) if cfg.arch is None or cfg.init == "remap" else None
    if seed is not None and arch is not None:
        check_compatible(seed.arch, arch)
    console.print(f"checking the {cfg.data.train_split} and {cfg.data.val_split} splits of "
                  f"{escape(cfg.data.root)}", highlight=False)
    train_set, val_set = open_datasets(cfg)
    for name, ds in (("train", train_set), ("val", val_set)):
        if getattr(ds, "skipped", None):
            console.print(f"skipped {len(ds.skipped)} bad {name} item(s): "
                          + "; ".join(f"{p}: {r}" for p, r in ds.skipped[:5]), markup=False, highlight=False)
    class_names = tuple(train_set.class_names)
    data_size = data_input_size(cfg, val_set)
    search_cfg = cfg.search_config(len(class_names), data_size) if cfg.arch is None else None
    return Plan(train_set, val_set, cfg.spec.collate, class_names, data_size, train_cfg, search_cfg, arch, seed)


# -- the run -------------------------------------------------------------------------------------------

def run(cfg: RunConfig, run_dir: str | Path, resume: bool = False, console: Console | None = None) -> dict:
    """Run (or continue, with ``resume``) every phase into ``run_dir``; returns ``summary.json``'s content."""
    console = console or Console()
    rd = RunDir(Path(run_dir))
    device = dist.resolve_device(cfg.device)
    dist.init_from_env(device)  # under torchrun: before any rank looks at the run directory
    if not dist.is_main():
        console = Console(quiet=True)
    plan = prepare(cfg, console)  # nothing is written before every setting and file has been checked
    if dist.is_main():
        open_run_dir(cfg, rd, resume, console)
    dist.barrier()
    ledger = Ledger(rd.ledger)
    spec = get_task(cfg.task)
    arch = _architecture(cfg, plan, rd, ledger, device, console)
    if ledger.done("finetune") and rd.model.exists():
        model, info = load_model(rd.model)
        arch = info.arch
    else:
        model, arch, provenance = _remapped_model(cfg, plan, arch, rd, ledger, device, console)
        train_cfg = plan.train_cfg
        console.print(f"[bold]fine-tune[/] {train_cfg.iters} iterations, batch {train_cfg.batch_size}")
        with ledger.phase("finetune", device) as clock, \
                Progress("fine-tune", train_cfg.iters, console=console, enabled=dist.is_main()) as bar:
            def progress(it: int, loss: float) -> None:
                bar.update(it, loss=loss)
                clock.tick()

            fit(model, spec, plan.train_set, plan.collate, train_cfg, rd.finetune, resume=resume,
                progress=progress)
            if dist.is_main():
                save_model(rd.model, model, cfg.task, arch, list(plan.class_names), cfg.model_kwargs(), provenance,
                           cfg.model_dump(mode="json"))

    if ledger.done("eval") and rd.metrics.exists():
        metrics = read_json(rd.metrics)
    else:
        with ledger.phase("eval", device):
            metrics = cfg.spec.evaluate(model, plan.val_set, cfg.eval, device, plan.class_names, rd.detections)
        if dist.is_main():
            write_json(rd.metrics, metrics)
    summary = _summary(cfg, arch, metrics, ledger, plan.data_size, len(plan.class_names))
    if dist.is_main():
        write_json(rd.summary, summary)
    console.print(f"[bold]{cfg.spec.metric}[/] {cfg.spec.format_metric(summary['metric'])} · "
                  f"{summary['madds_data'] / 1e9:.3f} GMAdds at {summary['data_size'][0]}×{summary['data_size'][1]} · "
                  f"{summary['params'] / 1e6:.3f}M params · run in {escape(str(rd.root))}")
    if dist.is_main():
        console.print(f"[bold]report[/] {escape(str(write_report(rd.root)[1]))}", highlight=False)
    return summary


def _architecture(cfg: RunConfig, plan: Plan, rd: RunDir, ledger: Ledger, device: torch.device,
                  console: Console) -> Arch:
    """The given architecture, or the one the search derives (``arch.json`` once done)."""
    if plan.arch is not None:
        arch = plan.arch
    elif ledger.done("search") and rd.arch.exists():
        arch = get_arch(rd.arch)
    else:
        console.print(f"[bold]search[/] {plan.search_cfg.epochs} epochs on {len(plan.train_set)} images")
        with ledger.phase("search", device) as clock:
            plain = cfg.spec.without_augmentation(plan.train_set, cfg.input_size, cfg.scale)
            arch = search(plan.search_cfg, plan.train_set, plan.collate, rd.search.root,
                          resume=rd.search.root.exists(), seed=plan.seed, on_step=lambda _: clock.tick(),
                          plain_dataset=plain).arch
    if dist.is_main():
        save_arch(arch, rd.arch, task=cfg.task, seed=cfg.seed,
                  source="search" if plan.arch is None else f"given: {cfg.arch}")
        save_arch(arch, rd.net_config)
    console.print(f"[bold]architecture[/]\n{arch.describe()}", highlight=False)
    return arch


def _remapped_model(cfg: RunConfig, plan: Plan, arch: Arch, rd: RunDir, ledger: Ledger, device: torch.device,
                    console: Console) -> tuple[torch.nn.Module, Arch, dict[str, Any]]:
    """The task model on ``arch`` with the seed's weights remapped into its backbone (or fresh ones), the
    architecture as built (with the seed's activation and BN eps) and the seed provenance to store."""
    spec = get_task(cfg.task)
    seed_everything(cfg.random_seed)  # fresh parts (head, uncovered entries) are the same on every run
    with ledger.phase("remap", device):
        if cfg.init == "random":
            backbone = spec.backbone(arch)
            note, provenance = "random initialisation (no remapping)", {"seed": None, "init": "random"}
        else:
            provenance = {**plan.seed.provenance, "init": "remap"}
            backbone, report = remap_seed(plan.seed, arch, spec.taps(arch), spec.output_stride)
            note = f"{report.fraction:.1%} of the backbone's parameters inherited from the seed"
            if dist.is_main():
                write_json(rd.remap_report, report.to_dict())
                write_text_atomic(rd.remap_markdown, report.to_markdown())
    console.print(f"[bold]remap[/] {note}")
    return spec.head(backbone, len(plan.class_names), **cfg.model_kwargs()), backbone.arch, provenance


def _summary(cfg: RunConfig, arch: Arch, metrics: dict, ledger: Ledger, data_size: tuple[int, int],
             num_classes: int) -> dict:
    paper = model_cost(cfg.task, arch, None, num_classes)
    at_data = model_cost(cfg.task, arch, data_size, num_classes)
    return {"task": cfg.task, "arch": arch.to_dict(), "net_config": arch.to_net_config(),
            "metric_name": cfg.spec.metric, "metric": metrics[cfg.spec.metric], "metrics": metrics,
            "madds_paper_size": paper.madds, "paper_size": list(get_task(cfg.task).paper_size),
            "madds_data": at_data.madds, "data_size": list(data_size), "params": at_data.params,
            "init": cfg.init, "phases": ledger.phases, "search_over_finetune": search_over_finetune(ledger.phases)}


def search_over_finetune(phases: dict[str, dict[str, Any]]) -> float | None:
    """The search's seconds ÷ fine-tuning's (the paper: 0.04 for segmentation, 1.9 for RetinaNet); ``None``
    without a search."""
    search, finetune = (float(phases.get(k, {}).get("seconds", 0)) for k in ("search", "finetune"))
    return round(search / finetune, 4) if search and finetune else None

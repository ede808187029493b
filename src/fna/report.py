"""The run report: what FNA did in one run directory, as ``report.md`` and a self-contained ``report.html``.

Every section is drawn from the files the phases wrote (layout in :mod:`fna.pipeline`): a phase that
did not run (no search for ``fna train``, no remapping for a random init) leaves its section out, and a
missing file is never an error (an unreadable one is listed at the top). Plots are PNGs in
``report/``; the HTML embeds them as data URIs, so the page opens anywhere on its own.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import yaml
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from fna.arch import BUILTIN_ARCHS, Arch, ArchError, load_arch, parse_op
from fna.checkpoint import write_text_atomic
from fna.cost import COST_UNITS
from fna.remap import RemapReport
from fna.rundir import RunDir, read_json, read_jsonl
from fna.seeds import SEEDS
from fna.supernet import alpha_probs

PLOTS = ("arch.png", "alpha.png", "curves.png", "lambda.png")
REMAP_ROWS = 12  # layers of remap_report.md shown in the report
PALETTE = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")
DPI = 110
HEATMAP = colormaps["viridis"].with_extremes(bad="#e4e4e4")  # grey: not a candidate of that layer


# -- what a run directory holds ---------------------------------------------------------------------

@dataclass
class RunFiles:
    """The contents of a run directory; ``None`` or empty for files that are not there.

    ``problems`` lists files that exist but could not be read.
    """

    root: Path
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    ledger: dict[str, Any] | None = None
    arch: Arch | None = None
    search_log: list[dict[str, Any]] = field(default_factory=list)
    alpha_history: list[dict[str, Any]] = field(default_factory=list)
    lambdas: list[dict[str, Any]] = field(default_factory=list)
    search_config: dict[str, Any] = field(default_factory=dict)
    derived: dict[str, Any] | None = None  # search/arch.json: how the arch was derived and its cost
    diagnostics: dict[str, Any] | None = None  # search/diagnostics.json: did the search decide anything
    candidates: list[list[list[str]]] | None = None  # op names per searched stage and layer
    remap: RemapReport | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def searched(self) -> bool:
        return bool(self.search_log or self.alpha_history)

    @property
    def task(self) -> str:
        return str((self.summary or {}).get("task") or self.config.get("task") or self.search_config.get("task", "?"))

    def seed_arch(self) -> Arch | None:
        """The seed's architecture when it is known without loading weights."""
        name = self.config.get("seed") or self.search_config.get("seed")
        spec = SEEDS.get(name)
        return (spec.arch if spec is not None else None) or BUILTIN_ARCHS.get(name)


def read_run(run_dir: str | Path) -> RunFiles:
    """Everything the report uses from ``run_dir`` (layout: :mod:`fna.rundir`)."""
    rd = RunDir(Path(run_dir))
    run = RunFiles(rd.root)
    p = run.problems
    if rd.config.is_file():
        try:
            run.config = yaml.safe_load(rd.config.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            p.append(f"{rd.config.name}: unreadable ({e})")
    run.summary = read_json(rd.summary, p)
    run.metrics = read_json(rd.metrics, p) or (run.summary or {}).get("metrics")
    run.ledger = read_json(rd.ledger, p) or (run.summary or {}).get("phases")
    search = rd.search
    run.search_config = read_json(search.config, p) or {}
    run.alpha_history = read_json(search.alpha_history, p) or []
    run.lambdas = read_json(search.lambdas, p) or []
    run.derived = read_json(search.arch, p)
    run.diagnostics = read_json(search.diagnostics, p)
    run.search_log = read_jsonl(search.log, p)
    table_paths = [search.cost_table] + ([Path(run.search_config["latency_table"])]
                                         if run.search_config.get("latency_table") else [])
    for path in table_paths:
        table = read_json(path, p)
        if table and "candidates" in table:
            run.candidates = table["candidates"]
            break
    for path in (rd.arch, search.arch):
        if path.is_file():
            try:
                run.arch = load_arch(path)
                break
            except ArchError as e:
                p.append(str(e))
    if run.arch is None and run.summary and "arch" in run.summary:
        run.arch = Arch.from_dict(run.summary["arch"])
    remap = read_json(rd.remap_report, p)
    if remap is not None:
        try:
            run.remap = RemapReport.from_dict(remap)
        except (KeyError, TypeError) as e:
            p.append(f"{rd.remap_report.name}: not a remap report ({type(e).__name__}: {e})")
    return run


# -- document blocks, rendered to Markdown and HTML ---------------------------------------------

@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    path: Path
    alt: str


@dataclass
class Pre:
    text: str


@dataclass
class Link:
    text: str
    href: str


Block = Union[str, Table, Image, Pre, Link]  # a str is a paragraph of plain text


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _markdown(title: str, sections: list[tuple[str, list[Block]]], root: Path) -> str:
    out = [f"# {title}", ""]
    for heading, blocks in sections:
        out += [f"## {heading}", ""]
        for b in blocks:
            if isinstance(b, Table):
                out += [_md_row(b.header), "|" + "---|" * len(b.header)] + [_md_row(r) for r in b.rows]
            elif isinstance(b, Image):
                out.append(f"![{b.alt}]({b.path.relative_to(root).as_posix()})")
            elif isinstance(b, Pre):
                out += ["```", b.text, "```"]
            elif isinstance(b, Link):
                out.append(f"[{b.text}]({b.href})")
            else:
                out.append(b)
            out.append("")
    return "\n".join(out)


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:1.8em}table{border-collapse:collapse;margin:.6em 0;font-size:.92em}th,td{border:1px solid #ccc;
padding:.25em .6em;text-align:left;vertical-align:top}th{background:#f3f3f3}img{max-width:100%;display:block;
margin:.6em 0}pre{background:#f6f6f6;padding:.6em;overflow-x:auto}"""


def _html(title: str, sections: list[tuple[str, list[Block]]]) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
           f"<style>{CSS}</style></head><body>", f"<h1>{e(title)}</h1>"]
    for heading, blocks in sections:
        out.append(f"<h2>{e(heading)}</h2>")
        for b in blocks:
            if isinstance(b, Table):
                out.append("<table><tr>" + "".join(f"<th>{e(str(h))}</th>" for h in b.header) + "</tr>")
                out += ["<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in b.rows]
                out.append("</table>")
            elif isinstance(b, Image):
                data = base64.b64encode(b.path.read_bytes()).decode("ascii")
                out.append(f'<img alt="{e(b.alt)}" src="data:image/png;base64,{data}">')
            elif isinstance(b, Pre):
                out.append(f"<pre>{e(b.text)}</pre>")
            elif isinstance(b, Link):
                out.append(f'<p><a href="{e(b.href)}">{e(b.text)}</a></p>')
            else:
                out.append(f"<p>{e(b)}</p>")
    out.append("</body></html>")
    return "\n".join(out)


# -- plots --------------------------------------------------------------------------------------

def _kernel_colours(archs: list[Arch]) -> dict[int, str]:
    kernels = sorted({op.kernel for a in archs for s in a.stages for op in map(parse_op, s.ops) if op is not None})
    return {k: PALETTE[i % len(PALETTE)] for i, k in enumerate(kernels)}


def plot_archs(rows: list[tuple[str, Arch]], path: Path) -> None:
    """One row of boxes per network, stages aligned in columns: colour = kernel, height = expansion (a
    ResNet block's: one over its groups), dashed hollow box = skip."""
    archs = [a for _, a in rows]
    colours = _kernel_colours(archs)
    max_e = max((op.scale for a in archs for s in a.stages for op in map(parse_op, s.ops) if op is not None),
                default=1)
    n_stages = max(len(a.stages) for a in archs)
    widths = [max(len(a.stages[i].ops) for a in archs if i < len(a.stages)) for i in range(n_stages)]
    starts = np.concatenate([[0], np.cumsum(np.array(widths) + 0.6)])
    fig = Figure(figsize=(max(7.0, 0.42 * starts[-1] + 2.0), 1.3 + 1.1 * len(rows)), layout="constrained")
    ax = fig.add_subplot()
    ys = [1.25 * (len(rows) - 1 - r) for r in range(len(rows))]
    for i, (x0, w) in enumerate(zip(starts, widths)):
        ax.add_patch(Rectangle((x0 - 0.3, -0.65), w, ys[0] + 1.3, color="#f2f2f2" if i % 2 else "#e6ecf3",
                               zorder=0, lw=0))
        ref = next(a.stages[i] for a in archs if i < len(a.stages))
        ax.text(x0 + w / 2 - 0.3, ys[0] + 0.72, f"{ref.c_out}ch s{ref.stride}", ha="center", va="bottom", fontsize=8)
    for y, arch in zip(ys, archs):
        for x0, stage in zip(starts, arch.stages):
            for j, name in enumerate(stage.ops):
                op = parse_op(name)
                if op is None:
                    ax.add_patch(Rectangle((x0 + j - 0.2, y - 0.15), 0.8, 0.3, fill=False, ec="#888888", ls="--",
                                           lw=1.0, zorder=2))
                    continue
                h = 0.25 + 0.75 * op.scale / max_e
                ax.add_patch(Rectangle((x0 + j - 0.2, y - h / 2), 0.8, h, fc=colours[op.kernel], ec="#333333",
                                       lw=0.6, zorder=2))
                ax.text(x0 + j + 0.2, y, op.tag, ha="center", va="center", fontsize=6.5,
                        color="white", zorder=3)
    ax.set_xlim(-0.6, starts[-1] - 0.6)
    ax.set_ylim(-0.75, ys[0] + 1.05)
    ax.set_yticks(ys, [label for label, _ in rows], fontsize=9)
    ax.set_xticks([])
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    handles = [Patch(fc=c, ec="#333333", label=f"k{k}") for k, c in colours.items()]
    handles.append(Patch(fill=False, ec="#888888", ls="--", label="skip"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False,
              title="kernel\n(height ∝\nexpansion)", title_fontsize=8)
    fig.savefig(path, dpi=DPI)


def plot_alphas(history: list[dict[str, Any]], candidates: list[list[list[str]]], temperature: float,
                arch_start: int | None, path: Path) -> None:
    """Top: per searched stage, layers × candidates of softmax(α) at the last epoch (argmax outlined).
    Bottom: every layer's highest probability over the epochs, with its op named where the argmax changes."""
    probs_by_epoch = [[[p.numpy() for p in stage] for stage in alpha_probs(h["alpha"], temperature)]
                      for h in history]
    final = probs_by_epoch[-1]
    columns = [list(dict.fromkeys(n for layer in sorted(stage, key=len, reverse=True) for n in layer))
               for stage in candidates]
    n_layers = sum(len(s) for s in candidates)
    fig = Figure(figsize=(max(8.0, 0.32 * sum(map(len, columns)) + 2.5), 3.6 + 0.22 * n_layers),
                 layout="constrained")
    grid = fig.add_gridspec(2, len(candidates), width_ratios=[len(c) for c in columns],
                            height_ratios=[1.0, 0.1 + 0.11 * n_layers])
    image = None
    for s, (stage, cols, probs) in enumerate(zip(candidates, columns, final)):
        ax = fig.add_subplot(grid[0, s])
        matrix = np.full((len(stage), len(cols)), np.nan)
        for j, (names, p) in enumerate(zip(stage, probs)):
            for name, v in zip(names, p):
                matrix[j, cols.index(name)] = v
        image = ax.imshow(matrix, vmin=0, vmax=1, cmap=HEATMAP, aspect="auto")
        for j, (names, p) in enumerate(zip(stage, probs)):
            best = cols.index(names[int(np.argmax(p))])
            ax.add_patch(Rectangle((best - 0.5, j - 0.5), 1, 1, fill=False, ec="#e8384f", lw=1.6))
        ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=7)
        ax.set_yticks(range(len(stage)), [f"L{j}" for j in range(len(stage))], fontsize=7)
        ax.set_title(f"stage {s + 1}", fontsize=9)
    fig.colorbar(image, ax=fig.axes, location="right", shrink=0.8, label="softmax(α)")
    ax = fig.add_subplot(grid[1, :])
    flat = [[float(p.max()) for stage in epoch for p in stage] for epoch in probs_by_epoch]
    best = [[names[int(np.argmax(p))] for stage, layers in zip(epoch, candidates) for names, p in zip(layers, stage)]
            for epoch in probs_by_epoch]
    epochs = [int(h["epoch"]) + 1 for h in history]
    ax.imshow(np.array(flat).T, vmin=0, vmax=1, cmap=HEATMAP, aspect="auto",
              extent=(epochs[0] - 0.5, epochs[-1] + 0.5, n_layers - 0.5, -0.5))
    for layer in range(n_layers):
        for e, epoch in enumerate(epochs):
            if e == 0 or best[e][layer] != best[e - 1][layer]:
                ax.text(epoch, layer, best[e][layer], ha="center", va="center", fontsize=5.5,
                        color="white" if flat[e][layer] < 0.6 else "black")
    labels = [f"s{s + 1}.L{j}" for s, stage in enumerate(candidates) for j in range(len(stage))]
    ax.set_yticks(range(n_layers), labels, fontsize=6)
    ax.set_xlabel("epoch")
    ax.set_title("highest probability per layer over the search (op named where the argmax changes)", fontsize=9)
    if arch_start is not None and epochs[0] <= arch_start < epochs[-1]:
        ax.axvline(arch_start + 0.5, color="white", ls="--", lw=1)
    fig.savefig(path, dpi=DPI)


def _cost_unit(log: list[dict[str, Any]]) -> tuple[str, float]:
    """(axis label, factor from the table unit to it) for the search's cost unit."""
    unit = log[-1].get("cost_unit", "madds") if log else "madds"
    return ("GMAdds" if unit == "madds" else unit), COST_UNITS.get(unit, 1.0)


def plot_curves(log: list[dict[str, Any]], budget: float | None, tolerance: float, arch_start: int | None,
                path: Path) -> None:
    """Weight/arch loss and expected/derived cost per epoch of the search."""
    label, scale = _cost_unit(log)
    epochs = [int(r["epoch"]) + 1 for r in log]
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    loss_ax, cost_ax = fig.subplots(1, 2)
    loss_ax.plot(epochs, [r.get("weight_loss", math.nan) for r in log], "o-", label="weight step (task loss)")
    arch_loss = [math.nan if r.get("arch_loss") is None else r["arch_loss"] for r in log]
    loss_ax.plot(epochs, arch_loss, "s-", label="architecture step (task loss)")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="task loss")
    cost_ax.plot(epochs, [r.get("expected_cost", math.nan) for r in log], "o-", label="expected under softmax(α)")
    cost_ax.plot(epochs, [r.get("derived_cost", math.nan) * scale for r in log], "s-", label="derived (argmax) path")
    if budget is not None:
        cost_ax.axhline(budget * scale, color="#c44e52", lw=1, label="budget")
        cost_ax.axhspan(budget * scale * (1 - tolerance), budget * scale * (1 + tolerance), color="#c44e52",
                        alpha=0.12, lw=0)
    cost_ax.set(xlabel="epoch", ylabel=label, title="network cost")
    for ax in (loss_ax, cost_ax):
        if arch_start is not None and 0 < arch_start < len(epochs):
            ax.axvline(arch_start + 0.5, color="#888888", ls=":", lw=1, label="α updates start")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=DPI)


def plot_lambda(log: list[dict[str, Any]], lambdas: list[dict[str, Any]], budget: float | None, tolerance: float,
                path: Path) -> None:
    """λ over the search; with a hard budget, per architecture step with the derived cost ÷ budget beside."""
    fig = Figure(figsize=(10 if lambdas else 5.5, 3.4), layout="constrained")
    if lambdas and budget:
        lam_ax, ratio_ax = fig.subplots(1, 2)
        steps = [r["global_step"] for r in lambdas]
        lam_ax.plot(steps, [r["lambda"] for r in lambdas], "-")
        lam_ax.set(xlabel="weight step", ylabel="λ", title="λ (bounded multiplier toward the budget)")
        ratio_ax.plot(steps, [r.get("expected_cost", math.nan) / budget for r in lambdas], "-", color="#4c72b0",
                      label="expected under softmax(α)")
        ratio_ax.plot(steps, [r["derived_cost"] / budget for r in lambdas], "-", color="#dd8452",
                      label="derived (argmax) path")
        ratio_ax.axhline(1.0, color="#c44e52", lw=1, label="budget")
        ratio_ax.axhspan(1 - tolerance, 1 + tolerance, color="#c44e52", alpha=0.12, lw=0, label=f"±{tolerance:.0%}")
        ratio_ax.set(xlabel="weight step", ylabel="cost ÷ budget", title="architecture cost vs budget")
        ratio_ax.legend(fontsize=8)
    else:
        lam_ax = fig.subplots()
        lam_ax.plot([int(r["epoch"]) + 1 for r in log], [r.get("lam", math.nan) for r in log], "o-")
        lam_ax.set(xlabel="epoch", ylabel="λ", title="λ (fixed: no hard budget)")
        lam_ax.xaxis.get_major_locator().set_params(integer=True)
    fig.savefig(path, dpi=DPI)


# -- sections -----------------------------------------------------------------------------------

def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "—" if v is None else str(v)
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _overview(run: RunFiles) -> list[Block]:
    cfg = run.config
    facts = [f"task {run.task}", f"seed {cfg.get('seed', run.search_config.get('seed', '?'))}"]
    if cfg.get("init"):
        facts.append(f"init {cfg['init']}")
    if run.arch is not None:
        found = " (found by the search)" if run.searched else ""
        facts.append(f"architecture {run.arch.name or '(unnamed)'}{found}")
    phases = [k for k, v in (run.ledger or {}).items() if v.get("done")]
    facts.append("phases done: " + (", ".join(phases) if phases else "none recorded"))
    blocks: list[Block] = ["; ".join(facts) + "."]
    blocks += [f"Could not read {p}" for p in run.problems]
    return blocks


def _arch_section(run: RunFiles, seed_arch: Arch | None, fig_dir: Path) -> list[Block]:
    if run.arch is None:
        return ["No architecture recorded yet (arch.json is missing)."]
    rows = ([(f"seed\n{seed_arch.name or 'seed'}", seed_arch)] if seed_arch is not None else [])
    rows.append((f"{'found' if run.searched else 'target'}\n{run.arch.name or 'arch'}", run.arch))
    plot_archs(rows, fig_dir / "arch.png")
    blocks: list[Block] = [Image(fig_dir / "arch.png", "architecture beside the seed"),
                           Pre(run.arch.describe())]
    if run.derived:
        cost = run.derived.get("cost", {})
        text = f"Derived by: {run.derived.get('derive', '?')}."
        if cost.get("madds") is not None:
            size = "×".join(map(str, cost.get("size", [])))
            text += f" {cost['madds'] / 1e9:.3f} GMAdds at {size}, {cost.get('params', 0) / 1e6:.3f}M params."
        if cost.get("budget") is not None:
            text += f" Budget {cost['budget']:,.6g} ({cost.get('table_unit', '')})."
        blocks.append(text)
    return blocks


def _search_section(run: RunFiles, fig_dir: Path) -> list[Block]:
    cfg = run.search_config
    budget = next((cfg[k] for k in ("budget_madds", "budget_latency_ms") if cfg.get(k) is not None), None)
    tolerance = float(cfg.get("budget_tolerance", 0.05))
    arch_start = cfg.get("arch_start_epoch")
    blocks: list[Block] = []
    if run.alpha_history and run.candidates:
        plot_alphas(run.alpha_history, run.candidates, float(cfg.get("temperature", 1.0)), arch_start,
                    fig_dir / "alpha.png")
        blocks += [Image(fig_dir / "alpha.png", "softmax(alpha) per layer"),
                   "softmax(α) at the last epoch, per searched stage (layers × candidates): red outline, the most "
                   "probable op of each layer; grey, not a candidate of that layer (first layers cannot skip)."]
    elif run.alpha_history:
        blocks.append("α heatmaps left out: the candidates' names are unknown (no cost or latency table).")
    if run.search_log:
        plot_curves(run.search_log, budget, tolerance, arch_start, fig_dir / "curves.png")
        plot_lambda(run.search_log, run.lambdas, budget, tolerance, fig_dir / "lambda.png")
        last = run.search_log[-1]
        entropy = np.mean([e for s in last.get("entropy", [[0]]) for e in s])
        blocks += [Image(fig_dir / "curves.png", "loss and cost curves"),
                   Image(fig_dir / "lambda.png", "lambda trajectory"),
                   f"Last epoch: skip share {last.get('skip_share', 0):.0%}, mean α entropy "
                   f"{entropy:.3f} nats, λ {last.get('lam', 0):.4g}."]
    return blocks


def _decision_section(d: dict[str, Any]) -> list[Block]:
    """diagnostics.json: one sentence, its warnings, the super network when architecture steps began, and
    a per-layer view."""
    blocks: list[Block] = [d.get("summary", ""), *[f"Warning: {w}" for w in d.get("warnings", [])]]
    state = d.get("supernet_at_arch_start") or {}
    if state.get("score_name"):
        loss = "" if state.get("train_loss") is None else f"training loss {state['train_loss']:.4f}, "
        blocks.append(f"When architecture steps began (epoch {state['epoch']}): {loss}{state['score_name']} "
                      f"{state['score']:.3f} on architecture-half batches (trivial predictor "
                      f"{state['trivial_score']:.3f}).")

    def mark(v: bool | None) -> str:
        return "—" if v is None else ("yes" if v else "no")

    rows = [[f"{layer['stage']}.{layer['layer']}", layer["chosen"], f"{layer['prob']:.3f}",
             f"{layer['decision_margin']:.3f}", f"{layer['alpha_entropy']:.3f}", mark(layer["significant"]),
             mark(layer.get("task_significant"))] for layer in d.get("layers", [])]
    blocks.append(Table(["stage.layer", "chosen", "p", "margin (top-1 − top-2)", "entropy / max", "significant",
                         "by the task loss"], rows))
    return blocks


def _remap_section(report: RemapReport) -> list[Block]:
    rows = report.rows()
    blocks: list[Block] = [f"Inherited {report.inherited:,} of {report.total:,} parameters ({report.fraction:.1%}).",
                           *report.notes, Table(list(report.ROW_HEADER), rows[:REMAP_ROWS])]
    if len(rows) > REMAP_ROWS:
        blocks.append(f"… and {len(rows) - REMAP_ROWS} more layers.")
    blocks.append(Link("Full per-layer remap report: remap_report.md", "remap_report.md"))
    return blocks


def _metrics_section(run: RunFiles) -> list[Block]:
    summary, metrics = run.summary or {}, run.metrics or {}
    rows = [[k, _fmt(v)] for k, v in metrics.items() if v is None or isinstance(v, (int, float))]  # None: undefined
    main = summary.get("metric_name")
    rows.sort(key=lambda r: r[0] != main)
    if "madds_paper_size" in summary:
        size = "×".join(map(str, summary.get("paper_size", [])))
        rows.append([f"MAdds at paper size ({size})", f"{summary['madds_paper_size'] / 1e9:.3f} G"])
    if "madds_data" in summary:
        size = "×".join(map(str, summary.get("data_size", [])))
        rows.append([f"MAdds at this data's size ({size})", f"{summary['madds_data'] / 1e9:.3f} G"])
    if "params" in summary:
        rows.append(["params", f"{summary['params'] / 1e6:.3f} M"])
    if summary.get("latency_ms") is not None:
        rows.append(["latency", f"{summary['latency_ms']:.2f} ms"])
    if summary.get("latency_predicted_ms") is not None:
        rows.append(["latency predicted by the table", f"{summary['latency_predicted_ms']:.2f} ms"])
    if not rows:
        return ["No metrics yet (the run has not been evaluated)."]
    blocks: list[Block] = [Table(["quantity", "value"], rows)]
    per_class = metrics.get("per_class_iou")
    if isinstance(per_class, dict) and per_class:
        blocks.append(Table(["class", "IoU"], [[k, _fmt(v)] for k, v in per_class.items()]))
    return blocks


def _ledger_section(ledger: dict[str, Any]) -> list[Block]:
    rows = [[name, f"{e.get('seconds', 0):.1f}", str(e.get("device", "?")), "yes" if e.get("done") else "no"]
            for name, e in ledger.items()]
    total = sum(float(e.get("seconds", 0)) for e in ledger.values())
    rows.append(["total", f"{total:.1f}", "", ""])
    blocks: list[Block] = [Table(["phase", "seconds", "device", "done"], rows)]
    search, finetune = (float(ledger.get(k, {}).get("seconds", 0)) for k in ("search", "finetune"))
    if search and finetune:
        blocks.append(f"search ÷ fine-tune = {search / finetune:.2f} (the search cost {search:.1f} s, "
                      f"fine-tuning {finetune:.1f} s).")
    return blocks


def write_report(run_dir: str | Path, seed_arch: Arch | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` (plots in ``report/``) into ``run_dir``; returns their paths.

    ``seed_arch``: the seed drawn beside the architecture (default: the run config's seed, when its
    architecture is known without weights).
    """
    run = read_run(run_dir)
    rd = RunDir(run.root)
    seed_arch = seed_arch or run.seed_arch()
    fig_dir = rd.figures
    fig_dir.mkdir(parents=True, exist_ok=True)
    for name in PLOTS:
        (fig_dir / name).unlink(missing_ok=True)
    sections: list[tuple[str, list[Block]]] = [("Overview", _overview(run)),
                                                ("Architecture", _arch_section(run, seed_arch, fig_dir))]
    if run.searched:
        sections.append(("Architecture search", _search_section(run, fig_dir)))
    if run.diagnostics:
        sections.append(("Did the search decide?", _decision_section(run.diagnostics)))
    if run.remap is not None:
        sections.append(("Parameter remapping", _remap_section(run.remap)))
    sections.append(("Metrics", _metrics_section(run)))
    if run.ledger:
        sections.append(("Cost ledger", _ledger_section(run.ledger)))
    title = f"FNA run report: {rd.root.resolve().name}"
    md_path, html_path = rd.report_markdown, rd.report_html
    write_text_atomic(md_path, _markdown(title, sections, rd.root))
    write_text_atomic(html_path, _html(title, sections))
    return md_path, html_path

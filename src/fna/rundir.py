"""Where a run keeps what: every path and file format of a run directory, a search directory and a
Pareto search, in one place. The phases write through these objects and the report reads through
them, so a file's name and format are defined once.

A run directory (``fna adapt`` / ``fna train``)::

    config.yaml            the resolved run config       config_changes.jsonl   what resumes changed
    ledger.json            seconds and device per phase   search/                a SearchDir (adapt only)
    arch.json              the architecture (see :func:`fna.arch.save_arch`), arch.net_config.txt
    remap_report.json      what the seed gave the target (data), remap_report.md (rendered)
    finetune/              fine-tuning checkpoint, TensorBoard
    model.fna.pt           the fine-tuned model           metrics.json, detections.json, summary.json
    report.md, report.html, report/ (figures)

A search directory (``search/`` of a run, or ``fna search --out``): ``checkpoint.pt``,
``cost_table.json``, ``search_log.jsonl`` (one record per epoch), ``alpha_history.json``,
``lambda.json``, ``config.json``, ``arch.json``, ``arch.net_config.txt``, ``diagnostics.json`` (did the
search decide anything, :mod:`fna.search.diagnostics`), ``tensorboard/``, ``debug/``.

A Pareto search (``fna search --pareto``): ``warmup/`` and ``branches/<budget>/`` (search
directories), ``pareto/arch_<budget>.json``, ``pareto/pareto.json``, ``pareto/pareto.png``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fna.checkpoint import write_text_atomic


def read_json(path: Path, problems: list[str] | None = None) -> Any:
    """The JSON in ``path``, or ``None`` when it is absent; an unreadable file is noted in ``problems``
    (or raised when no list is given)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        if problems is None:
            raise
        problems.append(f"{path.name}: unreadable ({e})")
        return None


def write_json(path: Path, data: Any, indent: int | None = 2) -> None:
    """``data`` as JSON into ``path``, atomically."""
    write_text_atomic(path, json.dumps(data, indent=indent))


def read_jsonl(path: Path, problems: list[str] | None = None) -> list[Any]:
    """One JSON record per line; malformed lines are skipped and noted in ``problems``."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            if problems is not None:
                problems.append(f"{path.name}: skipped a malformed line ({line[:40]!r})")
    return records


def write_jsonl(path: Path, records: list[Any]) -> None:
    """``records`` one per line, atomically (so the file always matches the state it was written from)."""
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


@dataclass(frozen=True)
class SearchDir:
    """The files of one search."""

    root: Path

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint.pt"

    @property
    def cost_table(self) -> Path:
        return self.root / "cost_table.json"

    @property
    def log(self) -> Path:
        return self.root / "search_log.jsonl"

    @property
    def alpha_history(self) -> Path:
        return self.root / "alpha_history.json"

    @property
    def lambdas(self) -> Path:
        return self.root / "lambda.json"

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def arch(self) -> Path:
        return self.root / "arch.json"

    @property
    def net_config(self) -> Path:
        return self.root / "arch.net_config.txt"

    @property
    def diagnostics(self) -> Path:
        return self.root / "diagnostics.json"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def debug(self) -> Path:
        return self.root / "debug"

    def holds_a_search(self) -> bool:
        """Whether a search has written here already."""
        return any(p.exists() for p in (self.checkpoint, self.arch, self.log, self.alpha_history))


@dataclass(frozen=True)
class RunDir:
    """The files of one run."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def config_changes(self) -> Path:
        return self.root / "config_changes.jsonl"

    @property
    def ledger(self) -> Path:
        return self.root / "ledger.json"

    @property
    def search(self) -> SearchDir:
        return SearchDir(self.root / "search")

    @property
    def arch(self) -> Path:
        return self.root / "arch.json"

    @property
    def net_config(self) -> Path:
        return self.root / "arch.net_config.txt"

    @property
    def remap_report(self) -> Path:
        return self.root / "remap_report.json"

    @property
    def remap_markdown(self) -> Path:
        return self.root / "remap_report.md"

    @property
    def finetune(self) -> Path:
        return self.root / "finetune"

    @property
    def model(self) -> Path:
        return self.root / "model.fna.pt"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def detections(self) -> Path:
        return self.root / "detections.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def report_markdown(self) -> Path:
        return self.root / "report.md"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def figures(self) -> Path:
        return self.root / "report"


@dataclass(frozen=True)
class ParetoDir:
    """The files of a Pareto search: one shared warm-up, one branch per budget, the set."""

    root: Path

    @property
    def warmup(self) -> SearchDir:
        return SearchDir(self.root / "warmup")

    def branch(self, label: str) -> SearchDir:
        return SearchDir(self.root / "branches" / label)

    def arch(self, label: str) -> Path:
        return self.root / "pareto" / f"arch_{label}.json"

    @property
    def index(self) -> Path:
        return self.root / "pareto" / "pareto.json"

    @property
    def plot(self) -> Path:
        return self.root / "pareto" / "pareto.png"

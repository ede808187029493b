"""Progress of a long phase (search, fine-tuning): a live bar on a terminal, plain lines elsewhere.

Under ``nohup``, CI or a cluster job log a live bar prints nothing useful, so when the console is not
a terminal :class:`Progress` prints one line every ``interval`` seconds instead::

    fine-tune 120/400 loss 0.5321 3.21 it/s ETA 1m27s

``FNA_PROGRESS_INTERVAL`` (seconds) overrides the default interval of 30 s; ``0`` prints every update.
"""

from __future__ import annotations

import os
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

DEFAULT_INTERVAL_S = 30.0


def format_duration(seconds: float) -> str:
    """``95`` → ``1m35s``; ``4000`` → ``1h06m``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Reports ``step/total`` of one phase with the latest values (``loss=...``).

    Use as a context manager; ``enabled=False`` (e.g. on every rank but the first) reports nothing.
    """

    def __init__(self, name: str, total: int, start: int = 0, console: Console | None = None,
                 enabled: bool = True, interval: float | None = None) -> None:
        self.name, self.total, self.start = name, total, start
        self.console = console or Console()
        self.enabled = enabled
        if interval is None:
            interval = float(os.environ.get("FNA_PROGRESS_INTERVAL", DEFAULT_INTERVAL_S))
        self.interval = interval
        self._bar: RichProgress | None = None
        self._task: Any = None
        self._t0 = self._last = time.perf_counter()

    def __enter__(self) -> Progress:
        if self.enabled and self.console.is_terminal:
            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TimeRemainingColumn(), console=self.console,
                                     transient=True)
            self._bar.start()
            self._task = self._bar.add_task(self.name, total=self.total, completed=self.start)
        self._t0 = self._last = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def update(self, step: int, **values: float | int) -> None:
        """``step`` of ``total`` is done; ``values`` (e.g. ``loss``) are shown beside it."""
        if not self.enabled:
            return
        shown = " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
        if self._bar is not None:
            self._bar.update(self._task, completed=step, description=f"{self.name} {shown}".strip())
            return
        now = time.perf_counter()
        if now - self._last < self.interval and step < self.total:
            return
        self._last = now
        done = step - self.start
        rate = done / (now - self._t0) if done > 0 and now > self._t0 else 0.0
        eta = f" ETA {format_duration((self.total - step) / rate)}" if rate > 0 and step < self.total else ""
        self.console.print(f"{self.name} {step}/{self.total} {shown} {rate:.2f} it/s{eta}".replace("  ", " "),
                           highlight=False, markup=False, soft_wrap=True)

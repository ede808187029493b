"""Runs ``fna.pipeline.run`` in its own process and kills itself with SIGKILL at a chosen point, as a
crash, an OOM kill or ``kill -9`` would: no ``finally`` block, no flush, no cleanup runs.

    python kill_worker.py CONFIG_JSON RUN_DIR POINT

``POINT`` is ``search:N`` / ``fine-tune:N`` (right after that phase's N-th step, before its checkpoint)
or ``phase:NAME`` (as the ledger phase NAME starts).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys

import torch

from fna import pipeline, progress


def kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main(config_json: str, run_dir: str, point: str) -> None:
    torch.set_num_threads(1)
    kind, _, arg = point.partition(":")
    if kind == "phase":
        original = pipeline.Ledger.phase

        @contextlib.contextmanager
        def phase(self, name, device):
            with original(self, name, device) as clock:
                if name == arg:
                    kill()
                yield clock

        pipeline.Ledger.phase = phase
    else:
        update = progress.Progress.update

        def counted(self, step, **values):
            update(self, step, **values)
            if self.name == kind and step == int(arg):
                kill()

        progress.Progress.update = counted
    pipeline.run(pipeline.RunConfig(**json.loads(config_json)), run_dir)


if __name__ == "__main__":
    main(*sys.argv[1:])

"""Running a test script under ``torchrun`` (two CPU processes, gloo)."""

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent


def torchrun(script: str, *args: str) -> None:
    """Run ``script`` (in tests/) under ``torchrun --nproc_per_node=2`` on CPU; fail with its stderr."""
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "FNA_NUM_WORKERS": "0"}
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node=2",
           str(TESTS / script), *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]

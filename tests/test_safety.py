"""Files fna reads never run code; files it writes are atomic, umask-moded, and fail on one line."""

from __future__ import annotations

import os
import pickle
import random
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import fna
from fna.arch import Arch, Stage
from fna.artifact import load_model, save_model
from fna.checkpoint import (UnsafeFileError, WriteError, load_checkpoint, rng_state, save_atomic, set_rng_state,
                            write_text_atomic)
from fna.cli import main
from fna.errors import FnaError
from fna.tasks import build_model

TINY = Arch(stages=(Stage(8, 8, 1, ("k3_e1",)), Stage(8, 12, 2, ("k3_e3",))), stem_channels=8, final_channels=16)


class Payload:
    """Unpickling this runs a shell command that creates ``marker`` (what a crafted model file would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _crafted(path: Path, marker: Path, how: str) -> Path:
    """A file that looks like an fna model but runs code when unpickled: torch's zip format or a bare pickle."""
    blob = {"format": "fna-model", "format_version": 1, "state_dict": Payload(marker)}
    if how == "torch.save":
        torch.save(blob, path)
    else:
        path.write_bytes(pickle.dumps(blob, protocol=int(how.removeprefix("pickle-protocol-"))))
    return path


CRAFTED = ["torch.save", "pickle-protocol-2", "pickle-protocol-4"]


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("how", CRAFTED)
@pytest.mark.parametrize("loader", [load_model, fna.load, load_checkpoint], ids=["load_model", "fna.load",
                                                                                  "load_checkpoint"])
def test_a_file_that_would_run_code_is_refused_and_nothing_runs(tmp_path, loader, how):
    marker = tmp_path / "ran"
    path = _crafted(tmp_path / "model.fna.pt", marker, how)
    with pytest.raises(FnaError) as err:
        loader(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and not marker.exists()
    if how == "pickle-protocol-4":  # torch's safe unpickler stops at the first opcode it lacks, before any global
        assert "not a readable" in message and "not tensors and plain data" in message
    else:
        assert isinstance(err.value, UnsafeFileError) and "refused: it would import posix.system" in message


def test_the_crafted_file_does_run_code_when_unpickled_unsafely(tmp_path):
    """Proves the refusal tests above use a file that is really dangerous."""
    marker = tmp_path / "ran"
    torch.load(_crafted(tmp_path / "model.fna.pt", marker, "torch.save"), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("command", [["load"], ["export"], ["export", "--format", "torchscript"],
                                     ["eval", "--data", "{data}", "--format", "folder"]])
def test_cli_refuses_a_crafted_model_file_on_one_line(tmp_path, monkeypatch, capsys, command):
    marker = tmp_path / "ran"
    path = _crafted(tmp_path / "model.fna.pt", marker, "torch.save")
    args = [a.replace("{data}", str(tmp_path)) for a in command]
    monkeypatch.setattr(sys, "argv", ["fna", args[0], str(path), *args[1:]])
    with pytest.raises(SystemExit) as exit_:
        main()
    line = _one_line(capsys.readouterr().err)
    assert exit_.value.code == 1 and f"{path}: refused: it would import posix.system" in line
    assert not marker.exists() and not list(tmp_path.glob("model.onnx")) and not list(tmp_path.glob("*.torchscript.pt"))


def test_rng_state_is_plain_data_and_round_trips_through_a_checkpoint(tmp_path):
    save_atomic({"rng": rng_state()}, tmp_path / "checkpoint.pt")
    expected = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    set_rng_state(load_checkpoint(tmp_path / "checkpoint.pt")["rng"])
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()) == expected


def test_saving_what_loading_would_refuse_fails_and_writes_nothing(tmp_path):
    with pytest.raises(TypeError, match="numpy.ndarray"):
        save_atomic({"state": np.zeros(3)}, tmp_path / "checkpoint.pt")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask-022", "umask-027"])
def test_written_files_get_the_umask_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        save_model(tmp_path / "model.fna.pt", build_model("seg", TINY, 2), "seg", TINY, ["a", "b"])
        save_atomic({"iter": 1}, tmp_path / "checkpoint.pt")
        write_text_atomic(tmp_path / "arch.json", "{}")
        (tmp_path / "plain.txt").write_text("")  # what any other file of the run gets
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["model.fna.pt", "checkpoint.pt", "arch.json", "plain.txt"], 0o666 & ~umask)


def test_a_killed_write_leaves_a_temporary_file_that_the_next_write_removes(tmp_path):
    target = tmp_path / "checkpoint.pt"
    killer = textwrap.dedent(f"""
        import os, signal, torch
        from fna.checkpoint import save_atomic

        class Kill:  # the process dies while torch.save is writing the temporary file
            def __reduce__(self):
                os.kill(os.getpid(), signal.SIGKILL)

        save_atomic({{"weights": torch.zeros(1000), "then": Kill()}}, {str(target)!r})
    """)
    assert subprocess.run([sys.executable, "-c", killer]).returncode == -signal.SIGKILL
    stale = list(tmp_path.glob(".checkpoint.pt.*.tmp"))
    assert len(stale) == 1 and not target.exists()
    others = [tmp_path / ".checkpoint.pt.tmp", tmp_path / ".checkpoint.pt.k3_9x2qa.tmp"]  # older fna's names
    keep = [tmp_path / ".checkpoint.pt.bak.0123abcd.tmp", tmp_path / ".model.fna.pt.0123abcd.tmp",
            tmp_path / "checkpoint.pt.0123abcd.tmp"]  # other files' temporaries, or not temporaries
    for p in others + keep:
        p.write_bytes(b"x")
    save_atomic({"iter": 1}, target)
    assert sorted(tmp_path.iterdir()) == sorted([target, *keep])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders (see the tmpfs tests)")
def test_read_only_folder_is_one_line_naming_the_file(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        with pytest.raises(WriteError, match=rf"^{out / 'checkpoint.pt'}: cannot write: permission denied$"):
            save_atomic({"iter": 1}, out / "checkpoint.pt")
        with pytest.raises(WriteError, match=rf"^{out / 'run' / 'arch.json'}: cannot write: permission denied "
                                             rf"\({out / 'run'}\)$"):
            write_text_atomic(out / "run" / "arch.json", "{}")
        assert os.listdir(out) == []
    finally:
        out.chmod(0o755)


def _user_namespaces() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "mount -t tmpfs -o size=16k fna-probe /tmp"], capture_output=True)  # private: unseen here
    return probe.returncode == 0


needs_tmpfs = pytest.mark.skipif(not _user_namespaces(), reason="no user namespaces to mount a small tmpfs in")


def _on_tmpfs(mount: Path, options: str, script: str) -> subprocess.CompletedProcess:
    """Run ``script`` (Python) in a private mount namespace where ``mount`` is a tmpfs with ``options``.

    The file system is real (the kernel reports ENOSPC/EROFS); it vanishes with the process.
    """
    mount.mkdir()
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                           'mount -t tmpfs -o "$1" fna-test "$2" && exec "$3" -c "$4"', "sh", options, str(mount),
                           sys.executable, textwrap.dedent(script)], capture_output=True, text=True, timeout=300)


WRITERS = """
    import contextlib, io, os, sys, torch
    from fna.checkpoint import FnaError, save_atomic, write_text_atomic
    from fna.cli import main

    def attempt(write, path):
        try:
            write(path)
            print("wrote", path)
        except FnaError as e:
            print(type(e).__name__, e)

    attempt(lambda p: save_atomic({"weights": torch.zeros(250_000)}, p), "{mnt}/run/checkpoint.pt")
    attempt(lambda p: write_text_atomic(p, "x" * 1_000_000), "{mnt}/run/log.txt")
    sys.argv = ["fna", "export", "{model}", "--out", "{mnt}/run/model.onnx", "--size", "64", "64"]
    with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.suppress(SystemExit):
        main()
    print("cli", err.getvalue().strip().replace(chr(10), " | "))
    print("left", sorted(os.listdir("{mnt}/run")) if os.path.isdir("{mnt}/run") else "no folder")
"""


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model.fna.pt"
    save_model(path, build_model("seg", TINY, 2), "seg", TINY, ["a", "b"])
    return path


@needs_tmpfs
def test_full_disk_is_one_line_naming_the_file_and_leaves_no_temporary_file(tmp_path, model_file):
    mnt = tmp_path / "small"
    # 160 KiB: the folder fits, the 1 MB checkpoint, text file and ~100 KiB+ ONNX file do not
    run = _on_tmpfs(mnt, "size=160k", WRITERS.replace("{mnt}", str(mnt)).replace("{model}", str(model_file)))
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == f"WriteError {mnt}/run/checkpoint.pt: cannot write: no space left on device"
    assert lines[1] == f"WriteError {mnt}/run/log.txt: cannot write: no space left on device"
    assert lines[2] == f"cli error: {mnt}/run/model.onnx: cannot write: no space left on device"
    assert lines[3] == "left []"


@needs_tmpfs
def test_read_only_file_system_is_one_line_naming_the_file(tmp_path, model_file):
    mnt = tmp_path / "ro"
    run = _on_tmpfs(mnt, "ro", WRITERS.replace("{mnt}", str(mnt)).replace("{model}", str(model_file)))
    assert run.returncode == 0, run.stderr
    reason = f"cannot write: read-only file system ({mnt}/run)"  # its folder cannot be created
    assert run.stdout.splitlines() == [f"WriteError {mnt}/run/checkpoint.pt: {reason}",
                                       f"WriteError {mnt}/run/log.txt: {reason}",
                                       f"cli error: {mnt}/run/model.onnx: {reason}", "left no folder"]


def test_a_model_file_missing_fields_is_one_line_naming_them(tmp_path):
    path = tmp_path / "model.fna.pt"
    save_atomic({"format": "fna-model", "format_version": 1, "task": "seg", "state_dict": {}}, path)
    with pytest.raises(FnaError, match=r"model.fna.pt: damaged fna model file \(missing arch, class_names, "):
        load_model(path)

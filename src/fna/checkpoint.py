"""Atomic, safely loadable files and RNG state capture, shared by search, fine-tuning and model files.

Everything :func:`save_atomic` writes must be tensors and plain data (dicts, lists, tuples, strings, numbers,
``None``): :func:`load` reads files with ``torch.load(weights_only=True)``, so a crafted file cannot run
code, and a file holding anything else is refused with :class:`UnsafeFileError`.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import secrets
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from fna.errors import FnaError


class WriteError(FnaError):
    """An output file could not be written (full disk, read-only file system, no permission...)."""


class UnsafeFileError(FnaError):
    """A file holds pickled Python objects other than tensors and plain data; it was not loaded."""


_TMP_SUFFIX = ".tmp"


def os_reason(e: OSError) -> str:
    """``OSError(ENOSPC)`` → ``"no space left on device"``: the cause in words, lower case."""
    text = os.strerror(e.errno) if e.errno else (str(e) or type(e).__name__)
    return text[:1].lower() + text[1:]


def os_error_in(e: BaseException) -> OSError | None:
    """The OSError that is or caused ``e``, else ``None`` (torch reports a failed write as a RuntimeError
    whose context is the OSError)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def write_error(path: Path, e: BaseException) -> WriteError:
    """The one-line error for a failed write of ``path`` caused by ``e``."""
    os_error = os_error_in(e)
    if os_error is None:
        return WriteError(f"{path}: cannot write ({(str(e).splitlines() or [type(e).__name__])[0]})")
    where = os.fsdecode(os_error.filename) if os_error.filename is not None else None
    other = where is not None and Path(where).name != path.name and not _is_tmp_of(path, where)
    return WriteError(f"{path}: cannot write: {os_reason(os_error)}" + (f" ({where})" if other else ""))


def _is_tmp_of(path: Path, name: str) -> bool:
    return _tmp_pattern(path).fullmatch(Path(name).name) is not None


def _tmp_pattern(path: Path) -> re.Pattern[str]:
    # ``.{name}.{8 chars}.tmp`` (this module and tempfile.mkstemp before it) or ``.{name}.tmp`` (older text writes)
    return re.compile(rf"\.{re.escape(path.name)}(\.[a-z0-9_]{{8}})?{re.escape(_TMP_SUFFIX)}")


def make_parent(path: str | Path) -> Path:
    """Create the folder ``path`` goes in (and its parents); a failure is a :class:`WriteError` naming it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:  # a file where a folder should be
        raise WriteError(f"{path}: cannot create its folder: {os.fsdecode(e.filename)} is a file") from None
    except OSError as e:
        raise write_error(path, e) from None
    return path


def clear_stale_tmp(path: str | Path) -> list[Path]:
    """Remove temporary siblings of ``path`` left by killed writes (``.{name}.*.tmp``); returns them.

    Only one process writes a given file, so any such sibling is a leftover.
    """
    path = Path(path)
    pattern, removed = _tmp_pattern(path), []
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return removed
    for name in names:
        if pattern.fullmatch(name):
            (path.parent / name).unlink(missing_ok=True)
            removed.append(path.parent / name)
    return removed


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], None],
                 check: Callable[[Path], None] | None = None) -> None:
    """Write through ``write`` into a temporary sibling of ``path``, ``check`` it, then rename it over ``path``.

    The file gets the usual umask-based mode. Stale temporaries of ``path`` are removed first; a failed
    write leaves none and raises :class:`WriteError` naming ``path`` and the cause.
    """
    path = make_parent(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{_TMP_SUFFIX}")
    try:
        clear_stale_tmp(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as e:
        raise write_error(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) or (isinstance(e, RuntimeError) and os_error_in(e) is not None):
            raise write_error(path, e) from None
        raise


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` ``obj`` (tensors and plain data) to ``path`` atomically: a crash never leaves half a file.

    A full disk, read-only file system or missing permission is a one-line :class:`WriteError`. An ``obj``
    that :func:`load` would refuse (it holds e.g. a numpy array) is a ``TypeError`` and nothing is written.
    """
    def loadable(tmp: Path) -> None:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(tmp)
        if unsafe:
            raise TypeError(f"cannot save {path}: it would hold {', '.join(sorted(unsafe))}, which fna will not "
                            "load back; store tensors and plain data (dict, list, tuple, str, int, float, None)")

    write_atomic(path, lambda f: torch.save(obj, f), loadable)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to a temporary file beside ``path``, then rename it over ``path``."""
    data = text.encode()
    write_atomic(path, lambda f: f.write(data))


# how torch's weights-only unpickler names a global it refused
_GLOBAL = re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module)")


def load(path: str | Path, what: str = "file") -> Any:
    """``torch.load`` that never runs code from the file: only tensors and plain data are read.

    A missing or damaged file is an :class:`FnaError` naming ``path``; one that would import or call
    anything else (a crafted pickle) is refused with :class:`UnsafeFileError` before anything runs.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the error below says enough
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FnaError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise FnaError(f"{path}: is a folder, not a {what}") from None
    except pickle.UnpicklingError as e:
        found = _GLOBAL.search(str(e))
        if found is None:
            raise FnaError(f"{path}: not a readable {what}: not tensors and plain data as fna writes them "
                           "(corrupt, or another kind of pickle)") from None
        raise UnsafeFileError(f"{path}: refused: it would import {found.group(1)}, and fna loads only tensors and "
                              f"plain data (no code runs); it is not a {what} written by this fna") from None
    except OSError as e:
        raise FnaError(f"{path}: cannot read {what}: {os_reason(e)}") from None
    except Exception as e:
        raise FnaError(f"{path}: not a readable {what}, truncated or corrupt ({type(e).__name__}: "
                       f"{(str(e).splitlines() or [''])[0]})") from None


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by :func:`save_atomic` (tensors and plain data only; no code runs)."""
    state = load(path, "checkpoint")
    if not isinstance(state, dict):
        raise FnaError(f"{path}: not a checkpoint (holds a {type(state).__name__}, not a dict)")
    return state


def rng_state() -> dict:
    """Every RNG the training loops draw from, as tensors and plain data (safe to save and load)."""
    key, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"key": str(key), "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["key"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

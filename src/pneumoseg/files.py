"""Writes that a kill, a signal or a full disk cannot tear.

- :func:`atomic_file`: one file, written under a temporary name in the same folder, flushed to
  the disk (fsync) and renamed over the old one; on an error the old file stays as it was.
- :func:`staged_dir`: a whole output folder, built beside the old one and swapped in at the end
  (two renames); a kill leaves the previous output complete, never half of each.
- :func:`new_memmap`: a new ``.npy`` memory map whose disk space is claimed when it is made, so
  a full disk is an error there instead of a SIGBUS on a later write into the map.

A full disk (``ENOSPC``/``EDQUOT``) becomes :class:`DiskFullError`, one line naming the output
and the way on (free some space and rerun; the previous output is untouched).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """No space left while writing an output; the previous output is untouched."""

    def __str__(self) -> str:
        return str(self.strerror)


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it: torch wraps the OS error) is a full disk."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in FULL:
            return True
        if "No space left on device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


@contextlib.contextmanager
def full_disk_is_one_line(output: Path | str) -> Iterator[None]:
    """Turn a full disk while writing ``output`` into :class:`DiskFullError`."""
    try:
        yield
    except DiskFullError:
        raise
    except (OSError, RuntimeError) as exc:
        if not disk_full(exc):
            raise
        raise DiskFullError(
            errno.ENOSPC,
            f"{output}: no space left on the device; free some and rerun (the previous "
            "output is untouched)",
        ) from None


def _fsync(fh: IO[Any]) -> None:
    fh.flush()
    os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_file(
    path: Path | str, mode: str = "w", previous: Path | None = None, **kw: Any
) -> Iterator[IO[Any]]:
    """``with atomic_file(p) as fh: fh.write(...)``: ``p`` appears whole or not at all; with
    ``previous``, the file it replaces is kept under that name (two generations)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with full_disk_is_one_line(path), open(tmp, mode, **kw) as fh:
            yield fh
            _fsync(fh)
        if previous is not None and path.is_file():
            path.replace(previous)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path | str, text: str) -> None:
    """Write ``text`` to ``path`` through :func:`atomic_file`."""
    with atomic_file(path) as fh:
        fh.write(text)


def write_json(path: Path | str, data: Any, sort_keys: bool = True) -> None:
    """``data`` as indented JSON (the metrics files DVC diffs), atomically; keys sorted unless
    their order is the point (``dvc exp show`` lists a file's keys in its order)."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")


def read_json(path: Path | str, hint: str) -> Any:
    """The JSON in ``path``; a missing or broken file is one line naming it and ``hint`` (the
    way out, e.g. "run `pneumoseg evaluate` first")."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing ({hint})")
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise ValueError(f"{path}: not valid JSON ({hint})") from None


def replace_dir(new: Path, old: Path) -> None:
    """Put folder ``new`` in place of ``old`` (two renames; ``old`` is deleted after)."""
    trash = old.with_name(f".{old.name}.old")
    shutil.rmtree(trash, ignore_errors=True)
    if old.exists():
        old.rename(trash)
    new.rename(old)
    shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(out_dir: Path | str, what: str = "building") -> Iterator[Path]:
    """``with staged_dir(out) as work: <write into work>``: ``work`` (``.<out>.<what>``, a
    fresh folder beside ``out``) replaces ``out`` when the block ends without an error; after an
    error or a kill ``out`` is as it was and the next run starts ``work`` afresh."""
    out = Path(out_dir)
    work = out.with_name(f".{out.name}.{what}")
    shutil.rmtree(work, ignore_errors=True)
    try:
        with full_disk_is_one_line(out):
            work.mkdir(parents=True)
            yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    replace_dir(work, out)


def new_memmap(path: Path, shape: tuple[int, ...], dtype: str = "uint8") -> np.memmap:
    """A new ``.npy`` file of ``shape`` opened as a writable memory map, its whole size claimed
    on the disk at once (``posix_fallocate``): writes into a map on a full disk kill the process
    with SIGBUS, while a claim that does not fit raises ``OSError(ENOSPC)`` here."""
    import numpy as np

    array = np.lib.format.open_memmap(path, "w+", dtype=np.dtype(dtype), shape=shape)
    with Path(path).open("r+b") as fh:
        os.posix_fallocate(fh.fileno(), 0, os.fstat(fh.fileno()).st_size)
    return array

"""Advisory file locks: the one implementation behind the sqlite store lock, the registry lock
and the study workers' registration (released by the OS when the process dies)."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

_held_locks: dict[str, int] = {}  # lock file -> depth held by this process (re-entrant)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` for the block: released by the OS if the process
    dies, re-entrant within a process."""
    lock = str(path)
    if _held_locks.get(lock):
        _held_locks[lock] += 1
        try:
            yield
        finally:
            _held_locks[lock] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        _held_locks[lock] = 1
        try:
            yield
        finally:
            _held_locks[lock] = 0
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Exclusive access to a local sqlite store (``sqlite:///...``) for the block: a
    :func:`file_lock` beside the database; other stores need none."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    with file_lock(Path(f"{uri.removeprefix('sqlite:///')}.lock")):
        yield

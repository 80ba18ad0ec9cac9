"""How many torch threads a training process takes (README "Cores"): the cores in its CPU
affinity shared equally by the training processes that run on the host, so that two study
workers, two queued DVC experiments or two torchrun ranks never oversubscribe the cores (two
processes with every core each on 2 cores made a 0.3 s step 15 s).

Every training process registers a file ``<pid>`` in :data:`REGISTRY` while it trains and
counts the live ones at the start of every epoch; its intra-op threads are
``max(1, cores // max(live trainers, local torchrun ranks))``. ``PNEUMOSEG_THREADS`` or
``OMP_NUM_THREADS`` pin the count instead. The thread count changes the order of float sums, so
bit-identical reruns need the same count: pin it when processes come and go.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger("pneumoseg.threads")
ENV = "PNEUMOSEG_THREADS"
REGISTRY_ENV = "PNEUMOSEG_TRAINERS_DIR"  # where the live trainers register (tests isolate it)
REGISTRY = Path(tempfile.gettempdir()) / f"pneumoseg-{os.getuid()}" / "trainers"


def registry_dir() -> Path:
    """The folder the host's training processes register in (``$PNEUMOSEG_TRAINERS_DIR``, else
    :data:`REGISTRY`)."""
    return Path(os.environ.get(REGISTRY_ENV) or REGISTRY)


_TORCH_DEFAULT: list[int] = []  # torch's own count before the first change (physical cores)


def affinity_cores() -> int:
    """The cores this process may run on: its CPU affinity (e.g. under ``taskset``), at most
    torch's own default (which leaves hyper-threads out)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    if not _TORCH_DEFAULT:
        import torch

        _TORCH_DEFAULT.append(torch.get_num_threads())
    return max(1, min(cores, _TORCH_DEFAULT[0]))


def pinned_threads() -> int | None:
    """The count the user pinned (``PNEUMOSEG_THREADS``, else ``OMP_NUM_THREADS``), or None."""
    for name in (ENV, "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value:
            try:
                return max(1, int(value))
            except ValueError:
                raise ValueError(f"{name}={value!r}: must be a whole number of threads") from None
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process with the same pid: alive
        return True
    return True


def live_trainers(registry: Path | None = None) -> int:
    """Training processes registered on this host and still running (stale files removed)."""
    registry = registry or registry_dir()
    live = 0
    for path in registry.glob("*"):
        if path.name.isdigit() and _alive(int(path.name)):
            live += 1
        else:
            path.unlink(missing_ok=True)
    return live


def fair_share(registry: Path | None = None) -> int:
    """Threads for one training process: the affinity cores over the live trainers (at least
    the local torchrun ranks, which may not have registered yet)."""
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, affinity_cores() // max(live_trainers(registry), ranks, 1))


class ThreadShare:
    """This process's place among the host's training processes: :meth:`register` once,
    :meth:`apply` at the start of every epoch (it logs a change), :meth:`release` at the end."""

    def __init__(self, registry: Path | None = None) -> None:
        self.registry = registry or registry_dir()
        self.path = self.registry / str(os.getpid())
        self.threads: int | None = None

    def register(self) -> None:
        self.registry.mkdir(parents=True, exist_ok=True)
        self.path.touch()

    def release(self) -> None:
        self.path.unlink(missing_ok=True)

    def apply(self) -> int:
        """Set torch's intra-op threads by the rule (or the pinned count); returns it."""
        import torch

        cores = affinity_cores()  # (reads torch's default before the first change)
        pinned = pinned_threads()
        threads = pinned or fair_share(self.registry)
        if threads != self.threads:
            torch.set_num_threads(threads)
            how = "pinned" if pinned else f"{cores} cores shared by the trainers"
            log.info("torch threads: %d (%s)", threads, how)
            self.threads = threads
        return threads

"""A fold training's resume state: ``<work_dir>/fold<k>/last.pt`` holds the run record
(:class:`RunState`), every torch state dict and the RNG state, written atomically after every
epoch, beside the top-k checkpoint files it lists. Rerunning the same command after a kill
continues from it, bit for bit on CPU."""

from __future__ import annotations

import logging
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pneumoseg.artifacts import write_resume_key
from pneumoseg.files import atomic_file
from pneumoseg.training.distributed import Dist

log = logging.getLogger(__name__)
STATE_VERSION = 1  # the format of last.pt (round-1 states load unchanged)
CHECKPOINT_GLOB = "part*-epoch*.pt"


@dataclass
class RunState:
    """What resume needs besides the torch state dicts."""

    run_key: str
    part: int = 0
    epoch_in_part: int = -1  # last finished epoch of ``part``
    history: list[dict[str, Any]] = field(default_factory=list)
    topk: list[dict[str, Any]] = field(default_factory=list)  # {part, epoch, score, path}
    snapshots: list[dict[str, Any]] = field(default_factory=list)  # {part, epoch, cycle, path}
    mlflow_run_id: str | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


class ResumeError(RuntimeError):
    """A resume state or checkpoint that cannot be used; one line naming the file and the way
    out."""


class ResumeStore:
    """``last.pt`` (and the generation before it, ``previous.pt``) and the checkpoint files of
    one fold's work folder (rank 0 writes)."""

    def __init__(self, work: Path, run_key: str, dist: Dist) -> None:
        self.work = work
        self.run_key = run_key
        self.dist = dist
        self._kept: set[str] = set()  # checkpoint files the previous generation lists

    @property
    def path(self) -> Path:
        return self.work / "last.pt"

    @property
    def previous(self) -> Path:
        return self.work / "previous.pt"

    def _read(self, path: Path) -> dict[str, Any] | None:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            log.warning(
                "train: %s is unreadable (%s); trying the generation before",
                path,
                type(exc).__name__,
            )
            return None

    def load(self) -> tuple[RunState, dict[str, Any]] | None:
        """The saved state and torch state (with ``rng``), or None to start afresh (no state,
        or one of other params or data, which is then deleted). A torn ``last.pt`` falls back
        to ``previous.pt`` (one epoch earlier)."""
        blob = None
        for path in (self.path, self.previous):
            if path.is_file():
                blob = self._read(path)
                if blob is not None:
                    break
        else:
            if not any(p.is_file() for p in (self.path, self.previous)):
                return None
        if blob is None:
            raise ResumeError(
                f"{self.path} and {self.previous.name} are unreadable; delete {self.work} to "
                "train this fold afresh"
            )
        run = RunState(**blob["run"])
        if blob.get("version") != STATE_VERSION or run.run_key != self.run_key:
            log.warning("train: %s belongs to other params/data; starting afresh", self.path)
            self.dist.barrier()  # every rank has read the stale state before it goes
            if self.dist.main:
                shutil.rmtree(self.work, ignore_errors=True)
            self.dist.barrier()
            return None
        self._kept = {c["path"] for c in run.topk}
        return run, blob["torch"] | {"rng": blob["rng"]}

    def save(self, state: RunState, torch_state: dict[str, Any]) -> None:
        """Write ``last.pt`` atomically (temporary name, fsync, rename; the old one becomes
        ``previous.pt``), then drop the checkpoint files neither generation lists."""
        if not self.dist.main:
            return
        self.work.mkdir(parents=True, exist_ok=True)
        blob = {
            "version": STATE_VERSION,
            "run": state.__dict__,
            "torch": torch_state,
            "rng": rng_state(),
        }
        with atomic_file(self.path, "wb", previous=self.previous) as fh:
            torch.save(blob, fh)
        write_resume_key(self.work, state.run_key, state.mlflow_run_id)
        self.remove_unlisted(state)
        self._kept = {c["path"] for c in state.topk}

    def remove_unlisted(self, state: RunState) -> None:
        """Delete checkpoint files that neither the saved state nor the generation before it
        lists (evicted ones, or one written for an epoch whose state was never saved)."""
        if not self.dist.main:
            return
        listed = {c["path"] for c in state.topk} | self._kept
        for path in self.work.glob(CHECKPOINT_GLOB):
            if path.name not in listed:
                path.unlink(missing_ok=True)

    def clear(self) -> None:
        """Delete the work folder (the training finished)."""
        if self.dist.main:
            shutil.rmtree(self.work, ignore_errors=True)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A top-k checkpoint file; a torn one is a one-line error naming it and the way out (a
    different checkpoint would silently change the result)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ResumeError(
            f"{path} is unreadable ({type(exc).__name__}); delete {path.parent} to train this "
            "fold afresh"
        ) from None

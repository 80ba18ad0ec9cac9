"""A fold training's resume state: ``<work_dir>/fold<k>/last.pt`` holds the run record
(:class:`RunState`), every torch state dict and the RNG state, written atomically after every
epoch, beside the top-k checkpoint files it lists. Rerunning the same command after a kill
continues from it, bit for bit on CPU."""

from __future__ import annotations

import logging
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

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


class ResumeStore:
    """``last.pt`` and the checkpoint files of one fold's work folder (rank 0 writes)."""

    def __init__(self, work: Path, run_key: str, dist: Dist) -> None:
        self.work = work
        self.run_key = run_key
        self.dist = dist

    @property
    def path(self) -> Path:
        return self.work / "last.pt"

    def load(self) -> tuple[RunState, dict[str, Any]] | None:
        """The saved state and torch state (with ``rng``), or None to start afresh (no state,
        or one of other params or data, which is then deleted)."""
        if not self.path.is_file():
            return None
        blob = torch.load(self.path, map_location="cpu", weights_only=False)
        run = RunState(**blob["run"])
        if blob.get("version") != STATE_VERSION or run.run_key != self.run_key:
            log.warning("train: %s belongs to other params/data; starting afresh", self.path)
            self.dist.barrier()  # every rank has read the stale state before it goes
            if self.dist.main:
                shutil.rmtree(self.work, ignore_errors=True)
            self.dist.barrier()
            return None
        return run, blob["torch"] | {"rng": blob["rng"]}

    def save(self, state: RunState, torch_state: dict[str, Any]) -> None:
        """Write ``last.pt`` atomically (temporary name, fsync, rename), then drop the
        checkpoint files it no longer lists."""
        if not self.dist.main:
            return
        self.work.mkdir(parents=True, exist_ok=True)
        blob = {
            "version": STATE_VERSION,
            "run": state.__dict__,
            "torch": torch_state,
            "rng": rng_state(),
        }
        tmp = self.work / "last.pt.tmp"
        with tmp.open("wb") as fh:
            torch.save(blob, fh)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(self.path)
        self.remove_unlisted(state)

    def remove_unlisted(self, state: RunState) -> None:
        """Delete checkpoint files the saved state does not list (evicted ones, or one written
        for an epoch whose state was never saved because of a kill)."""
        if not self.dist.main:
            return
        listed = {c["path"] for c in state.topk}
        for path in self.work.glob(CHECKPOINT_GLOB):
            if path.name not in listed:
                path.unlink(missing_ok=True)

    def clear(self) -> None:
        """Delete the work folder (the training finished)."""
        if self.dist.main:
            shutil.rmtree(self.work, ignore_errors=True)

"""What happens at the end of every epoch, one small object per concern (the shape of
Lightning's and ignite's handlers, without the dependency). :func:`default_callbacks` gives the
order that makes resume exact: a diverged epoch stops everything, then the learning rate
steps, the top-k ranking, the history file,
then the resume state is saved, and only then is the epoch logged to MLflow (a kill before the
log is made good at resume; one after it is not logged twice)."""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pneumoseg.models import save_model_file
from pneumoseg.training.distributed import unwrap
from pneumoseg.training.parts import cycle_ends

if TYPE_CHECKING:
    from pneumoseg.training.parts import Part
    from pneumoseg.training.trainer import FoldTrainer

log = logging.getLogger("pneumoseg.training")


class Callback:
    """Called after every epoch with the epoch's history row (``e``: epoch within the part)."""

    def on_epoch_end(self, t: FoldTrainer, part: Part, e: int, row: dict[str, Any]) -> None:
        raise NotImplementedError


class TrainingDiverged(ValueError):
    """The training loss or the monitored metric is not a finite number: one line, the run
    ends FAILED and nothing of the epoch is kept (a rerun repeats it: change the params)."""


class Finite(Callback):
    """Stop when the epoch's training loss or monitored metric is NaN or infinite: a NaN
    score would drop out of the checkpoint ranking unseen and leave a part without one."""

    def on_epoch_end(self, t: FoldTrainer, part: Part, e: int, row: dict[str, Any]) -> None:
        for key in dict.fromkeys(("train_loss", t.monitor)):
            if not math.isfinite(float(row[key])):
                raise TrainingDiverged(
                    f"train fold {t.fold} epoch {row['epoch']}: {key} is {row[key]} (the "
                    f"training diverged at lr {row['lr']:.3g}); lower train.parts[{part.index}]"
                    ".lr or set train.grad_clip, then rerun"
                )


class LrSchedule(Callback):
    """Step the part's schedule: SWALR inside the SWA window, the plateau scheduler on the
    monitored metric, any other per epoch."""

    def on_epoch_end(self, t: FoldTrainer, part: Part, e: int, row: dict[str, Any]) -> None:
        if part.swa_sched is not None and part.in_swa(e):
            part.swa_sched.step()
        elif isinstance(part.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            part.scheduler.step(row[t.monitor])
        else:
            part.scheduler.step()


class TopK(Callback):
    """Keep the ``checkpoint.top_k`` best epochs of each part by the monitored metric (files
    ``part<p>-epoch<e>.pt`` in the work folder). An evicted file is deleted only once the state
    that forgets it is saved (:meth:`pneumoseg.training.state.ResumeStore.save`)."""

    def on_epoch_end(self, t: FoldTrainer, part: Part, e: int, row: dict[str, Any]) -> None:
        score = float(row[t.monitor])  # finite: Finite ran first
        ranked = t.best_of_part(part.index)
        k = t.cfg.checkpoint.top_k
        if len(ranked) >= k and not t.better(score, ranked[-1]["score"]):
            return
        epoch = row["epoch"]
        path = t.work / f"part{part.index}-epoch{epoch:03d}.pt"
        if t.dist.main:
            meta = t.meta(part.cfg.size) | {"part": part.index, "epoch": epoch, "score": score}
            save_model_file(path, unwrap(t.model).state_dict(), meta)
        t.state.topk.append({"part": part.index, "epoch": epoch, "score": score, "path": path.name})
        for evicted in t.best_of_part(part.index)[k:]:
            t.state.topk.remove(evicted)


class Snapshots(Callback):
    """``train.snapshots``: the weights at the end of every complete restart cycle of a
    ``cosine_restarts`` part (``snapshot-part<p>-cycle<c>.pt``; a snapshot ensemble)."""

    def on_epoch_end(self, t: FoldTrainer, part: Part, e: int, row: dict[str, Any]) -> None:
        ends = cycle_ends(part.cfg) if t.cfg.snapshots else []
        if e not in ends:
            return
        cycle, epoch = ends.index(e), row["epoch"]
        path = t.work / f"snapshot-part{part.index}-cycle{cycle}.pt"
        if t.dist.main:
            meta = t.meta(part.cfg.size) | {"part": part.index, "epoch": epoch, "cycle": cycle}
            save_model_file(path, unwrap(t.model).state_dict(), meta)
        entry = {"part": part.index, "epoch": epoch, "cycle": cycle, "path": path.name}
        t.state.snapshots = [s for s in t.state.snapshots if s["path"] != path.name] + [entry]


class History(Callback):
    """Record the epoch in the run state and in ``plots/fold<k>/history.csv``."""

    def on_epoch_end(self, t: FoldTrainer, part: Part, e: int, row: dict[str, Any]) -> None:
        t.state.history.append(row)
        t.state.part, t.state.epoch_in_part = part.index, e
        if t.dist.main:
            write_history(t.state.history, t.plots / "history.csv")


class Reconnect(Callback):
    """After an MLflow outage, try the store again (before the save, so that a run created
    late has its id in the resume state); :class:`TrackEpochs` then backfills the epochs."""

    def on_epoch_end(self, t: FoldTrainer, part: Part, e: int, row: dict[str, Any]) -> None:
        if t.tracker.reconnect() and not t.state.mlflow_run_id:
            t.state.mlflow_run_id = t.tracker.run_id


class SaveState(Callback):
    """Write ``last.pt`` (see :mod:`pneumoseg.training.state`)."""

    def on_epoch_end(self, t: FoldTrainer, part: Part, e: int, row: dict[str, Any]) -> None:
        torch_state = part.torch_state(t.model, t.scaler)
        torch_state["ema"] = t.ema.state_dict() if t.ema is not None else None
        t.store.save(t.state, torch_state)


class TrackEpochs(Callback):
    """Log every epoch the MLflow run does not hold yet (after the save: exactly once)."""

    def on_epoch_end(self, t: FoldTrainer, part: Part, e: int, row: dict[str, Any]) -> None:
        t.tracker.log_rows(t.state.history)


class EpochLog(Callback):
    """One log line per epoch (rank 0 at INFO, the others at DEBUG)."""

    def on_epoch_end(self, t: FoldTrainer, part: Part, e: int, row: dict[str, Any]) -> None:
        scores = (
            f"loss {row['train_loss']:.4f}/{row['val_loss']:.4f} kaggle_dice "
            f"{row['val_kaggle_dice']:.4f} dice_pos {row['val_dice_pos']:.4f} "
            f"empty_acc {row['val_empty_acc']:.3f}"
            if "val_loss" in row
            else f"loss {row['train_loss']:.4f}"
        )
        if "observed_heldout_loss" in row:  # observed only (train.observe_heldout_every)
            scores += (
                f" [held-out, observed only: loss {row['observed_heldout_loss']:.4f} "
                f"kaggle_dice {row['observed_heldout_kaggle_dice']:.4f}]"
            )
        log.log(
            logging.INFO if t.dist.main else logging.DEBUG,
            "fold %d epoch %d/%d [part %d, %dpx] %s rate %.2f lr %.2e (%.1fs)",
            t.fold,
            row["epoch"],
            sum(p.epochs for p in t.cfg.parts),
            part.index,
            part.cfg.size,
            scores,
            row["sample_rate"],
            row["lr"],
            row["epoch_seconds"],
        )


class EpochHook(Callback):
    """A caller's function on every row, once all ranks are done with the epoch (a study's
    report-and-prune); an exception it raises ends the MLflow run as KILLED."""

    def __init__(self, fn: Callable[[dict[str, Any]], None]) -> None:
        self.fn = fn

    def on_epoch_end(self, t: FoldTrainer, part: Part, e: int, row: dict[str, Any]) -> None:
        t.dist.barrier()
        try:
            self.fn(row)
        except BaseException:
            t.tracker.end("KILLED")
            raise


class Barrier(Callback):
    """Every rank finishes the epoch before any starts the next."""

    def on_epoch_end(self, t: FoldTrainer, part: Part, e: int, row: dict[str, Any]) -> None:
        t.dist.barrier()


def default_callbacks(on_epoch: Callable[[dict[str, Any]], None] | None) -> list[Callback]:
    """The end-of-epoch order (see the module docstring); ``on_epoch`` runs last."""
    last: Callback = EpochHook(on_epoch) if on_epoch is not None else Barrier()
    return [
        Finite(),
        LrSchedule(),
        TopK(),
        Snapshots(),
        History(),
        Reconnect(),
        SaveState(),
        TrackEpochs(),
        EpochLog(),
        last,
    ]


def write_history(history: list[dict[str, Any]], path: Path) -> None:
    """The per-epoch rows as csv (columns in order of first appearance)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)

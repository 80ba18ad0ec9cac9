"""Stage ``train@<fold>``: train one model per fold, fully tracked and resumable.

Parts run in order (uptraining: each part starts from the previous part's best weights), with
global epoch numbers. Everything needed to resume (model, optimizer, scheduler, SWA, top-k,
history, RNG, MLflow run id) lives in ``<work_dir>/fold<k>/last.pt``, outside DVC's outputs;
rerunning the same command after a kill continues the same run and the same MLflow run.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils.deterministic
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from pneumoseg.artifacts import read_folds
from pneumoseg.augment import build_train_transform
from pneumoseg.data import SegDataset
from pneumoseg.folds import FoldImages
from pneumoseg.losses import ComboLoss
from pneumoseg.metrics import SegMetrics
from pneumoseg.models import average_state_dicts, build_model, forward, save_model_file
from pneumoseg.params import (
    Params,
    PartParams,
    TrainParams,
    flatten,
    stage_digest,
    stage_values,
)
from pneumoseg.plots import plot_history, save_overlay_grid
from pneumoseg.sampling import SampleRateSampler, sample_rate_at
from pneumoseg.tracking import Tracker, data_hash, pip_freeze

log = logging.getLogger(__name__)
STATE_VERSION = 1


@dataclass
class Dist:
    """torchrun/DDP context (world_size 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


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


def _rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def make_optimizer(cfg: TrainParams, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = cfg.optimizer
    if opt.name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=opt.weight_decay)
    if opt.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=opt.weight_decay)
    return torch.optim.SGD(
        params, lr=lr, momentum=opt.momentum, weight_decay=opt.weight_decay, nesterov=True
    )


def make_scheduler(optimizer: torch.optim.Optimizer, part: PartParams, mode: str) -> Any:
    """Per-epoch scheduler of a part (warm-up via LinearLR in front, except for plateau)."""
    sched = part.scheduler
    lr_sched = torch.optim.lr_scheduler
    if sched.name == "plateau":
        return lr_sched.ReduceLROnPlateau(
            optimizer, mode=mode, factor=sched.factor, patience=sched.patience, min_lr=sched.min_lr
        )
    warm = min(sched.warmup_epochs, part.epochs - 1)
    if sched.name == "cosine":
        main: Any = lr_sched.CosineAnnealingLR(
            optimizer, T_max=max(part.epochs - warm, 1), eta_min=sched.min_lr
        )
    elif sched.name == "cosine_restarts":
        main = lr_sched.CosineAnnealingWarmRestarts(
            optimizer, T_0=sched.restart_epochs, T_mult=sched.restart_mult, eta_min=sched.min_lr
        )
    else:
        main = lr_sched.LambdaLR(optimizer, lambda _: 1.0)
    if warm == 0:
        return main
    warmup = lr_sched.LinearLR(optimizer, start_factor=0.1, total_iters=warm)
    return lr_sched.SequentialLR(optimizer, [warmup, main], milestones=[warm])


def val_row(losses: dict[str, float], m: dict[str, float], prefix: str = "val_") -> dict[str, Any]:
    """The validation columns of a history row (or of a final-metrics record)."""
    return {
        f"{prefix}loss": losses["loss"],
        **{f"{prefix}{k}": v for k, v in losses.items() if k != "loss"},
        f"{prefix}kaggle_dice": m["kaggle_dice"],
        f"{prefix}kaggle_dice_area": m["kaggle_dice_area"],
        f"{prefix}dice_pos": m["dice_pos"],
        f"{prefix}iou_pos": m["iou_pos"],
        f"{prefix}empty_acc": m["empty_acc"],
        f"{prefix}pos_acc": m["pos_acc"],
    }


def _dist_from_env() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as tdist

    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(tdist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))


def _barrier(dist: Dist) -> None:
    if dist.world_size > 1:
        import torch.distributed as tdist

        tdist.barrier()


def _sum_across_ranks(dist: Dist, sums: dict[str, float], n: int) -> tuple[dict[str, float], int]:
    """Add up per-rank loss sums and item counts, so every rank reports the whole epoch."""
    if dist.world_size <= 1:
        return sums, n
    import torch.distributed as tdist

    keys = sorted(sums)
    t = torch.tensor([sums[k] for k in keys] + [float(n)], dtype=torch.float64)
    tdist.all_reduce(t)
    return dict(zip(keys, t[:-1].tolist(), strict=True)), int(t[-1].item())


def _broadcast_buffers(dist: Dist, model: nn.Module) -> None:
    """Give every rank rank 0's BatchNorm statistics (DDP syncs them only before a training
    forward), so validation, checkpoint ranking and the final weights agree across ranks."""
    if dist.world_size <= 1:
        return
    import torch.distributed as tdist

    for buf in model.buffers():
        tdist.broadcast(buf, 0)


class FoldTrainer:
    """Trains one fold; see the module docstring."""

    def __init__(
        self,
        params: Params,
        fold: int,
        progress: bool = True,
        parent_run_id: str | None = None,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
        log_model: bool = True,
    ) -> None:
        """``parent_run_id`` nests the fold's MLflow run (study trials); ``on_epoch`` sees each
        epoch's history row (an exception it raises, e.g. a pruned trial, ends the run as
        KILLED); ``log_model=False`` keeps the model files out of MLflow."""
        self.params = params
        self.parent_run_id = parent_run_id
        self.on_epoch = on_epoch
        self.log_model = log_model
        self.cfg = params.train
        self.fold = fold
        self.progress = progress
        self.dist = _dist_from_env()
        if torch.cuda.is_available():
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
            torch.use_deterministic_algorithms(True, warn_only=True)
            # Deterministic mode also fills every new tensor with NaN (a guard against reading
            # uninitialised memory): ~10% of a CPU training step (bench/train_overhead.py
            # --no-nan-fill) and not needed for run-to-run identical weights.
            torch.utils.deterministic.fill_uninitialized_memory = False
        self.amp = self.cfg.amp and self.device.type == "cuda"
        self.memory_format = (
            torch.channels_last if self.cfg.channels_last else torch.contiguous_format
        )
        folds = read_folds(params.split.out)
        sel = self.cfg.selection
        self.images = FoldImages.of(folds, fold, sel.mode, sel.inner_fraction, self.cfg.seed)
        self.train_ids, self.val_ids = self.images.train, self.images.select
        self.positive = np.array([folds[i][1] == 1 for i in self.train_ids])
        self.work = Path(self.cfg.work_dir) / f"fold{fold}"
        self.out = Path(self.cfg.models_dir) / f"fold{fold}"
        self.plots = Path(self.cfg.plots_dir) / f"fold{fold}"
        self.data_hash = data_hash(params.data.processed_dir, params.split.out)
        self.params_hash = stage_digest(params, "train")
        self.run_key = f"{self.params_hash}|{self.data_hash}|fold{fold}"
        self.tracker = Tracker(params.mlflow, enabled=self.dist.main)
        # without a selection split the top-k are simply the last k epochs of each part
        self.monitor = self.cfg.checkpoint.monitor if self.val_ids else "epoch"
        self.mode = self.cfg.checkpoint.mode if self.val_ids else "max"

    # ----------------------------------------------------------------------------- data
    def _loaders(
        self, size: int, sampler: SampleRateSampler
    ) -> tuple[DataLoader, DataLoader | None]:
        """The training loader and the selection split's (None without one)."""
        cfg, root = self.cfg, self.params.data.processed_dir
        train_ds = SegDataset(
            self.train_ids,
            root,
            size,
            cfg.model.in_channels,
            transform=build_train_transform(cfg.augment, size),
            cache=cfg.workers == 0,
        )
        train = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, **self._common())
        return train, self._eval_loader(self.val_ids, size) if self.val_ids else None

    def _common(self) -> dict[str, Any]:
        pin = self.device.type == "cuda"
        return {"num_workers": self.cfg.workers, "pin_memory": pin, "persistent_workers": False}

    def _eval_loader(self, ids: list[str], size: int) -> DataLoader:
        ds = SegDataset(
            ids, self.params.data.processed_dir, size, self.cfg.model.in_channels, cache=True
        )
        return DataLoader(ds, batch_size=self.cfg.batch_size, shuffle=False, **self._common())

    def _plain_train_loader(self, size: int) -> DataLoader:
        ds = SegDataset(
            self.train_ids, self.params.data.processed_dir, size, self.cfg.model.in_channels
        )
        return DataLoader(ds, batch_size=self.cfg.batch_size, shuffle=False)

    # ------------------------------------------------------------------------ one epoch
    def _to(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, non_blocking=True, memory_format=self.memory_format)

    def train_epoch(
        self,
        model: nn.Module,
        loader: DataLoader,
        loss_fn: ComboLoss,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        desc: str,
    ) -> dict[str, float]:
        model.train()
        sums: dict[str, float] = {}
        n = 0
        steps = self.cfg.accumulate_steps
        optimizer.zero_grad(set_to_none=True)
        batches = tqdm(loader, desc=desc, leave=False, disable=not self.progress)
        for i, (x, y, _) in enumerate(batches):
            x, y = self._to(x), y.to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                logits, cls = forward(model, x)
                loss, parts = loss_fn(logits.float(), y, None if cls is None else cls.float())
            scaler.scale(loss / steps).backward()
            if (i + 1) % steps == 0 or i + 1 == len(loader):
                if self.cfg.grad_clip:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), self.cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
            b = x.shape[0]
            n += b
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) * b
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v) * b
        sums, n = _sum_across_ranks(self.dist, sums, n)
        return {k: v / max(n, 1) for k, v in sums.items()} | {"items": n}

    @torch.no_grad()
    def validate(
        self, model: nn.Module, loader: DataLoader, loss_fn: ComboLoss
    ) -> tuple[dict[str, float], SegMetrics]:
        model.eval()
        metrics = SegMetrics(self.cfg.val_threshold)
        sums: dict[str, float] = {}
        n = 0
        for x, y, _ in loader:
            x, y = self._to(x), y.to(self.device)
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                logits, cls = forward(model, x)
            logits = logits.float()
            loss, parts = loss_fn(logits, y, None if cls is None else cls.float())
            metrics.update(torch.sigmoid(logits), y)
            b = x.shape[0]
            n += b
            sums["loss"] = sums.get("loss", 0.0) + float(loss) * b
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v) * b
        return {k: v / max(n, 1) for k, v in sums.items()}, metrics

    # -------------------------------------------------------------------- checkpoints
    def _better(self, a: float, b: float) -> bool:
        return a > b if self.mode == "max" else a < b

    def _meta(self, size: int) -> dict[str, Any]:
        m = self.cfg.model
        return {
            "arch": m.arch,
            "encoder": m.encoder,
            "in_channels": m.in_channels,
            "decoder_channels": m.decoder_channels,
            "classification_head": m.classification_head,
            "size": size,
            "fold": self.fold,
            "params_hash": self.params_hash,
            "data_hash": self.data_hash,
            "val_threshold": self.cfg.val_threshold,
            "selection": {
                "mode": self.cfg.selection.mode,
                "inner_fraction": self.cfg.selection.inner_fraction,
                "seed": self.cfg.seed,
                "n_select": len(self.val_ids),
            },
        }

    def _update_topk(
        self, state: RunState, part: int, epoch: int, score: float, model: nn.Module, size: int
    ) -> None:
        """Keep the top-k checkpoints of the current part (unique part/epoch file names). An
        evicted file is deleted only after the state that forgets it is saved
        (:meth:`_remove_unlisted_checkpoints`), so a kill never leaves a listed file missing."""
        k = self.cfg.checkpoint.top_k
        ranked = self._best_of_part(state, part)
        if math.isnan(score) or (len(ranked) >= k and not self._better(score, ranked[-1]["score"])):
            return
        path = self.work / f"part{part}-epoch{epoch:03d}.pt"
        if self.dist.main:
            meta = self._meta(size) | {"part": part, "epoch": epoch, "score": score}
            save_model_file(path, _unwrap(model).state_dict(), meta)
        state.topk.append({"part": part, "epoch": epoch, "score": score, "path": path.name})
        for evicted in self._best_of_part(state, part)[k:]:
            state.topk.remove(evicted)

    def _remove_unlisted_checkpoints(self, state: RunState) -> None:
        """Delete checkpoint files the saved state does not list (evicted ones, or one written
        for an epoch whose state was never saved because of a kill)."""
        if not self.dist.main:
            return
        listed = {c["path"] for c in state.topk}
        for path in self.work.glob("part*-epoch*.pt"):
            if path.name not in listed:
                path.unlink(missing_ok=True)

    def _best_of_part(self, state: RunState, part: int) -> list[dict[str, Any]]:
        mine = [c for c in state.topk if c["part"] == part]
        return sorted(mine, key=lambda c: (c["score"], -c["epoch"]), reverse=self.mode == "max")

    def _save_state(self, state: RunState, torch_state: dict[str, Any]) -> None:
        """Write ``last.pt`` atomically (temporary name, fsync, rename), then drop the
        checkpoint files it no longer lists."""
        if not self.dist.main:
            return
        blob = {
            "version": STATE_VERSION,
            "run": state.__dict__,
            "torch": torch_state,
            "rng": _rng_state(),
        }
        tmp = self.work / "last.pt.tmp"
        with tmp.open("wb") as fh:
            torch.save(blob, fh)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(self.work / "last.pt")
        self._remove_unlisted_checkpoints(state)

    def _load_state(self) -> tuple[RunState, dict[str, Any]] | None:
        path = self.work / "last.pt"
        if not path.is_file():
            return None
        blob = torch.load(path, map_location="cpu", weights_only=False)
        run = RunState(**blob["run"])
        if blob.get("version") != STATE_VERSION or run.run_key != self.run_key:
            log.warning("train: %s belongs to other params/data; starting afresh", path)
            _barrier(self.dist)  # every rank has read the stale state before it goes
            if self.dist.main:
                shutil.rmtree(self.work, ignore_errors=True)
            _barrier(self.dist)
            return None
        return run, blob["torch"] | {"rng": blob["rng"]}

    # --------------------------------------------------------------------------- run
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        seed_everything(cfg.seed + self.fold)
        resumed = self._load_state()
        self.work.mkdir(parents=True, exist_ok=True)
        state, tstate = resumed if resumed else (RunState(self.run_key), {})
        model = build_model(cfg.model).to(self.device, memory_format=self.memory_format)
        if resumed:
            model.load_state_dict(tstate["model"])
        tags = {
            "stage": "train",
            "fold": str(self.fold),
            "params_hash": self.params_hash,
            "data_hash": self.data_hash,
        }
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        run_id = self.tracker.start(f"train-fold{self.fold}", tags, state.mlflow_run_id)
        if run_id and not state.mlflow_run_id:
            state.mlflow_run_id = run_id
            self.tracker.log_params(flatten(stage_values(self.params, "train")))
        if not resumed:  # the run id is on disk before any work: a kill never orphans the run
            self._save_state(state, {"model": model.state_dict()})
        self._remove_unlisted_checkpoints(state)
        self.tracker.log_rows(state.history)  # epochs saved but not logged at a kill
        if resumed:
            log.info(
                "train fold %d: resuming after part %d epoch %d (MLflow run %s)",
                self.fold,
                state.part,
                state.epoch_in_part + 1,
                state.mlflow_run_id,
            )
        if resumed:
            _set_rng_state(tstate["rng"])  # after building the model, as in an uninterrupted run
        ddp_model = self._wrap(model)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)
        swa_model = None
        first_epoch = 1
        for p_idx, part in enumerate(cfg.parts):
            if p_idx < state.part:
                first_epoch += part.epochs
                continue
            sampler = SampleRateSampler(
                self.positive, cfg.seed + 1000 * self.fold, self.dist.rank, self.dist.world_size
            )
            train_loader, val_loader = self._loaders(part.size, sampler)
            loss_fn = ComboLoss(part.loss)
            optimizer = make_optimizer(cfg, model, part.lr)
            scheduler = make_scheduler(optimizer, part, self.mode)
            swa_start = part.epochs - cfg.swa.epochs if p_idx == len(cfg.parts) - 1 else None
            swa_sched = None
            if swa_start is not None and cfg.swa.epochs:
                swa_model = torch.optim.swa_utils.AveragedModel(model)
                if cfg.swa.lr:
                    swa_sched = torch.optim.swa_utils.SWALR(
                        optimizer, swa_lr=cfg.swa.lr, anneal_epochs=1
                    )
            start = 0
            if resumed and p_idx == state.part and "optimizer" in tstate:
                optimizer.load_state_dict(tstate["optimizer"])
                scheduler.load_state_dict(tstate["scheduler"])
                scaler.load_state_dict(tstate["scaler"])
                if swa_model is not None and tstate.get("swa") is not None:
                    swa_model.load_state_dict(tstate["swa"])
                if swa_sched is not None and tstate.get("swa_sched") is not None:
                    swa_sched.load_state_dict(tstate["swa_sched"])
                start = state.epoch_in_part + 1
            elif p_idx > 0:
                best = self._best_of_part(state, p_idx - 1)
                if best:
                    blob = torch.load(
                        self.work / best[0]["path"], map_location="cpu", weights_only=True
                    )
                    model.load_state_dict(blob["state_dict"])
                    log.info(
                        "train fold %d: part %d starts from %s", self.fold, p_idx, best[0]["path"]
                    )
            for e in range(start, part.epochs):
                epoch = first_epoch + e
                rate = sample_rate_at(part.sample_rate, e, part.epochs)
                sampler.set_epoch(epoch, rate)
                t0 = time.perf_counter()
                lr = optimizer.param_groups[0]["lr"]
                tr = self.train_epoch(
                    ddp_model,
                    train_loader,
                    loss_fn,
                    optimizer,
                    scaler,
                    f"fold{self.fold} epoch {epoch}",
                )
                _broadcast_buffers(self.dist, model)
                in_swa = swa_model is not None and swa_start is not None and e >= swa_start
                if in_swa:
                    swa_model.update_parameters(model)
                items = int(tr.pop("items"))
                row: dict[str, Any] = {
                    "epoch": epoch,
                    "part": p_idx,
                    "size": part.size,
                    "lr": lr,
                    "sample_rate": sampler.achieved_rate,
                    "train_items": items,
                    "train_loss": tr.pop("loss"),
                    **{f"train_{k}": v for k, v in tr.items()},
                }
                if val_loader is not None:  # the selection split: decisions only
                    va, metrics = self.validate(model, val_loader, loss_fn)
                    row.update(val_row(va, metrics.compute()))
                row["epoch_seconds"] = time.perf_counter() - t0
                monitor = self.monitor
                if monitor not in row:
                    raise ValueError(
                        f"params.yaml: train.checkpoint.monitor: {monitor!r} is not a metric "
                        f"(one of {', '.join(k for k in row if k.startswith(('val_', 'train_')))})"
                    )
                if swa_sched is not None and in_swa:
                    swa_sched.step()
                elif isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    scheduler.step(row[monitor])
                else:
                    scheduler.step()
                state.history.append(row)
                self._update_topk(state, p_idx, epoch, float(row[monitor]), model, part.size)
                state.part, state.epoch_in_part = p_idx, e
                if self.dist.main:
                    self._write_history(state.history)
                self._save_state(
                    state,
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "swa": swa_model.state_dict() if swa_model is not None else None,
                        "swa_sched": swa_sched.state_dict() if swa_sched is not None else None,
                    },
                )
                # after the save: a kill before this line logs the epoch at resume, after it
                # the resumed run sees the step in MLflow and does not log it twice
                self.tracker.log_rows(state.history)
                scores = (
                    f"loss {row['train_loss']:.4f}/{row['val_loss']:.4f} kaggle_dice "
                    f"{row['val_kaggle_dice']:.4f} dice_pos {row['val_dice_pos']:.4f} "
                    f"empty_acc {row['val_empty_acc']:.3f}"
                    if "val_loss" in row
                    else f"loss {row['train_loss']:.4f}"
                )
                log.log(
                    logging.INFO if self.dist.main else logging.DEBUG,
                    "fold %d epoch %d/%d [part %d, %dpx] %s rate %.2f lr %.2e (%.1fs)",
                    self.fold,
                    epoch,
                    sum(p.epochs for p in cfg.parts),
                    p_idx,
                    part.size,
                    scores,
                    row["sample_rate"],
                    lr,
                    row["epoch_seconds"],
                )
                _barrier(self.dist)
                if self.on_epoch is not None:
                    try:
                        self.on_epoch(row)
                    except BaseException:
                        self.tracker.end("KILLED")
                        raise
            state.part, state.epoch_in_part = p_idx + 1, -1
            first_epoch += part.epochs
            resumed = None
        return self._finish(state, model, swa_model)

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.dist.world_size <= 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def _write_history(self, history: list[dict[str, Any]]) -> None:
        self.plots.mkdir(parents=True, exist_ok=True)
        keys: list[str] = []
        for row in history:
            keys += [k for k in row if k not in keys]
        with (self.plots / "history.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys)
            writer.writeheader()
            writer.writerows(history)

    # -------------------------------------------------------------------------- finish
    def _finish(
        self, state: RunState, model: nn.Module, swa_model: nn.Module | None
    ) -> dict[str, Any]:
        cfg = self.cfg
        last = len(cfg.parts) - 1
        size = cfg.parts[-1].size
        best = self._best_of_part(state, last)
        final_kind = cfg.checkpoint.final
        _barrier(self.dist)  # rank 0 deletes the work folder at the end
        if final_kind == "swa" and swa_model is not None:
            torch.optim.swa_utils.update_bn(self._plain_train_loader(size), swa_model, self.device)
            weights = swa_model.module.state_dict()
        elif final_kind == "last":
            weights = {k: v.detach().clone() for k, v in _unwrap(model).state_dict().items()}
        else:
            blobs = [
                torch.load(self.work / c["path"], map_location="cpu", weights_only=True)
                for c in best
            ]
            if final_kind == "average_top_k":
                weights = average_state_dicts([b["state_dict"] for b in blobs])
            else:
                weights = blobs[0]["state_dict"]
        model.load_state_dict(weights)
        loss_fn = ComboLoss(cfg.parts[-1].loss)
        final = None
        if self.val_ids:  # the selection split's view of the final weights (studies use it)
            va, m = self.validate(model, self._eval_loader(self.val_ids, size), loss_fn)
            final = val_row(va, m.compute())
        # the held-out fold, once every decision is made: what OOF will score
        hv, held = self.validate(model, self._eval_loader(self.images.held_out, size), loss_fn)
        held_scores = held.compute()
        heldout = val_row(hv, held_scores, "heldout_") | {
            "heldout_empty_baseline": held_scores["empty_baseline"]
        }
        best_row = next((r for r in state.history if r["epoch"] == best[0]["epoch"]), None)
        result = {
            "fold": self.fold,
            "mlflow_run_id": state.mlflow_run_id,
            "selection": {
                "mode": cfg.selection.mode,
                "inner_fraction": cfg.selection.inner_fraction,
                "n_train": len(self.train_ids),
                "n_select": len(self.val_ids),
                "n_held_out": len(self.images.held_out),
            },
            "final_weights": final_kind,
            "best_epoch": best[0]["epoch"],
            "monitor": self.monitor,
            "best": {k: v for k, v in (best_row or {}).items() if k.startswith("val_")},
            "final": final,
            "heldout": heldout,
            "epochs": len(state.history),
            "params_hash": self.params_hash,
            "data_hash": self.data_hash,
        }
        if not self.dist.main:
            return result
        if self.out.exists():
            shutil.rmtree(self.out)
        (self.out / "checkpoints").mkdir(parents=True)
        meta = self._meta(size) | {"mlflow_run_id": state.mlflow_run_id, "final": final_kind}
        save_model_file(self.out / "model.pt", weights, meta)
        for c in state.topk:
            shutil.copy2(self.work / c["path"], self.out / "checkpoints" / c["path"])
        ckpts = [c | {"monitor": self.monitor} for c in state.topk]
        (self.out / "checkpoints.json").write_text(json.dumps(ckpts, indent=2) + "\n")
        metrics_path = Path(cfg.metrics_dir) / f"fold{self.fold}.json"
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        self._write_history(state.history)
        curves = plot_history(state.history, self.plots / "learning_curves.png", self.fold)
        overlays = self._overlays(model, held, size)
        tr = self.tracker
        finals = {f"final_{k.removeprefix('val_')}": v for k, v in (final or {}).items()}
        tr.log_metrics(finals | heldout, step=len(state.history))
        tr.set_tags({"best_epoch": str(result["best_epoch"]), "final_weights": final_kind})
        for path in (curves, overlays, self.plots / "history.csv", metrics_path):
            tr.log_artifact(path, "plots" if path.suffix != ".json" else None)
        if self.log_model:
            tr.log_artifact(self.out / "model.pt", "model")
            tr.log_artifact(self.out / "checkpoints.json", "model")
        tr.log_dict(stage_values(self.params, "train"), "params.yaml")
        tr.log_text(pip_freeze() + "\n", "environment/requirements.txt")
        tr.end("FINISHED")
        shutil.rmtree(self.work, ignore_errors=True)
        log.info(
            "train fold %d done: final weights (%s) on the held-out fold: kaggle_dice %.4f "
            "(empty baseline %.4f), dice_pos %.4f -> %s; MLflow run %s",
            self.fold,
            final_kind,
            heldout["heldout_kaggle_dice"],
            heldout["heldout_empty_baseline"],
            heldout["heldout_dice_pos"],
            self.out / "model.pt",
            state.mlflow_run_id,
        )
        return result

    @torch.no_grad()
    def _overlays(self, model: nn.Module, metrics: SegMetrics, size: int) -> Path:
        """Best and worst held-out cases of the final model as one PNG grid."""
        dice = metrics.per_image()
        order = np.argsort(dice, kind="stable")
        pick = list(dict.fromkeys([*order[:4].tolist(), *order[::-1][:4].tolist()]))
        ds = SegDataset(
            self.images.held_out, self.params.data.processed_dir, size, self.cfg.model.in_channels
        )
        model.eval()
        cases = []
        for i in pick:
            x, y, _ = ds[i]
            logits, _ = forward(model, self._to(x[None]))
            prob = torch.sigmoid(logits.float())[0, 0].cpu().numpy()
            image, _ = ds.load(i)
            cases.append((image, y[0].numpy(), prob >= self.cfg.val_threshold, float(dice[i])))
        return save_overlay_grid(cases, self.plots / "val_overlays.png")


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def run(params: Params, fold: int | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """CLI/DVC entry: train ``fold`` (or every fold in ``train.folds``)."""
    folds = [fold] if fold is not None else params.train.folds
    try:
        return [FoldTrainer(params, f, progress).run() for f in folds]
    finally:
        import torch.distributed as tdist

        if tdist.is_available() and tdist.is_initialized():
            tdist.destroy_process_group()

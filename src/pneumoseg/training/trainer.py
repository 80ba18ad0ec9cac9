"""Training one fold: :class:`FoldTrainer`.

Parts run in order (uptraining: each part starts from the previous part's best weights, or the
last ones without a selection split), with global epoch numbers. After every epoch the
callbacks of :mod:`pneumoseg.training.callbacks` run; everything needed to resume lives in
``<work_dir>/fold<k>/last.pt`` (:mod:`pneumoseg.training.state`), outside DVC's outputs, so
rerunning the same command after a kill continues the same run and the same MLflow run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils.deterministic
from torch import nn
from torch.utils.data import DataLoader

from pneumoseg.artifacts import read_folds, resume_key
from pneumoseg.augment import build_train_transform
from pneumoseg.data import SegDataset
from pneumoseg.folds import FoldImages
from pneumoseg.layers import enable_grad_checkpointing, freeze_batch_norm_stats
from pneumoseg.lineage import data_hash, dataset_inputs
from pneumoseg.losses import ComboLoss
from pneumoseg.metrics import SegMetrics
from pneumoseg.models import build_model, forward
from pneumoseg.params import MAIN, Params, flatten, stage_digest, stage_values
from pneumoseg.progress import progress_bar
from pneumoseg.sampling import SampleRateSampler, sample_rate_at
from pneumoseg.threads import ThreadShare
from pneumoseg.tracking import Tracker
from pneumoseg.training.callbacks import Callback, TrainingDiverged, default_callbacks
from pneumoseg.training.distributed import Dist
from pneumoseg.training.parts import Part, make_ema, make_optimizer, make_scheduler
from pneumoseg.training.record import finish, model_meta, val_row
from pneumoseg.training.state import (
    ResumeStore,
    RunState,
    load_checkpoint,
    seed_everything,
    set_rng_state,
)

log = logging.getLogger("pneumoseg.training")
OBSERVED = "observed_heldout_"  # the prefix of the held-out curves no decision reads


class FoldTrainer:
    """Trains one fold; see the module docstring. Subclasses (the fine-tuning) change the stage
    name, the initial weights, the training images' ``sources`` and ``record_extra``."""

    stage_name = "train"  # the DVC stage: MLflow tag and run name, declared params

    def __init__(
        self,
        params: Params,
        fold: int,
        progress: bool = True,
        parent_run_id: str | None = None,
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
        log_model: bool = True,
        member: str = MAIN,
        experiment: str | None = None,
    ) -> None:
        """``parent_run_id`` nests the fold's MLflow run (study trials) in ``experiment`` (None:
        the stages experiment); ``on_epoch`` sees each epoch's history row (an exception it
        raises, e.g. a pruned trial, ends the run as KILLED); ``log_model=False`` keeps the
        model files out of MLflow; ``member``: the ensemble member trained (``params`` then
        carry its train section)."""
        self.params, self.cfg, self.fold, self.progress = params, params.train, fold, progress
        self.member = member
        self.parent_run_id = parent_run_id
        self.log_model = log_model
        self.dist = Dist.from_env()
        if torch.cuda.is_available():
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
            torch.use_deterministic_algorithms(True, warn_only=True)
            # Deterministic mode also fills every new tensor with NaN (a guard against reading
            # uninitialised memory): ~10% of a CPU training step (bench/train_overhead.py
            # --nan-fill) and not needed for run-to-run identical weights.
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
        self.params_hash = stage_digest(params, self.stage_name)
        self.store = ResumeStore(self.work, self.run_key(), self.dist)
        self.tracker = Tracker(
            params.mlflow, enabled=self.dist.main, experiment=experiment, retry_later=True
        )
        # without a selection split the top-k are simply the last k epochs of each part
        self.monitor = self.cfg.checkpoint.monitor if self.val_ids else "epoch"
        self.mode = self.cfg.checkpoint.mode if self.val_ids else "max"
        self.callbacks: list[Callback] = default_callbacks(on_epoch)
        self.state = RunState(self.store.run_key)
        self.model: nn.Module = nn.Identity()  # the network, once run() built it
        self.ema: torch.optim.swa_utils.AveragedModel | None = None  # train.ema
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)
        self.threads = ThreadShare()
        self.sources: list[Any] = [params.arrays.out_dir]  # where training images are read
        self.record_extra: dict[str, Any] = {}  # more for the fold's record and model meta

    # --------------------------------------------------------------------------- the loop
    def run(self) -> dict[str, Any]:
        """Train every part that remains, then write the fold's record (see ``record``)."""
        self.threads.register()  # the host's cores are shared by its trainers (threads.py)
        try:
            resumed = self.begin()
            part = None
            for part in self.parts(resumed):
                for e in range(part.start, part.cfg.epochs):
                    row = self.epoch(part, e)
                    for callback in self.callbacks:
                        callback.on_epoch_end(self, part, e, row)
            return finish(self, part.swa_model if part is not None else None)
        except TrainingDiverged:
            self.tracker.end("FAILED")  # a rerun with the same params diverges again
            raise
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: KILLED until a rerun resumes it
            self.tracker.end("KILLED")
            raise
        finally:
            self.threads.release()

    def begin(self) -> dict[str, Any] | None:
        """Seed, build the model, reopen the resume state and the MLflow run (a new run's id
        is saved before any work: a kill never orphans it). Returns the torch state to resume
        from, or None."""
        self.threads.apply()
        seed_everything(self.cfg.seed + self.fold)
        resumed = self.store.load()
        if resumed:
            self.state, tstate = resumed
        model = build_model(self.cfg.model).to(self.device, memory_format=self.memory_format)
        start = tstate["model"] if resumed else self.initial_state()
        if start is not None:
            model.load_state_dict(start)
        if self.cfg.grad_checkpointing:
            enable_grad_checkpointing(model)
        self.model, self.ema = model, make_ema(model, self.cfg.ema.decay)
        if resumed and self.ema is not None and tstate.get("ema") is not None:
            self.ema.load_state_dict(tstate["ema"])
        tags = {"stage": self.stage_name, "fold": str(self.fold), "params_hash": self.params_hash}
        tags["data_hash"] = self.data_hash
        tags["ensemble_member"] = self.member
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        reopened = bool(self.state.mlflow_run_id)
        member = "" if self.member == MAIN else f"{self.member}-"
        run_id = self.tracker.start(
            f"{self.stage_name}-{member}fold{self.fold}", tags, self.state.mlflow_run_id
        )
        if not reopened:  # a new run (its params wait if the store is down)
            self.state.mlflow_run_id = run_id
            self.tracker.log_params(flatten(stage_values(self.params, self.stage_name)))
            self.tracker.log_datasets(
                dataset_inputs(self.params.data.processed_dir, self.params.split.out)
            )
        self.tracker.monitor_system(resume=reopened)
        if not resumed:
            self.store.save(self.state, {"model": model.state_dict()})
        self.store.remove_unlisted(self.state)
        self.tracker.log_rows(self.state.history)  # epochs saved but not logged at a kill
        if not resumed:
            return None
        log.info(
            "train fold %d: resuming after part %d epoch %d (MLflow run %s)",
            self.fold,
            self.state.part,
            self.state.epoch_in_part + 1,
            self.state.mlflow_run_id,
        )
        set_rng_state(tstate["rng"])  # after building the model, as in an uninterrupted run
        return tstate

    def run_key(self) -> str:
        """What a saved resume state must have been made with to be resumed."""
        return resume_key(self.params_hash, self.data_hash, self.fold)

    def initial_state(self) -> dict[str, torch.Tensor] | None:
        """The weights a new run starts from (None: the seeded initialisation)."""
        return None

    def parts(self, resumed: dict[str, Any] | None) -> Iterator[Part]:
        """The parts left to train, each ready to run (a resumed part with its optimizer,
        schedules and SWA restored; a new part from the previous part's chosen weights)."""
        cfg, state = self.cfg, self.state
        unused = cfg.model.classification_head and any(p.loss.cls == 0 for p in cfg.parts)
        self.ddp_model = self.dist.wrap(self.model, self.device, cfg.model.sync_bn, unused)
        first_epoch = 1
        for index, part_cfg in enumerate(cfg.parts):
            if index < state.part:
                first_epoch += part_cfg.epochs
                continue
            part = self.make_part(index, part_cfg, first_epoch)
            if resumed is not None and index == state.part and "optimizer" in resumed:
                part.load(resumed, self.scaler)
                part.start = state.epoch_in_part + 1
            elif index > 0:
                self.hand_over(index)
            yield part
            state.part, state.epoch_in_part = index + 1, -1
            first_epoch += part_cfg.epochs
            resumed = None

    def make_part(self, index: int, part_cfg: Any, first_epoch: int) -> Part:
        cfg = self.cfg
        sampler = SampleRateSampler(
            self.positive, cfg.seed + 1000 * self.fold, self.dist.rank, self.dist.world_size
        )
        train_loader, val_loader = self.loaders(part_cfg.size, sampler)
        optimizer = make_optimizer(cfg, self.model, part_cfg)
        part = Part(
            index=index,
            cfg=part_cfg,
            first_epoch=first_epoch,
            start=0,
            sampler=sampler,
            train_loader=train_loader,
            val_loader=val_loader,
            loss_fn=ComboLoss(part_cfg.loss),
            optimizer=optimizer,
            scheduler=make_scheduler(optimizer, part_cfg, self.mode),
        )
        if index == len(cfg.parts) - 1 and cfg.swa.epochs:
            part.swa_start = part_cfg.epochs - cfg.swa.epochs
            part.swa_model = torch.optim.swa_utils.AveragedModel(self.model)
            if cfg.swa.lr:
                part.swa_sched = torch.optim.swa_utils.SWALR(
                    optimizer, swa_lr=cfg.swa.lr, anneal_epochs=1
                )
        return part

    def hand_over(self, index: int) -> None:
        """Start part ``index`` from the best (or, without selection, the last) checkpoint of
        the part before."""
        for candidate in self.best_of_part(index - 1):  # a torn file: the next best
            blob = load_checkpoint(self.work / candidate["path"])
            if blob is not None:
                self.model.load_state_dict(blob["state_dict"])
                log.info(
                    "train fold %d: part %d starts from %s", self.fold, index, candidate["path"]
                )
                return

    def epoch(self, part: Part, e: int) -> dict[str, Any]:
        """Train and (on the selection split) validate one epoch; its history row."""
        epoch = part.first_epoch + e
        self.threads.apply()  # another trainer may have started or ended
        part.sampler.set_epoch(epoch, sample_rate_at(part.cfg.sample_rate, e, part.cfg.epochs))
        t0 = time.perf_counter()
        lr = part.optimizer.param_groups[0]["lr"]
        tr = self.train_epoch(part, f"fold{self.fold} epoch {epoch}")
        self.dist.broadcast_buffers(self.model)
        if part.in_swa(e):
            part.swa_model.update_parameters(self.model)
        row: dict[str, Any] = {
            "epoch": epoch,
            "part": part.index,
            "size": part.cfg.size,
            "lr": lr,
            "sample_rate": part.sampler.achieved_rate,
            "train_items": int(tr.pop("items")),
            "train_loss": tr.pop("loss"),
            **{f"train_{k}": v for k, v in tr.items()},
        }
        if part.val_loader is not None:  # the selection split: decisions only
            va, metrics = self.validate(self.model, part.val_loader, part.loss_fn)
            row.update(val_row(va, metrics.compute()))
        row["epoch_seconds"] = time.perf_counter() - t0
        if self.observes(epoch):
            row.update(self.observe_heldout(part))
        if self.monitor not in row:
            names = ", ".join(k for k in row if k.startswith(("val_", "train_")))
            raise ValueError(
                f"params.yaml: train.checkpoint.monitor: {self.monitor!r} is not a metric "
                f"(one of {names})"
            )
        return row

    @property
    def observes_at_all(self) -> bool:
        """Whether ``train.observe_heldout_every`` looks at the held-out fold (with
        ``selection.mode: held_out`` the val_* columns already score it)."""
        held_out = self.cfg.selection.mode != "held_out" and bool(self.images.held_out)
        return held_out and self.cfg.observe_heldout_every > 0

    def observes(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` ends with a look at the held-out fold: every
        ``train.observe_heldout_every`` epochs and after the last."""
        if not self.observes_at_all:
            return False
        last = sum(p.epochs for p in self.cfg.parts)
        return epoch % self.cfg.observe_heldout_every == 0 or epoch == last

    def observe_heldout(self, part: Part) -> dict[str, float]:
        """The held-out fold's loss, Kaggle dice and dice on positives under the current
        weights: observed only. No callback reads them, and the random number streams are
        restored afterwards (a loader draws its seed from them), so the weights are exactly
        those of a run that does not observe."""
        t0 = time.perf_counter()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            loader = self.eval_loader(self.images.held_out, part.cfg.size)
            losses, metrics = self.validate(self.model, loader, part.loss_fn)
        scores = metrics.compute()
        return {
            f"{OBSERVED}loss": losses["loss"],
            f"{OBSERVED}kaggle_dice": scores["kaggle_dice"],
            f"{OBSERVED}dice_pos": scores["dice_pos"],
            "observe_seconds": time.perf_counter() - t0,
        }

    # ------------------------------------------------------------------------ the steps
    def loaders(
        self, size: int, sampler: SampleRateSampler
    ) -> tuple[DataLoader, DataLoader | None]:
        """The training loader and the selection split's (None without one)."""
        cfg = self.cfg
        train_ds = SegDataset(
            self.train_ids,
            self.sources,
            size,
            cfg.model.in_channels,
            transform=build_train_transform(cfg.augment, size),
        )
        train = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, **self._common())
        return train, self.eval_loader(self.val_ids, size) if self.val_ids else None

    def _common(self) -> dict[str, Any]:
        pin, workers = self.device.type == "cuda", self.cfg.workers
        return {"num_workers": workers, "pin_memory": pin, "persistent_workers": workers > 0}

    def eval_loader(self, ids: list[str], size: int, shard: bool = True) -> DataLoader:
        """Images scored without augmentation; ``shard``: this rank's share only (the ranks
        split validation and :meth:`validate` gathers the scores)."""
        ids = self.dist.shard(ids) if shard else ids
        ds = SegDataset(ids, self.sources, size, self.cfg.model.in_channels)
        return DataLoader(ds, batch_size=self.cfg.batch_size, shuffle=False, **self._common())

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, non_blocking=True, memory_format=self.memory_format)

    def train_epoch(self, part: Part, desc: str) -> dict[str, float]:
        model, optimizer, scaler = self.ddp_model, part.optimizer, self.scaler
        model.train()
        if self.bn_frozen(part.index):
            freeze_batch_norm_stats(model)
        sums: dict[str, float] = {}
        n = 0
        steps = self.cfg.accumulate_steps
        optimizer.zero_grad(set_to_none=True)
        loader = part.train_loader
        for i, (x, y, _) in enumerate(
            progress_bar(loader, desc=desc, unit="batch", bars_allowed=self.progress, inner=True)
        ):
            x, y = self.to_device(x), y.to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                logits, cls = forward(model, x)
                loss, parts = part.loss_fn(logits.float(), y, None if cls is None else cls.float())
            scaler.scale(loss / steps).backward()
            if (i + 1) % steps == 0 or i + 1 == len(loader):
                if self.cfg.grad_clip:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), self.cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if self.ema is not None:
                    self.ema.update_parameters(self.model)
            b = x.shape[0]
            n += b
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) * b
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v) * b
        sums, n = self.dist.sum(sums, n)
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
            x, y = self.to_device(x), y.to(self.device)
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
        sums, n = self.dist.sum(sums, n)  # every rank's share: the whole list, on every rank
        metrics = SegMetrics.of(self.dist.gather_rows(metrics.stats()), self.cfg.val_threshold)
        return {k: v / max(n, 1) for k, v in sums.items()}, metrics

    def bn_frozen(self, part: int) -> bool:
        """Whether part ``part`` trains with frozen BatchNorm statistics."""
        m = self.cfg.model
        return m.norm == "frozen_batch" and part >= m.freeze_bn_from_part

    # ------------------------------------------------------------------- checkpoints
    def better(self, a: float, b: float) -> bool:
        return a > b if self.mode == "max" else a < b

    def best_of_part(self, part: int) -> list[dict[str, Any]]:
        mine = [c for c in self.state.topk if c["part"] == part]
        return sorted(mine, key=lambda c: (c["score"], -c["epoch"]), reverse=self.mode == "max")

    def meta(self, size: int) -> dict[str, Any]:
        """What a model file needs to rebuild the network, and its lineage."""
        return model_meta(self, size)

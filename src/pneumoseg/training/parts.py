"""One training part in flight (:class:`Part`): its sampler and loaders, loss, optimizer,
learning-rate schedule and, in the last part, the SWA average; and the factories that build
them from ``train.parts[i]``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from pneumoseg.losses import ComboLoss
from pneumoseg.params import OptimizerParams, PartParams, TrainParams
from pneumoseg.sampling import SampleRateSampler


def part_optimizer(cfg: TrainParams, part: PartParams) -> OptimizerParams:
    """The optimizer settings of ``part``: its own keys, the unset ones from ``train.optimizer``
    (momentum is read only for SGD)."""
    own, base = part.optimizer, cfg.optimizer
    name = own.name or base.name
    return OptimizerParams(
        name=name,
        weight_decay=base.weight_decay if own.weight_decay is None else own.weight_decay,
        momentum=(base.momentum if own.momentum is None else own.momentum)
        if name == "sgd"
        else OptimizerParams().momentum,
    )


def make_optimizer(cfg: TrainParams, model: nn.Module, part: PartParams) -> torch.optim.Optimizer:
    """The optimizer of ``part`` over the trainable parameters, at the part's ``lr``."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt, lr = part_optimizer(cfg, part), part.lr
    if opt.name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=opt.weight_decay)
    if opt.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=opt.weight_decay)
    return torch.optim.SGD(
        params, lr=lr, momentum=opt.momentum, weight_decay=opt.weight_decay, nesterov=True
    )


def make_ema(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel | None:
    """``train.ema``: an exponential moving average of ``model``'s weights and BatchNorm
    buffers (None when ``decay`` is 0); call ``update_parameters(model)`` after each step."""
    if decay == 0:
        return None
    swa = torch.optim.swa_utils
    return swa.AveragedModel(model, multi_avg_fn=swa.get_ema_multi_avg_fn(decay), use_buffers=True)


def cycle_ends(part: PartParams) -> list[int]:
    """The epochs (within the part) that end a complete ``cosine_restarts`` cycle: after the
    warm-up, cycles of ``restart_epochs`` epochs, each ``restart_mult`` times the one before."""
    sched = part.scheduler
    if sched.name != "cosine_restarts":
        return []
    ends, start, length = [], min(sched.warmup_epochs, part.epochs - 1), sched.restart_epochs
    while start + length <= part.epochs:
        ends.append(start + length - 1)
        start, length = start + length, length * sched.restart_mult
    return ends


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


@dataclass
class Part:
    """A part being trained: epochs ``start`` .. ``cfg.epochs - 1`` remain (global epoch =
    ``first_epoch`` + epoch in part)."""

    index: int
    cfg: PartParams
    first_epoch: int
    start: int
    sampler: SampleRateSampler
    train_loader: DataLoader
    val_loader: DataLoader | None
    loss_fn: ComboLoss
    optimizer: torch.optim.Optimizer
    scheduler: Any
    swa_model: Any = None  # torch.optim.swa_utils.AveragedModel in the last part
    swa_sched: Any = None  # SWALR when train.swa.lr is set
    swa_start: int | None = None  # first epoch in part that SWA averages

    def in_swa(self, e: int) -> bool:
        return self.swa_model is not None and self.swa_start is not None and e >= self.swa_start

    def load(self, tstate: dict[str, Any], scaler: torch.amp.GradScaler) -> None:
        """Restore the optimizer, schedules, AMP scaler and SWA average of a resume state."""
        self.optimizer.load_state_dict(tstate["optimizer"])
        self.scheduler.load_state_dict(tstate["scheduler"])
        scaler.load_state_dict(tstate["scaler"])
        if self.swa_model is not None and tstate.get("swa") is not None:
            self.swa_model.load_state_dict(tstate["swa"])
        if self.swa_sched is not None and tstate.get("swa_sched") is not None:
            self.swa_sched.load_state_dict(tstate["swa_sched"])

    def torch_state(self, model: nn.Module, scaler: torch.amp.GradScaler) -> dict[str, Any]:
        """Every state dict a resume needs after an epoch of this part."""
        return {
            "model": model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "swa": self.swa_model.state_dict() if self.swa_model is not None else None,
            "swa_sched": self.swa_sched.state_dict() if self.swa_sched is not None else None,
        }

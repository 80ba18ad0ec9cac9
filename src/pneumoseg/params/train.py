"""The ``train`` section: the model, its parts (size, epochs, loss, schedule, sample rate,
optimizer), selection, checkpoints, weight averaging and the training tricks (README "Tricks")."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from pneumoseg.params.sections import Fraction, PositiveFloat, Strict

ARCHS = (
    "Unet",
    "UnetPlusPlus",
    "FPN",
    "PSPNet",
    "DeepLabV3",
    "DeepLabV3Plus",
    "Linknet",
    "MAnet",
    "PAN",
    "UPerNet",
    "Segformer",
)
ATTENTION_ARCHS = ("Unet", "UnetPlusPlus")  # smp decoders with decoder_attention_type


class ModelParams(Strict):
    """An smp model: ``encoder_weights`` is null, ``imagenet`` (needs the hub) or a local file."""

    arch: Literal[ARCHS] = "Unet"  # type: ignore[valid-type]
    encoder: str = "tu-mobilenetv3_small_100"
    encoder_weights: str | None = None
    # a local weights file must fill at least this fraction of the encoder's weights (by
    # element count; what is skipped is reported either way)
    encoder_weights_min_loaded: Fraction = 0.9
    in_channels: Literal[1, 3] = 1
    # None: smp's (256, 128, 64, 32, 16); the demo's light decoder is 4x cheaper at 256 px
    decoder_channels: list[Annotated[int, Field(ge=1)]] | None = [128, 64, 32, 16, 8]
    classification_head: bool = False
    decoder_attention: Literal["scse"] | None = None  # scSE blocks in a Unet/UnetPlusPlus decoder
    # batch; group: every BatchNorm becomes GroupNorm; frozen_batch: BatchNorm statistics stop
    # updating from part ``freeze_bn_from_part`` on (the affine weights keep training; past the
    # last part nothing freezes, e.g. in a study that trains only the first part)
    norm: Literal["batch", "group", "frozen_batch"] = "batch"
    freeze_bn_from_part: int = Field(1, ge=0)
    sync_bn: bool = False  # SyncBatchNorm across DDP ranks (CUDA)

    @model_validator(mode="after")
    def _supported(self) -> ModelParams:
        if self.decoder_attention and self.arch not in ATTENTION_ARCHS:
            raise ValueError(
                f"decoder_attention: {self.decoder_attention!r} needs arch "
                f"{' or '.join(ATTENTION_ARCHS)} (got {self.arch})"
            )
        if self.sync_bn and self.norm == "group":
            raise ValueError("sync_bn: norm group has no BatchNorm to synchronise")
        return self


class LossParams(Strict):
    """Combo loss weights (any subset > 0), e.g. bce 3, dice 1, focal 4."""

    bce: float = Field(1.0, ge=0)
    dice: float = Field(1.0, ge=0)
    focal: float = Field(0.0, ge=0)
    lovasz: float = Field(0.0, ge=0)
    jaccard: float = Field(0.0, ge=0)  # soft Jaccard (IoU) loss
    cls: float = Field(0.0, ge=0)  # classification-head BCE (needs model.classification_head)
    # reduced focal loss: easy pixels (p_t above it) are down-weighted; needs focal > 0
    focal_reduced_threshold: float | None = Field(None, gt=0, lt=1)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)  # bce targets 0/1 -> s/1-s; needs bce > 0

    @model_validator(mode="after")
    def _some_weight(self) -> LossParams:
        if self.bce + self.dice + self.focal + self.lovasz + self.jaccard <= 0:
            raise ValueError("bce: at least one of bce, dice, focal, lovasz, jaccard must be > 0")
        if self.focal_reduced_threshold is not None and self.focal == 0:
            raise ValueError("focal_reduced_threshold: applies to the focal term; needs focal > 0")
        if self.label_smoothing > 0 and self.bce == 0:
            raise ValueError("label_smoothing: applies to the bce term; needs bce > 0")
        return self


class SampleRateParams(Strict):
    """Fraction of positive images per epoch: ``start`` -> ``end`` over a part's epochs."""

    start: Annotated[float, Field(gt=0, le=1)] = 0.8
    end: Annotated[float, Field(gt=0, le=1)] | None = 0.3  # None: same as start
    shape: Literal["constant", "linear", "step"] = "linear"
    steps: int = Field(2, ge=1)  # number of plateaus for shape=step


class SchedulerParams(Strict):
    """Per-part learning-rate schedule (torch.optim.lr_scheduler)."""

    name: Literal["constant", "cosine", "cosine_restarts", "plateau"] = "cosine"
    min_lr: float = Field(1e-4, ge=0)
    restart_epochs: int = Field(2, ge=1)  # cosine_restarts: T_0
    restart_mult: int = Field(1, ge=1)  # cosine_restarts: T_mult
    patience: int = Field(2, ge=0)  # plateau
    factor: float = Field(0.5, gt=0, lt=1)  # plateau
    warmup_epochs: int = Field(1, ge=0)


class PartOptimizerParams(Strict):
    """A part's own optimizer settings; each key left null inherits ``train.optimizer``'s
    (e.g. Adam for the first part, SGD with momentum for a snapshot part)."""

    name: Literal["adam", "adamw", "sgd"] | None = None
    weight_decay: float | None = Field(None, ge=0)
    momentum: float | None = Field(None, ge=0, lt=1)


class PartParams(Strict):
    """One training part; each part starts from the previous part's best weights."""

    size: int = Field(128, ge=32, le=4096)
    epochs: int = Field(45, ge=1)
    lr: PositiveFloat = 3e-3
    scheduler: SchedulerParams = SchedulerParams()
    loss: LossParams = LossParams()
    sample_rate: SampleRateParams = SampleRateParams()
    optimizer: PartOptimizerParams = PartOptimizerParams()  # unset keys: train.optimizer's


def demo_parts() -> list[PartParams]:
    """The shipped schedule: 128 px, then uptraining at 256 px from those weights."""
    return [
        PartParams(),
        PartParams(
            size=256,
            epochs=10,
            lr=1e-3,
            scheduler=SchedulerParams(min_lr=1e-5, warmup_epochs=0),
            sample_rate=SampleRateParams(start=0.4, end=0.3),
        ),
    ]


class AugmentParams(Strict):
    """Probabilities of albumentations transforms applied to image and mask together."""

    hflip: Fraction = 0.5
    brightness_contrast: Fraction = 0.5
    gamma: Fraction = 0.3
    distortion: Fraction = 0.2  # one of elastic / grid / optical distortion
    affine: Fraction = 0.5
    rotate_limit: float = Field(10.0, ge=0, le=180)
    scale_limit: float = Field(0.1, ge=0, lt=1)
    crop: Fraction = 0.0  # random resized crop back to the part size
    crop_min_scale: float = Field(0.6, gt=0, le=1)


class SelectionParams(Strict):
    """Which images make a fold's training decisions (checkpoint ranking, the best weights a
    part hands over, the plateau scheduler, a study's objective and pruning).

    ``inner``: a stratified, seeded ``inner_fraction`` of the fold's training images, held out
    of its training; the held-out fold stays untouched until OOF. ``none``: no selection, the
    whole training set trains and the last epoch (or SWA) is the model. ``held_out``: the fold's
    own held-out images decide, which OOF then scores (optimistic; the round-1 behaviour)."""

    mode: Literal["inner", "none", "held_out"] = "none"
    inner_fraction: float = Field(0.15, gt=0, lt=0.5)


class CheckpointParams(Strict):
    """Top-k checkpoint selection and the final weights of a fold."""

    monitor: str = "val_loss"  # any column of plots/fold<k>/history.csv
    mode: Literal["max", "min"] = "min"
    top_k: int = Field(3, ge=1)
    final: Literal["best", "average_top_k", "swa", "last", "ema"] = "swa"


class SWAParams(Strict):
    """Stochastic weight averaging over the last ``epochs`` epochs of the last part."""

    epochs: int = Field(4, ge=0)  # 0: off
    lr: float | None = Field(None, gt=0)  # None: keep the part's schedule


class EMAParams(Strict):
    """An exponential moving average of the weights, updated after every optimizer step
    (``torch.optim.swa_utils.AveragedModel``; BatchNorm statistics averaged too). It becomes
    the fold's model with ``checkpoint.final: ema``."""

    decay: float = Field(0.0, ge=0, lt=1)  # 0: off; e.g. 0.99 (about the last 100 steps)


class OptimizerParams(Strict):
    """The optimizer of every part (its learning rate is the part's ``lr``)."""

    name: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)  # sgd only (Nesterov)


class TrainParams(Strict):
    """Training of one model per fold (`pneumoseg train --fold K`)."""

    folds: list[Annotated[int, Field(ge=0)]] = [0, 1]
    seed: int = 42
    model: ModelParams = ModelParams()
    optimizer: OptimizerParams = OptimizerParams()
    batch_size: int = Field(8, ge=1)
    accumulate_steps: int = Field(1, ge=1)
    grad_clip: float | None = Field(None, gt=0)
    workers: int = Field(0, ge=0)
    # >1: `pneumoseg train` starts itself under torchrun with this many ranks on this machine
    # (DistributedDataParallel: gloo on CPU, NCCL on GPUs; batch_size is per rank)
    nproc_per_node: int = Field(1, ge=1)
    # >1: that many machines train each fold together (torchrun's c10d rendezvous at
    # rdzv_endpoint, "host:port" that every machine reaches); each runs the same command
    nnodes: int = Field(1, ge=1)
    rdzv_endpoint: str | None = Field(None, pattern=r"^[A-Za-z0-9_.\-\[\]:]+:[0-9]{1,5}$")
    amp: bool = True  # CUDA only
    channels_last: bool = True
    val_threshold: Fraction = 0.5
    # false: no radiograph pixels in plots/ or MLflow (val_overlays.png says so instead)
    overlays: bool = True
    # every N epochs (and after the last) score the held-out fold: the observed_heldout_*
    # curves, which no training decision reads (0: off; nothing to add with selection held_out)
    observe_heldout_every: int = Field(5, ge=0)
    selection: SelectionParams = SelectionParams()
    checkpoint: CheckpointParams = CheckpointParams()
    swa: SWAParams = SWAParams()
    ema: EMAParams = EMAParams()
    # save the weights at the end of every complete cosine_restarts cycle (a study that trains
    # only the first parts may have none: the fold's record then says so)
    snapshots: bool = False
    grad_checkpointing: bool = False  # recompute encoder activations in backward (tu- encoders)
    augment: AugmentParams = AugmentParams()
    parts: list[PartParams] = Field(default_factory=lambda: demo_parts(), min_length=1)
    models_dir: str = "models/folds"
    work_dir: str = "checkpoints"  # resume state, outside DVC outs (git-ignored)
    metrics_dir: str = "metrics"
    plots_dir: str = "plots"

    @model_validator(mode="after")
    def _consistent(self) -> TrainParams:
        if self.nnodes > 1 and self.rdzv_endpoint is None:
            raise ValueError(
                f"rdzv_endpoint: nnodes is {self.nnodes}; give the host:port where the machines "
                "meet (torchrun's c10d rendezvous, e.g. node0.cluster:29400)"
            )
        if self.selection.mode == "none":
            if self.checkpoint.final in ("best", "average_top_k"):
                raise ValueError(
                    f"checkpoint.final: {self.checkpoint.final!r} ranks epochs on a validation "
                    "split; with selection.mode: none use last or swa"
                )
            if any(p.scheduler.name == "plateau" for p in self.parts):
                raise ValueError(
                    "parts: the plateau scheduler watches a validation split; with "
                    "selection.mode: none use another scheduler"
                )
        if self.checkpoint.final == "ema" and self.ema.decay == 0:
            raise ValueError("checkpoint.final: 'ema' needs ema.decay > 0")
        if self.grad_checkpointing and not self.model.encoder.startswith("tu-"):
            raise ValueError(
                f"grad_checkpointing: needs a timm encoder (tu-<name>), not {self.model.encoder!r}"
            )
        if self.checkpoint.final == "swa" and self.swa.epochs == 0:
            raise ValueError("checkpoint.final: 'swa' needs swa.epochs > 0")
        if self.swa.epochs > self.parts[-1].epochs:
            raise ValueError("swa.epochs: exceeds the epochs of the last part")
        if any(p.loss.cls > 0 for p in self.parts) and not self.model.classification_head:
            raise ValueError("parts: loss.cls > 0 needs model.classification_head: true")
        if self.model.classification_head and not any(p.loss.cls > 0 for p in self.parts):
            raise ValueError(
                "model.classification_head: needs loss.cls > 0 in a part (else it is never trained)"
            )
        if len(set(self.folds)) != len(self.folds):
            raise ValueError("folds: must be unique")
        return self

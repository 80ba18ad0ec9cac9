"""The sections of ``params.yaml`` that the pipeline's stages read. Their defaults are the
values of the shipped ``params.yaml`` (tests/test_params.py checks that they agree), so a
partial params file behaves like the shipped one."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class Strict(BaseModel):
    """Base for every section: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DemoParams(Strict):
    """Synthetic SIIM-like DICOM data set (`pneumoseg demo`)."""

    out_dir: str = "data/raw/demo"
    n_train: int = Field(640, ge=4)
    n_test: int = Field(64, ge=0)
    size: int = Field(512, ge=64, le=4096)
    positive_fraction: Fraction = 0.22
    seed: int = 2019


class ClaheParams(Strict):
    """Contrast-limited adaptive histogram equalisation applied after windowing."""

    enabled: bool = False
    clip_limit: PositiveFloat = 2.0
    tile_grid: int = Field(8, ge=1, le=64)


class DataParams(Strict):
    """DICOM conversion (`pneumoseg convert`)."""

    raw_dir: str = "data/raw/demo"  # searched recursively for <ImageId>.dcm
    rle_csv: str | None = None  # None: raw_dir/train-rle.csv or raw_dir/stage_2_train.csv
    rle_dialect: Literal["relative", "absolute", "auto"] = "auto"
    processed_dir: str = "data/processed"
    size: int = Field(256, ge=32, le=4096)
    clahe: ClaheParams = ClaheParams()
    sample_submission: str | None = None  # None: <raw_dir>/sample_submission.csv if present
    workers: int = Field(2, ge=1)
    file_timeout: float = Field(60, gt=0)  # seconds per DICOM; longer is a failure row
    max_failed_fraction: Fraction = 0.05
    # true: every ImageId downstream is a keyed pseudonym (key: $PNEUMOSEG_ID_KEY)
    pseudonymize_ids: bool = False


class SplitParams(Strict):
    """Stratified K-fold split (`pneumoseg split`)."""

    n_folds: int = Field(5, ge=2)
    seed: int = 42
    out: str = "data/folds.csv"


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


class ModelParams(Strict):
    """An smp model: ``encoder_weights`` is null, ``imagenet`` (needs the hub) or a local file."""

    arch: Literal[ARCHS] = "Unet"  # type: ignore[valid-type]
    encoder: str = "tu-mobilenetv3_small_100"
    encoder_weights: str | None = None
    in_channels: Literal[1, 3] = 1
    # None: smp's (256, 128, 64, 32, 16); the demo's light decoder is 4x cheaper at 256 px
    decoder_channels: list[Annotated[int, Field(ge=1)]] | None = [128, 64, 32, 16, 8]
    classification_head: bool = False


class LossParams(Strict):
    """Combo loss weights (any subset > 0), e.g. bce 3, dice 1, focal 4."""

    bce: float = Field(1.0, ge=0)
    dice: float = Field(1.0, ge=0)
    focal: float = Field(0.0, ge=0)
    lovasz: float = Field(0.0, ge=0)
    cls: float = Field(0.0, ge=0)  # classification-head BCE (needs model.classification_head)

    @model_validator(mode="after")
    def _some_weight(self) -> LossParams:
        if self.bce + self.dice + self.focal + self.lovasz <= 0:
            raise ValueError("bce: at least one of bce, dice, focal, lovasz must be > 0")
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


class PartParams(Strict):
    """One training part; each part starts from the previous part's best weights."""

    size: int = Field(128, ge=32, le=4096)
    epochs: int = Field(45, ge=1)
    lr: PositiveFloat = 3e-3
    scheduler: SchedulerParams = SchedulerParams()
    loss: LossParams = LossParams()
    sample_rate: SampleRateParams = SampleRateParams()


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
    final: Literal["best", "average_top_k", "swa", "last"] = "swa"


class SWAParams(Strict):
    """Stochastic weight averaging over the last ``epochs`` epochs of the last part."""

    epochs: int = Field(4, ge=0)  # 0: off
    lr: float | None = Field(None, gt=0)  # None: keep the part's schedule


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
    amp: bool = True  # CUDA only
    channels_last: bool = True
    val_threshold: Fraction = 0.5
    # false: no radiograph pixels in plots/ or MLflow (val_overlays.png says so instead)
    overlays: bool = True
    selection: SelectionParams = SelectionParams()
    checkpoint: CheckpointParams = CheckpointParams()
    swa: SWAParams = SWAParams()
    augment: AugmentParams = AugmentParams()
    parts: list[PartParams] = Field(default_factory=lambda: demo_parts(), min_length=1)
    models_dir: str = "models/folds"
    work_dir: str = "checkpoints"  # resume state, outside DVC outs (git-ignored)
    metrics_dir: str = "metrics"
    plots_dir: str = "plots"

    @model_validator(mode="after")
    def _consistent(self) -> TrainParams:
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


class OofParams(Strict):
    """Out-of-fold prediction (`pneumoseg oof`) and the map size all evaluation uses."""

    size: int | None = Field(None, ge=16, le=4096)  # S of oof/probs.npy; None: the model's size
    tta_hflip: bool = True
    checkpoints: Literal["final", "top_k"] = "final"  # top_k: average a fold's top-k models
    batch_size: int = Field(16, ge=1)
    out_dir: str = "oof"


Range = tuple[float, float]


class ThresholdSpace(Strict):
    """Search ranges of the triplet rule (areas in pixels at the native image resolution)."""

    top_threshold: Range = (0.2, 0.95)
    bottom_threshold: Range = (0.05, 0.9)
    min_area: Range = (0, 6000)
    min_component_area: Range | None = None
    cls_gate: Range | None = (0.0, 0.95)  # searched only for models with a head

    @model_validator(mode="after")
    def _ordered(self) -> ThresholdSpace:
        for name in (
            "top_threshold",
            "bottom_threshold",
            "min_area",
            "min_component_area",
            "cls_gate",
        ):
            rng = getattr(self, name)
            if rng is not None and not rng[0] <= rng[1]:
                raise ValueError(f"{name}: low must be <= high")
        return self


class ThresholdsParams(Strict):
    """Optuna search of the post-processing triplet (`pneumoseg thresholds`)."""

    trials: int = Field(200, ge=1)
    seed: int = 42
    space: ThresholdSpace = ThresholdSpace()
    exhaustive: bool = True  # also scan the whole uint8 grid for the true optimum
    exhaustive_areas: list[Annotated[float, Field(ge=0)]] = [
        0,
        250,
        500,
        1000,
        2000,
        3000,
        4000,
        6000,
    ]
    group_by: Literal["view_position", "sex"] | None = None  # conditional thresholds
    storage: str | None = (
        None  # None: optuna/journal.log; or an RDB URL; env PNEUMOSEG_OPTUNA_STORAGE
    )
    out: str = "models/postprocess.json"
    metrics: str = "metrics/thresholds.json"  # scores + MLflow run id (DVC metrics, git-tracked)
    plots_dir: str = "plots/thresholds"


class EvaluateParams(Strict):
    """Honest evaluation on the OOF set (`pneumoseg evaluate`)."""

    bootstrap: int = Field(1000, ge=0)
    gallery: int = Field(8, ge=0)  # worst false positives / negatives shown
    out: str = "metrics/evaluate.json"
    plots_dir: str = "plots/evaluate"


class SubmitParams(Strict):
    """Kaggle submission for the test DICOMs (`pneumoseg submit`)."""

    # None: the training csv's dialect (data/processed/dataset.json), so stage 2 data gives
    # absolute RLE without a setting
    dialect: Literal["relative", "absolute"] | None = None
    out: str = "submission/submission.csv"


class RegistryParams(Strict):
    """The fold ensemble + TTA + post-processing as one MLflow model (`pneumoseg register`)."""

    auto_promote: bool = False  # champion moves when the challenger's cross-fitted score is higher
    out: str = "metrics/registered.json"  # registered version, model URI, run id (DVC metrics)


class ServingParams(Strict):
    """Limits of the served model; README "Serve" says which layer enforces each."""

    max_rows: int = Field(64, ge=1)  # rows per request (the pyfunc answers 400 beyond)
    max_image_pixels: int = Field(4096 * 4096, ge=1)  # Rows x Columns x frames, before decoding
    max_body_mb: float = Field(64, gt=0)  # request body (`pneumoseg serve` answers 413 beyond)


class MlflowParams(Strict):
    """Where runs are tracked; ``MLFLOW_TRACKING_URI`` overrides ``tracking_uri``."""

    experiment: str = "pneumoseg"
    tracking_uri: str = "sqlite:///mlruns/mlflow.db"
    artifact_location: str = "mlruns/artifacts"
    registered_model: str = "pneumoseg"
    system_metrics: bool = True  # CPU, memory, disk (GPU with nvidia-ml-py) on training runs

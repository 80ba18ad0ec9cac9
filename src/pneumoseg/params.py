"""The validated ``params.yaml`` schema: the single source of truth for every parameter.

Every CLI entry calls :func:`load_params`, which stops with a one-line message naming the key
path (``params.yaml: train.parts[1].lr: must be > 0``) before any work is done.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class ParamsError(ValueError):
    """A params file that cannot be used; ``str(err)`` is the one-line message for the user."""


class Strict(BaseModel):
    """Base for every section: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DemoParams(Strict):
    """Synthetic SIIM-like DICOM data set (`pneumoseg demo`)."""

    out_dir: str = "data/raw/demo"
    n_train: int = Field(320, ge=4)
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
    max_failed_fraction: Fraction = 0.05


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
    decoder_channels: list[Annotated[int, Field(ge=1)]] | None = None
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

    start: Annotated[float, Field(gt=0, le=1)] = 0.5
    end: Annotated[float, Field(gt=0, le=1)] | None = None  # None: same as start
    shape: Literal["constant", "linear", "step"] = "constant"
    steps: int = Field(2, ge=1)  # number of plateaus for shape=step


class SchedulerParams(Strict):
    """Per-part learning-rate schedule (torch.optim.lr_scheduler)."""

    name: Literal["constant", "cosine", "cosine_restarts", "plateau"] = "cosine"
    min_lr: float = Field(1e-6, ge=0)
    restart_epochs: int = Field(2, ge=1)  # cosine_restarts: T_0
    restart_mult: int = Field(1, ge=1)  # cosine_restarts: T_mult
    patience: int = Field(2, ge=0)  # plateau
    factor: float = Field(0.5, gt=0, lt=1)  # plateau
    warmup_epochs: int = Field(0, ge=0)


class PartParams(Strict):
    """One training part; each part starts from the previous part's best weights."""

    size: int = Field(128, ge=32, le=4096)
    epochs: int = Field(4, ge=1)
    lr: PositiveFloat = 1e-3
    scheduler: SchedulerParams = SchedulerParams()
    loss: LossParams = LossParams()
    sample_rate: SampleRateParams = SampleRateParams()


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

    mode: Literal["inner", "none", "held_out"] = "inner"
    inner_fraction: float = Field(0.15, gt=0, lt=0.5)


class CheckpointParams(Strict):
    """Top-k checkpoint selection and the final weights of a fold."""

    monitor: str = "val_kaggle_dice"
    mode: Literal["max", "min"] = "max"
    top_k: int = Field(3, ge=1)
    final: Literal["best", "average_top_k", "swa", "last"] = "best"


class SWAParams(Strict):
    """Stochastic weight averaging over the last ``epochs`` epochs of the last part."""

    epochs: int = Field(0, ge=0)  # 0: off
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
    selection: SelectionParams = SelectionParams()
    checkpoint: CheckpointParams = CheckpointParams()
    swa: SWAParams = SWAParams()
    augment: AugmentParams = AugmentParams()
    parts: list[PartParams] = Field(default_factory=lambda: [PartParams()], min_length=1)
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

    dialect: Literal["relative", "absolute"] = "relative"
    out: str = "submission/submission.csv"


class RegistryParams(Strict):
    """The fold ensemble + TTA + post-processing as one MLflow model (`pneumoseg register`)."""

    auto_promote: bool = False  # champion moves when the challenger's cross-fitted score is higher
    out: str = "metrics/registered.json"  # registered version, model URI, run id (DVC metrics)


class MlflowParams(Strict):
    """Where runs are tracked; ``MLFLOW_TRACKING_URI`` overrides ``tracking_uri``."""

    experiment: str = "pneumoseg"
    tracking_uri: str = "sqlite:///mlruns/mlflow.db"
    artifact_location: str = "mlruns/artifacts"
    registered_model: str = "pneumoseg"


STUDY_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"


class Distribution(Strict):
    """One searched parameter: a float/int range (optionally log-scaled or stepped) or a list
    of categorical choices."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = Field(None, gt=0)
    choices: list[str | bool | int | float | None] | None = None

    @model_validator(mode="after")
    def _complete(self) -> Distribution:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("choices: a categorical parameter needs a non-empty list")
            return self
        if self.low is None or self.high is None:
            raise ValueError("low: a float/int parameter needs low and high")
        if self.low > self.high:
            raise ValueError("low: must be <= high")
        if self.log and self.low <= 0:
            raise ValueError("low: must be > 0 with log: true")
        if self.log and self.step is not None:
            raise ValueError("step: cannot be combined with log: true")
        return self


class PrunerParams(Strict):
    """Early stopping of unpromising trials from their per-epoch validation metric."""

    name: Literal["median", "hyperband", "none"] = "median"
    startup_trials: int = Field(3, ge=0)  # median: finished trials before pruning starts
    warmup_epochs: int = Field(1, ge=0)  # median: epochs of a trial before it can be pruned


class StudyParams(Strict):
    """An Optuna study over training params (`pneumoseg study run NAME`): each trial trains
    ``folds`` with the trial's values on the reduced ``budget`` and returns the mean final
    validation ``metric``."""

    space: dict[str, Distribution] = Field(min_length=1)  # params path -> distribution
    parts: int | None = Field(None, ge=1)  # trials train only the first N parts (None: all)
    budget: dict[str, Any] = {}  # params path -> value applied to every trial (fewer epochs...)
    folds: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [0], min_length=1)
    metric: str = "val_kaggle_dice"  # a final validation metric of `train` (metrics/fold<k>.json)
    direction: Literal["maximize", "minimize"] = "maximize"
    trials: int = Field(20, ge=1)  # finished (complete + pruned) trials the study aims at
    timeout: float | None = Field(None, gt=0)  # seconds per worker; None: no limit
    sampler: Literal["tpe", "random", "grid", "cmaes"] = "tpe"
    seed: int = 42
    pruner: PrunerParams = PrunerParams()
    storage: str | None = None  # None: optuna/journal.log; an RDB URL; env PNEUMOSEG_OPTUNA_STORAGE
    work_dir: str = "optuna/trials"  # per-trial training files, deleted when a trial ends

    @model_validator(mode="after")
    def _metric(self) -> StudyParams:
        if not self.metric.startswith("val_"):
            raise ValueError("metric: must be a validation metric (val_kaggle_dice, val_loss, ...)")
        return self


class AppliedStudy(Strict):
    """A study whose best values are in these params (written by ``pneumoseg study apply``):
    which images scored its trials, so ``evaluate`` can tell which OOF images it saw."""

    name: str
    trial: int
    value: float | None = None
    folds: list[Annotated[int, Field(ge=0)]]
    selection: Literal["inner", "held_out"]  # the images of those folds that scored the trials
    inner_fraction: float = Field(0.15, gt=0, lt=0.5)
    seed: int = 42  # train.seed of the trials (the inner split depends on it)


class ProvenanceParams(Strict):
    """Decisions taken outside the pipeline's stages whose results live in these params."""

    studies: list[AppliedStudy] = []


class Params(Strict):
    """The whole ``params.yaml``."""

    demo: DemoParams = DemoParams()
    data: DataParams = DataParams()
    split: SplitParams = SplitParams()
    train: TrainParams = TrainParams()
    oof: OofParams = OofParams()
    thresholds: ThresholdsParams = ThresholdsParams()
    evaluate: EvaluateParams = EvaluateParams()
    submit: SubmitParams = SubmitParams()
    registry: RegistryParams = RegistryParams()
    mlflow: MlflowParams = MlflowParams()
    studies: dict[str, StudyParams] = {}
    provenance: ProvenanceParams = ProvenanceParams()

    @model_validator(mode="after")
    def _folds_exist(self) -> Params:
        bad = [f for f in self.train.folds if f >= self.split.n_folds]
        if bad:
            raise ValueError(f"train.folds: {bad} must be < split.n_folds={self.split.n_folds}")
        for name, study in self.studies.items():
            check_study(self, name, study)
        return self


# What each DVC stage reads, besides the paths that dvc.yaml interpolates (``${data.size}`` in a
# dep or out makes DVC track that key through the path). dvc.yaml lists exactly these keys
# under each stage's ``params:``; tests/test_declarations.py runs every stage with a params
# object that records each key it reads and checks both directions against dvc.yaml.
STAGE_PARAMS: dict[str, tuple[str, ...]] = {
    "demo": ("demo.n_train", "demo.n_test", "demo.size", "demo.positive_fraction", "demo.seed"),
    "convert": (
        "data.rle_csv",
        "data.rle_dialect",
        "data.size",
        "data.clahe",
        "data.sample_submission",
        "data.max_failed_fraction",
    ),
    "split": ("split.n_folds", "split.seed"),
    "train": (
        "train.seed",
        "train.model",
        "train.optimizer",
        "train.batch_size",
        "train.accumulate_steps",
        "train.grad_clip",
        "train.amp",
        "train.channels_last",
        "train.val_threshold",
        "train.selection",
        "train.checkpoint",
        "train.swa",
        "train.augment",
        "train.parts",
    ),
    "oof": ("oof.size", "oof.tta_hflip", "oof.checkpoints", "oof.batch_size", "train.folds"),
    "thresholds": (
        "thresholds.trials",
        "thresholds.seed",
        "thresholds.space",
        "thresholds.exhaustive",
        "thresholds.exhaustive_areas",
        "thresholds.group_by",
    ),
    "evaluate": (
        "evaluate.bootstrap",
        "evaluate.gallery",
        "thresholds.trials",
        "thresholds.seed",
        "thresholds.space",
        "thresholds.exhaustive",
        "thresholds.exhaustive_areas",
        "thresholds.group_by",
        "provenance.studies",
    ),
    "register": (
        "registry.auto_promote",
        "train.folds",
        "oof.tta_hflip",
        "oof.checkpoints",
        "oof.batch_size",
        "data.size",
        "data.clahe",
        "submit.dialect",
    ),
    "submit": (
        "submit.dialect",
        "train.folds",
        "oof.tta_hflip",
        "oof.checkpoints",
        "oof.batch_size",
    ),
}

# Keys a stage may read without declaring them, because they cannot change its result. Each
# one is a decision, with its reason (README "Parameters" shows this table).
EXEMPT_KEYS: dict[str, str] = {
    "data.workers": "how many processes convert in parallel; the outputs are identical",
    "train.workers": "DataLoader processes; augmentation is seeded per item, so the weights are "
    "identical",
    "train.work_dir": "where the resume state of a running training lives (deleted at its end)",
    "thresholds.storage": "where the Optuna study is stored, not what it finds",
    "mlflow": "where runs and model versions are recorded, not what is computed",
    "studies": "Optuna studies run beside the pipeline; `study apply` writes their results "
    "into the keys above",
}


def read_keys(params: Any, keys: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """``{key: value}`` of dotted keys (``train.parts``), read attribute by attribute; sections
    come back as plain JSON-ready dicts."""
    out: dict[str, Any] = {}
    for key in keys:
        node = params
        for token in key.split("."):
            node = getattr(node, token)
        if hasattr(node, "model_dump"):
            node = node.model_dump(mode="json")
        elif isinstance(node, list):
            node = [v.model_dump(mode="json") if hasattr(v, "model_dump") else v for v in node]
        out[key] = node
    return out


def nest(values: dict[str, Any]) -> dict[str, Any]:
    """``{"data.size": 256}`` -> ``{"data": {"size": 256}}`` (the layout of params.yaml)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        set_path(out, key, value)
    return out


def stage_values(params: Any, stage: str) -> dict[str, Any]:
    """The values of the keys stage ``stage`` declares (:data:`STAGE_PARAMS`)."""
    return read_keys(params, STAGE_PARAMS[stage])


def digest(values: dict[str, Any]) -> str:
    """Short sha256 of JSON-ready ``values``, stable across key order."""
    blob = json.dumps(values, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def stage_digest(params: Any, stage: str) -> str:
    """:func:`digest` of the keys the stage declares: what resume and upload compare."""
    return digest(stage_values(params, stage))


def check_study(params: Params, name: str, study: StudyParams) -> None:
    """Every path of a study's space and budget must be a params key that accepts the values
    the study can give it (range ends, choices, budget values); raises a one-line ValueError."""
    where = f"studies.{name}"
    if not re.fullmatch(STUDY_NAME, name):
        raise ValueError(f"{where}: study names use letters, digits, '_', '.', '-'")
    bad = [f for f in study.folds if f >= params.split.n_folds]
    if bad:
        raise ValueError(f"{where}.folds: {bad} must be < split.n_folds={params.split.n_folds}")
    base = params.model_dump(mode="json", exclude={"studies"})
    base["train"]["parts"] = base["train"]["parts"][: study.parts]
    for path, value in study.budget.items():
        _check_value(base, f"{where}.budget.{path}", path, value)
    budgeted = json.loads(json.dumps(base))
    for path, value in study.budget.items():
        set_path(budgeted, path, value)
    for path, dist in study.space.items():
        if not path.startswith("train."):
            raise ValueError(f"{where}.space.{path}: only train.* params can be searched")
        if dist.type == "categorical":
            values = list(dist.choices or [])
        elif dist.type == "int":
            values = [int(dist.low or 0), int(dist.high or 0)]
        else:
            values = [dist.low, dist.high]
        for value in values:
            _check_value(budgeted, f"{where}.space.{path}", path, value)


def _check_value(base: dict[str, Any], where: str, path: str, value: Any) -> None:
    if get_path(base, path) is MISSING:
        raise ValueError(f"{where}: not a params key")
    trial = json.loads(json.dumps(base))
    set_path(trial, path, value)
    try:
        Params.model_validate(trial)
    except ValidationError as err:
        first = format_validation_error(err, "").splitlines()[0].removeprefix(": ")
        raise ValueError(f"{where}: value {value!r} is invalid ({first})") from None


MISSING = object()  # get_path: the key does not exist


def get_path(data: Any, path: str) -> Any:
    """The value at a dotted path such as ``train.parts[0].lr`` (a sentinel when absent)."""
    node = data
    for tok in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        if tok.startswith("["):
            i = int(tok[1:-1])
            if not isinstance(node, list) or i >= len(node):
                return MISSING
            node = node[i]
        elif isinstance(node, dict) and tok in node:
            node = node[tok]
        else:
            return MISSING
    return node


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts/lists into ``{"a.b.0.c": value}`` (lists of scalars stay whole)."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        for i, value in enumerate(obj):
            out.update(flatten(value, f"{prefix}.{i}"))
    else:
        out[prefix] = obj
    return out


def _loc_to_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "<root>"


_MESSAGES = {
    "greater_than": "must be > {gt:g}",
    "greater_than_equal": "must be >= {ge:g}",
    "less_than": "must be < {lt:g}",
    "less_than_equal": "must be <= {le:g}",
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
}


def _describe(error: dict[str, Any]) -> str:
    template = _MESSAGES.get(error["type"])
    if template:
        return template.format(**error.get("ctx", {}))
    msg = error["msg"]
    if error["type"].endswith("_type") or error["type"].endswith("_parsing"):
        msg += f" (got {error.get('input')!r})"
    return msg[0].lower() + msg[1:]


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem: ``<source>: <key path>: <what is wrong>``; the first line leads."""
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        path, message = _loc_to_path(loc), _describe(e)
        if e["type"] == "value_error":  # our validators: "<relative.key>: <problem>"
            message = message.removeprefix("value error, ")
            key, sep, rest = message.partition(": ")
            if sep and re.fullmatch(r"[\w.\[\]-]+", key):
                path = key if path == "<root>" else f"{path}.{key}"
                message = rest
        lines.append(f"{source}: {path}: {message}")
    return "\n".join(lines)


def set_path(data: dict[str, Any], path: str, value: Any) -> None:
    """Set ``data`` at a dotted path such as ``train.parts[0].lr`` (creating dicts as needed)."""
    tokens = re.findall(r"[^.\[\]]+|\[\d+\]", path)
    if not tokens:
        raise ParamsError(f"override: empty key path {path!r}")
    node: Any = data
    for tok, nxt in zip(tokens, [*tokens[1:], None], strict=True):
        key: Any = int(tok[1:-1]) if tok.startswith("[") else tok
        if nxt is None:
            if isinstance(key, int) and (not isinstance(node, list) or key >= len(node)):
                raise ParamsError(f"override {path}: index {key} out of range")
            node[key] = value
            return
        if isinstance(key, int):
            if not isinstance(node, list) or key >= len(node):
                raise ParamsError(f"override {path}: index {key} out of range")
            node = node[key]
        else:
            if not isinstance(node, dict):
                raise ParamsError(f"override {path}: {tok} is not a mapping")
            node = node.setdefault(key, {} if not nxt.startswith("[") else [])


def load_params(
    path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None
) -> Params:
    """Read, override (``{"data.size": 128}``; ``None`` values ignored) and validate params."""
    path = Path(path)
    source = path.name
    if path.exists():
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            problem = getattr(exc, "problem", exc)
            raise ParamsError(f"{source}:{where} invalid YAML: {problem}") from None
        if not isinstance(raw, dict):
            raise ParamsError(f"{source}: top level must be a mapping")
    else:
        raise ParamsError(f"{source}: file not found ({path})")
    for key, value in (overrides or {}).items():
        if value is not None:
            set_path(raw, key, value)
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(format_validation_error(err, source)) from None

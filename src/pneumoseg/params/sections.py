"""The sections of ``params.yaml`` that the pipeline's stages read. Their defaults are the
values of the shipped ``params.yaml`` (tests/test_params.py checks that they agree), so a
partial params file behaves like the shipped one."""

from __future__ import annotations

from typing import Annotated, Any, Literal

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


class ArraysParams(Strict):
    """The training images and masks as uint8 arrays, decoded once (`pneumoseg arrays`)."""

    # sizes written besides data.size (always): one per training part size; a part size not
    # listed is resized per item from the data.size array
    sizes: list[Annotated[int, Field(ge=16, le=4096)]] = [128]
    out_dir: str = "data/arrays"


class SplitParams(Strict):
    """Stratified K-fold split (`pneumoseg split`)."""

    n_folds: int = Field(5, ge=2)
    seed: int = 42
    out: str = "data/folds.csv"


class OofParams(Strict):
    """Out-of-fold prediction (`pneumoseg oof`) and the map size all evaluation uses."""

    size: int | None = Field(None, ge=16, le=4096)  # S of oof/probs.npy; None: the model's size
    tta_hflip: bool = True
    # more test-time views (each also flipped with tta_hflip): input rescaled by each factor
    # (to a multiple of 32 px) and the maps resized back; a gamma curve on the uint8 image
    tta_scales: list[Annotated[float, Field(ge=0.5, le=2)]] = []
    tta_gammas: list[Annotated[float, Field(gt=0.2, lt=5)]] = []
    # top_k: average a fold's top-k models; snapshots: its restart-cycle snapshots
    checkpoints: Literal["final", "top_k", "snapshots"] = "final"
    batch_size: int = Field(16, ge=1)
    out_dir: str = "oof"


def default_finetune() -> dict[str, Any]:
    """The further part of ``finetune@<fold>``: three epochs at the fold models' size (``size``
    null: train.parts' last), last weights."""
    part = {
        "size": None,
        "epochs": 3,
        "lr": 0.0003,
        "scheduler": {"name": "cosine", "min_lr": 0.00001, "warmup_epochs": 0},
        "loss": {"bce": 1, "dice": 1, "focal": 0, "lovasz": 0},
        "sample_rate": {"start": 0.4, "end": 0.4, "shape": "constant"},
    }
    return {"parts": [part], "checkpoint": {"final": "last"}, "swa": {"epochs": 0}}


class PseudoLabelParams(Strict):
    """Pseudo-labels (``pseudo_label@<fold>``, ``finetune@<fold>``; off while ``folds`` is
    empty): fold k's own model labels the test images it is confident about, and fold k's model
    is fine-tuned on its training images plus those."""

    folds: list[int] = []  # the folds to fine-tune (a subset of train.folds)
    # an image is a pseudo-positive when its largest pixel probability reaches this ...
    positive_confidence: float = Field(0.9, gt=0, le=1)
    # ... and a pseudo-empty image when its largest pixel probability stays below this
    negative_confidence: float = Field(0.05, ge=0, lt=1)
    pixel_threshold: float = Field(0.5, gt=0, lt=1)  # a pseudo-positive's mask: probs >= this
    positive_min_area: int = Field(0, ge=0)  # and at least this many mask pixels (model size)
    # a partial train section deep-merged into train (like ensemble.members; lists replaced)
    finetune: dict[str, Any] = Field(default_factory=default_finetune)
    out_dir: str = "data/pseudo"

    @model_validator(mode="after")
    def _ordered(self) -> PseudoLabelParams:
        if self.negative_confidence >= self.positive_confidence:
            raise ValueError("negative_confidence: must be below positive_confidence")
        if self.pixel_threshold > self.positive_confidence:
            raise ValueError(
                "pixel_threshold: must not exceed positive_confidence (a confident positive "
                "would get an empty mask)"
            )
        if len(set(self.folds)) != len(self.folds):
            raise ValueError("folds: must be unique")
        return self


Range = tuple[float, float]


class EnsembleParams(Strict):
    """Further models trained on the same folds (``member@<name>-<fold>`` stages) and how their
    out-of-fold maps are combined with the ``train`` section's models (member ``main``)."""

    # name -> a partial train section deep-merged into ``train`` (lists such as ``parts``
    # are replaced whole), e.g. {fpn: {model: {arch: FPN}}}; empty: one model per fold
    members: dict[str, dict[str, Any]] = {}
    # fitted: member weights maximising the Kaggle score on the OOF maps (cross-fitted by
    # evaluate); equal: the plain mean
    weights: Literal["fitted", "equal"] = "fitted"
    weight_step: float = Field(0.1, gt=0, le=0.5)  # grid spacing of the weights searched


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
    per_image: str = "metrics/per_image.csv"  # one row per OOF image (MLflow: a sortable table)
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


class ResultParams(Strict):
    """The pipeline's one row in MLflow (`pneumoseg result`, the last stage)."""

    out: str = "metrics/result.json"  # its headline numbers and MLflow run id (DVC metrics)


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

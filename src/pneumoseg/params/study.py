"""The ``studies`` and ``provenance`` sections: Optuna studies over training params and the
record of which studies chose the values in the file."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from pneumoseg.params.sections import Strict

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
    warmup_epochs: int = Field(4, ge=0)  # median: epochs of a trial before it can be pruned


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


def shipped_studies() -> dict[str, StudyParams]:
    """The studies of the shipped params.yaml: combo-loss weights and the sample-rate schedule
    of part 0, on a reduced 12-epoch first part, scored on fold 0; and the freebies."""
    bounds = {
        "train.parts[0].loss.bce": (0.5, 4),
        "train.parts[0].loss.dice": (0.5, 4),
        "train.parts[0].loss.focal": (0, 4),
        "train.parts[0].sample_rate.start": (0.4, 0.9),
        "train.parts[0].sample_rate.end": (0.2, 0.6),
    }
    space = {k: Distribution(type="float", low=lo, high=hi) for k, (lo, hi) in bounds.items()}
    space["train.parts[0].sample_rate.shape"] = Distribution(
        type="categorical", choices=["constant", "linear", "step"]
    )
    study = StudyParams(
        space=space,
        parts=1,
        budget={"train.parts[0].epochs": 12},
        metric="val_kaggle_dice_area",
    )
    return {"loss-and-sampling": study, "freebies": freebies_study()}


def freebies_study() -> StudyParams:
    """The tricks of README "Tricks" on a 12-epoch first part, scored on fold 0: decoder
    attention, normalisation, the Jaccard term, label smoothing and the final weights."""
    categorical = {
        "train.model.decoder_attention": [None, "scse"],
        "train.model.norm": ["batch", "group"],
        "train.checkpoint.final": ["swa", "ema"],
    }
    space = {k: Distribution(type="categorical", choices=v) for k, v in categorical.items()}
    space["train.parts[0].loss.jaccard"] = Distribution(type="float", low=0, high=2)
    space["train.parts[0].loss.label_smoothing"] = Distribution(type="float", low=0, high=0.1)
    return StudyParams(
        space=space,
        parts=1,
        budget={"train.parts[0].epochs": 12, "train.swa.epochs": 3, "train.ema.decay": 0.98},
        metric="val_kaggle_dice_area",
        trials=8,
    )

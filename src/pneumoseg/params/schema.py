"""The whole ``params.yaml``: :class:`Params`, and the check that every study searches keys
that exist and accept the values it can give them."""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import Field, ValidationError, model_validator

from pneumoseg.params.errors import format_validation_error
from pneumoseg.params.finetune import check_finetune
from pneumoseg.params.keys import MISSING, get_path, set_path
from pneumoseg.params.members import check_member
from pneumoseg.params.sections import (
    ArraysParams,
    DataParams,
    DemoParams,
    EnsembleParams,
    EvaluateParams,
    MlflowParams,
    OofParams,
    PseudoLabelParams,
    RegistryParams,
    ResultParams,
    ServingParams,
    SplitParams,
    Strict,
    SubmitParams,
    ThresholdsParams,
)
from pneumoseg.params.study import STUDY_NAME, ProvenanceParams, StudyParams, shipped_studies
from pneumoseg.params.train import TrainParams


class Params(Strict):
    """The whole ``params.yaml``."""

    demo: DemoParams = DemoParams()
    data: DataParams = DataParams()
    arrays: ArraysParams = ArraysParams()
    split: SplitParams = SplitParams()
    train: TrainParams = TrainParams()
    ensemble: EnsembleParams = EnsembleParams()
    pseudo_label: PseudoLabelParams = PseudoLabelParams()
    oof: OofParams = OofParams()
    thresholds: ThresholdsParams = ThresholdsParams()
    evaluate: EvaluateParams = EvaluateParams()
    submit: SubmitParams = SubmitParams()
    registry: RegistryParams = RegistryParams()
    result: ResultParams = ResultParams()
    serving: ServingParams = ServingParams()
    mlflow: MlflowParams = MlflowParams()
    studies: dict[str, StudyParams] = Field(default_factory=shipped_studies)
    provenance: ProvenanceParams = ProvenanceParams()

    @model_validator(mode="after")
    def _folds_exist(self) -> Params:
        bad = [f for f in self.train.folds if f >= self.split.n_folds]
        if bad:
            raise ValueError(f"train.folds: {bad} must be < split.n_folds={self.split.n_folds}")
        train = self.train.model_dump(mode="json")
        for name, overrides in self.ensemble.members.items():
            check_member(name, overrides, train)
        untrained = [f for f in self.pseudo_label.folds if f not in self.train.folds]
        if untrained:
            raise ValueError(f"pseudo_label.folds: {untrained} are not in train.folds")
        if self.pseudo_label.folds:  # (checked when used: it merges into train as it is then)
            check_finetune(self.pseudo_label.finetune, train)
        for name, study in self.studies.items():
            check_study(self, name, study)
        return self


def check_study(params: Params, name: str, study: StudyParams) -> None:
    """Every path of a study's space and budget must be a params key that accepts the values
    the study can give it (range ends, choices, budget values); raises a one-line ValueError."""
    where = f"studies.{name}"
    if not re.fullmatch(STUDY_NAME, name):
        raise ValueError(f"{where}: study names use letters, digits, '_', '.', '-'")
    bad = [f for f in study.folds if f >= params.split.n_folds]
    if bad:
        raise ValueError(f"{where}.folds: {bad} must be < split.n_folds={params.split.n_folds}")
    base = params.model_dump(mode="json", exclude={"studies", "ensemble"}) | {"studies": {}}
    base["train"]["parts"] = base["train"]["parts"][: study.parts]
    budgeted = json.loads(json.dumps(base))
    for path, value in study.budget.items():
        if get_path(base, path) is MISSING:
            raise ValueError(f"{where}.budget.{path}: not a params key")
        set_path(budgeted, path, value)
    for path, value in study.budget.items():  # each value with the rest of the budget
        _check_value(budgeted, f"{where}.budget.{path}", path, value)
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

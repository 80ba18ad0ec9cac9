"""The validated ``params.yaml``: the single source of truth for every parameter.

Every CLI entry calls :func:`load_params`, which stops with a one-line message naming the key
path (``params.yaml: train.parts[1].lr: must be > 0``) before any work is done.

- :mod:`~pneumoseg.params.sections`: the pipeline sections (their defaults are the shipped
  values); :mod:`~pneumoseg.params.study`: studies and provenance;
  :mod:`~pneumoseg.params.schema`: :class:`Params`;
- :mod:`~pneumoseg.params.declared`: what each DVC stage reads (``STAGE_PARAMS``) and the
  exempt keys; :mod:`~pneumoseg.params.keys`: dotted key paths;
  :mod:`~pneumoseg.params.errors`: one-line error messages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pneumoseg.params.declared import (
    EXEMPT_KEYS,
    STAGE_PARAMS,
    digest,
    read_keys,
    stage_digest,
    stage_values,
)
from pneumoseg.params.errors import ParamsError, format_validation_error
from pneumoseg.params.finetune import FinetuneParams, finetune_train, finetuned_dir
from pneumoseg.params.keys import MISSING, flatten, get_path, nest, set_path
from pneumoseg.params.members import MAIN, MemberParams, member_dir, member_train
from pneumoseg.params.schema import Params, check_study
from pneumoseg.params.sections import (
    ClaheParams,
    DataParams,
    DemoParams,
    EnsembleParams,
    EvaluateParams,
    MlflowParams,
    OofParams,
    PseudoLabelParams,
    RegistryParams,
    ResultParams,
    SplitParams,
    SubmitParams,
    ThresholdSpace,
    ThresholdsParams,
)
from pneumoseg.params.study import AppliedStudy, Distribution, ProvenanceParams, StudyParams
from pneumoseg.params.train import (
    AugmentParams,
    CheckpointParams,
    EMAParams,
    LossParams,
    ModelParams,
    OptimizerParams,
    PartOptimizerParams,
    PartParams,
    SampleRateParams,
    SchedulerParams,
    SelectionParams,
    SWAParams,
    TrainParams,
)

__all__ = [
    "EXEMPT_KEYS",
    "MAIN",
    "MISSING",
    "STAGE_PARAMS",
    "AppliedStudy",
    "AugmentParams",
    "CheckpointParams",
    "ClaheParams",
    "DataParams",
    "DemoParams",
    "EMAParams",
    "EnsembleParams",
    "Distribution",
    "EvaluateParams",
    "FinetuneParams",
    "LossParams",
    "MlflowParams",
    "MemberParams",
    "ModelParams",
    "OofParams",
    "OptimizerParams",
    "Params",
    "ParamsError",
    "PartOptimizerParams",
    "PartParams",
    "ProvenanceParams",
    "PseudoLabelParams",
    "RegistryParams",
    "ResultParams",
    "SWAParams",
    "SampleRateParams",
    "SchedulerParams",
    "SelectionParams",
    "SplitParams",
    "StudyParams",
    "SubmitParams",
    "ThresholdSpace",
    "ThresholdsParams",
    "TrainParams",
    "check_study",
    "digest",
    "finetune_train",
    "finetuned_dir",
    "flatten",
    "format_validation_error",
    "get_path",
    "load_params",
    "member_dir",
    "member_train",
    "nest",
    "read_keys",
    "set_path",
    "stage_digest",
    "stage_values",
]


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

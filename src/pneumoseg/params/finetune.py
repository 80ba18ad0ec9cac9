"""The train section of ``finetune@<fold>`` (``pseudo_label.finetune``): ``train`` with the
further part's keys deep-merged in, like an ensemble member. Its files live under
``<train.models_dir>/finetuned/`` (and likewise for metrics, plots and the resume state), so the
fold models it starts from keep their paths and DVC stages."""

from __future__ import annotations

from typing import Any

from pneumoseg.params.declared import read_keys
from pneumoseg.params.errors import ParamsError
from pneumoseg.params.members import SHARED_KEYS, merged_train
from pneumoseg.params.train import TrainParams, demo_parts

FINETUNED = "finetuned"
# keys the further part cannot set: those shared by every member, and the model (it continues
# the fold's trained weights)
FIXED_KEYS = (*SHARED_KEYS, "model")


def finetuned_dir(base: str) -> str:
    """Where the fine-tuned models keep what the train section keeps in ``base``."""
    return f"{base}/{FINETUNED}"


def model_size(train: dict[str, Any]) -> int:
    """The size a fold model of the base ``train`` section (plain data) predicts at: its last
    part's."""
    parts = train.get("parts") or [part.model_dump() for part in demo_parts()]
    return int(parts[-1]["size"])


def with_model_size(overrides: Any, size: int) -> Any:
    """``overrides`` with every fine-tuning part that leaves ``size`` out (or null) at the fold
    models' ``size``; a last part of another size is a ValueError naming the key (submit,
    register and predict need fine-tuned and plain folds to predict at one size)."""
    if not isinstance(overrides, dict) or not isinstance(overrides.get("parts"), list):
        return overrides
    parts = [
        part | {"size": size} if isinstance(part, dict) and part.get("size") is None else part
        for part in overrides["parts"]
    ]
    last = parts[-1] if parts else None
    if isinstance(last, dict) and isinstance(last["size"], int) and last["size"] != size:
        raise ValueError(
            f"pseudo_label.finetune.parts[{len(parts) - 1}].size: {last['size']} is not the size "
            f"the fold models predict at ({size}, train.parts' last); leave it null to follow it"
        )
    return overrides | {"parts": parts}


def check_finetune(overrides: Any, train: dict[str, Any]) -> TrainParams:
    """The fine-tuning train section (``train``: the base section as plain data); a ValueError
    names the key (``pseudo_label.finetune.parts.0.lr: ...``). A part's ``size`` left null is
    the fold models' size."""
    why = "fixed for the fine-tuning (it continues each fold's trained model)"
    overrides = with_model_size(overrides, model_size(train))
    return merged_train("pseudo_label.finetune", overrides, train, finetuned_dir, FIXED_KEYS, why)


def finetune_train(params: Any) -> TrainParams:
    """The train section of ``finetune@<fold>``. Reads ``pseudo_label.finetune`` and every
    ``train`` key but ``folds`` (what the stage declares)."""
    fields = [f"train.{f}" for f in TrainParams.model_fields if f != "folds"]
    base = {k.removeprefix("train."): v for k, v in read_keys(params, fields).items()}
    try:
        return check_finetune(params.pseudo_label.finetune, base)
    except ValueError as exc:
        raise ParamsError(f"params.yaml: {exc}") from None


class FinetuneParams:
    """``params`` seen by the fine-tuning: its own ``train`` section (``base_train``: the
    section it continues from), everything else as it is."""

    def __init__(self, params: Any) -> None:
        self._params = params
        self.base_train = params.train
        self.train = finetune_train(params)

    def __getattr__(self, key: str) -> Any:
        return getattr(self._params, key)

"""Ensemble members (``ensemble.members``): further model configurations trained on the same
folds. A member is a partial ``train`` section deep-merged into ``train``; its files live under
``<train.models_dir>/members/<name>/`` (and likewise for metrics, plots and the resume state),
so the ``train`` section's own models (member ``main``) keep their paths and DVC stages."""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial
from typing import Any

from pydantic import ValidationError

from pneumoseg.params.declared import read_keys
from pneumoseg.params.errors import ParamsError, format_validation_error
from pneumoseg.params.train import TrainParams

MAIN = "main"  # the train section's own models
MEMBER_NAME = r"[A-Za-z][A-Za-z0-9_]*"  # no '-': DVC names the stages member@<name>-<fold>
# keys a member cannot set: the folds and the launch (torchrun ranks) are shared, the layout
# follows from the member's name
SHARED_KEYS = (
    "folds",
    "nproc_per_node",
    "nnodes",
    "rdzv_endpoint",
    "models_dir",
    "work_dir",
    "metrics_dir",
    "plots_dir",
)
LAYOUT_KEYS = ("models_dir", "work_dir", "metrics_dir", "plots_dir")


def member_dir(base: str, name: str) -> str:
    """Where member ``name`` keeps what the train section keeps in ``base``."""
    return f"{base}/members/{name}"


def deep_merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in: mappings merge key by key, anything else (lists
    such as ``parts`` included) is replaced whole."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merged(out[key], value)
        else:
            out[key] = value
    return out


def check_member(name: str, overrides: Any, train: dict[str, Any]) -> TrainParams:
    """The member's validated train section (``train``: the base section as plain data);
    a ValueError names the key (``ensemble.members.fpn.model.arch: ...``)."""
    where = f"ensemble.members.{name}"
    if not re.fullmatch(MEMBER_NAME, name) or name == MAIN:
        raise ValueError(
            f"{where}: member names start with a letter and use letters, digits and '_' "
            f"('{MAIN}' is the train section itself)"
        )
    layout = partial(member_dir, name=name)
    return merged_train(where, overrides, train, layout, SHARED_KEYS, "shared by every member")


def merged_train(
    where: str,
    overrides: Any,
    train: dict[str, Any],
    layout: Callable[[str], str],
    fixed: tuple[str, ...],
    why: str,
) -> TrainParams:
    """``train`` with ``overrides`` (a mapping that sets none of the ``fixed`` keys, ``why``)
    deep-merged in and its folders moved by ``layout``, validated; a ValueError names the key
    under ``where``."""
    if not isinstance(overrides, dict):
        raise ValueError(f"{where}: expected a mapping of train keys, e.g. {{seed: 7}}")
    refused = [k for k in fixed if k in overrides]
    if refused:
        raise ValueError(f"{where}.{refused[0]}: {why}, set it in train")
    merged = deep_merged(train, overrides)
    for key in LAYOUT_KEYS:
        merged[key] = layout(train[key])
    try:
        return TrainParams.model_validate(merged)
    except ValidationError as err:
        first = format_validation_error(err, "").splitlines()[0].removeprefix(": ")
        raise ValueError(f"{where}.{first}") from None


def member_train(params: Any, name: str) -> TrainParams:
    """The train section of member ``name``. Reads ``ensemble.members.<name>`` and every
    ``train`` key but ``folds`` (what the member's stage declares)."""
    members = params.ensemble.members
    if name not in members:
        known = ", ".join(sorted(members)) or "none"
        raise ParamsError(f"params.yaml: ensemble.members: no member {name!r} (members: {known})")
    fields = [f"train.{f}" for f in TrainParams.model_fields if f != "folds"]
    base = {k.removeprefix("train."): v for k, v in read_keys(params, fields).items()}
    try:
        return check_member(name, members[name], base)
    except ValueError as exc:
        raise ParamsError(f"params.yaml: {exc}") from None


class MemberParams:
    """``params`` seen by one member's training: its own ``train`` section, everything else
    as it is (attribute access passes through, so what a stage reads stays visible)."""

    def __init__(self, params: Any, name: str) -> None:
        self._params, self.member = params, name
        self.train = member_train(params, name)

    def __getattr__(self, key: str) -> Any:
        return getattr(self._params, key)

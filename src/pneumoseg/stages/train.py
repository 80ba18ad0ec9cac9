"""Stage ``train@<fold>``: train one model per fold, tracked and resumable (see
:mod:`pneumoseg.training`); stage ``member@<name>-<fold>``: the same for ensemble member
``name`` (``ensemble.members``)."""

from __future__ import annotations

from typing import Any

from pneumoseg.params import MAIN, MemberParams, Params


def run(
    params: Params, fold: int | None = None, member: str | None = None, progress: bool = True
) -> list[dict[str, Any]]:
    """CLI/DVC entry: train ``fold`` (or every fold in ``train.folds``) of the train section,
    or of ensemble member ``member``."""
    from pneumoseg.training.distributed import shutdown
    from pneumoseg.training.trainer import FoldTrainer

    folds = [fold] if fold is not None else params.train.folds
    trained = params if member is None else MemberParams(params, member)  # its train section
    try:
        return [FoldTrainer(trained, f, progress, member=member or MAIN).run() for f in folds]
    finally:
        shutdown()

"""Stage ``train@<fold>``: train one model per fold, tracked and resumable (see
:mod:`pneumoseg.training`)."""

from __future__ import annotations

from typing import Any

from pneumoseg.params import Params


def run(params: Params, fold: int | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """CLI/DVC entry: train ``fold`` (or every fold in ``train.folds``)."""
    from pneumoseg.training.distributed import shutdown
    from pneumoseg.training.trainer import FoldTrainer

    folds = [fold] if fold is not None else params.train.folds
    try:
        return [FoldTrainer(params, f, progress).run() for f in folds]
    finally:
        shutdown()

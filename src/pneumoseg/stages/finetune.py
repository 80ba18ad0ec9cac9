"""Stage ``finetune@<fold>`` (optional: one per fold in ``pseudo_label.folds``): continue fold
k's model on its training images plus its pseudo-labelled test images
(:mod:`pneumoseg.training.finetune`). With it, oof, submit and register use the fine-tuned
model of that fold."""

from __future__ import annotations

from typing import Any

from pneumoseg.params import FinetuneParams, Params


def run(params: Params, fold: int | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """CLI/DVC entry: fine-tune ``fold`` (or every fold in ``pseudo_label.folds``)."""
    from pneumoseg.training.distributed import shutdown
    from pneumoseg.training.finetune import FineTuner

    folds = [fold] if fold is not None else list(params.pseudo_label.folds)
    tuned = FinetuneParams(params)
    try:
        return [FineTuner(tuned, k, progress).run() for k in folds]
    finally:
        shutdown()

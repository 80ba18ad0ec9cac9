"""Fine-tuning one fold on its pseudo-labels (stage ``finetune@<fold>``): :class:`FineTuner`
continues fold k's final model for the further part(s) of ``pseudo_label.finetune`` on fold k's
training images plus the test images fold k's own model labelled
(``<pseudo_label.out_dir>/fold<k>/``). The pseudo-labelled images only ever train: the
held-out fold (what OOF scores) and the selection split are the fold's own images, as in
training. Files go to ``<train.models_dir>/finetuned/fold<k>/`` (and likewise metrics, plots
and the resume state); the MLflow run is ``finetune-fold<k>``, tagged ``stage=finetune``."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pneumoseg.models import ModelError, read_model_file
from pneumoseg.params import FinetuneParams, digest
from pneumoseg.pseudo import PseudoSet
from pneumoseg.training.trainer import FoldTrainer

log = logging.getLogger("pneumoseg.training")
# the meta keys that must match between the fold's model and the network fine-tuned
ARCHITECTURE = ("arch", "encoder", "in_channels", "decoder_channels", "classification_head")


class FineTuner(FoldTrainer):
    """Fine-tunes one fold; see the module docstring."""

    stage_name = "finetune"

    def __init__(self, params: FinetuneParams, fold: int, progress: bool = True) -> None:
        self.source = Path(params.base_train.models_dir) / f"fold{fold}" / "model.pt"
        if not self.source.is_file():
            raise FileNotFoundError(f"{self.source}: missing; run `dvc repro train@{fold}` first")
        self.pseudo = PseudoSet.read(Path(params.pseudo_label.out_dir) / f"fold{fold}", fold)
        super().__init__(params, fold, progress)  # (its resume key: run_key below)
        own = {*self.train_ids, *self.images.select, *self.images.held_out}  # folds.csv
        overlap = set(self.pseudo.ids) & own
        if overlap:  # test images only: a training image here would be a leak
            raise ValueError(
                f"{self.pseudo.folder}: {len(overlap)} pseudo-labelled images are training "
                f"images (first: {sorted(overlap)[0]}); rerun `dvc repro pseudo_label@{fold}`"
            )
        self.train_ids = [*self.train_ids, *self.pseudo.ids]  # never select nor held out
        self.positive = np.concatenate([self.positive, self.pseudo.positive])
        self.sources.append(self.pseudo.folder)
        summary = self.pseudo.summary
        self.record_extra = {"pseudo_labels": summary, "finetuned_from": str(self.source)}
        if not self.pseudo.ids:
            log.warning(
                "finetune fold %d: no test image was labelled (%s): the further part trains on "
                "the fold's own images only",
                fold,
                self.pseudo.folder / "labels.csv",
            )

    def run_key(self) -> str:
        """Training's key plus the labels and the starting model's bytes: new labels or a new
        starting model make a saved resume state stale."""
        source = hashlib.sha256(self.source.read_bytes()).hexdigest()
        return f"{super().run_key()}|{digest({'labels': self.pseudo.summary, 'source': source})}"

    def initial_state(self) -> dict[str, torch.Tensor]:
        """The fold's final weights; its network must be the one configured."""
        state_dict, meta = read_model_file(self.source)
        model = self.cfg.model.model_dump(mode="json")
        differ = [k for k in ARCHITECTURE if meta.get(k) != model.get(k)]
        if differ:
            raise ModelError(
                f"{self.source}: trained with another train.model.{differ[0]} "
                f"({meta.get(differ[0])!r}); rerun `dvc repro train@{self.fold}` first"
            )
        return state_dict

    def begin(self) -> dict[str, Any] | None:
        """:meth:`FoldTrainer.begin`, then the pseudo-labels' counts and thresholds as run
        params (idempotent: a resumed run logs the same values again)."""
        resumed = super().begin()
        summary = self.pseudo.summary
        keys = (
            "positive_confidence",
            "negative_confidence",
            "pixel_threshold",
            "positive_min_area",
        )
        counts = ("n_test", "n_positive", "n_empty", "n_left_out")
        self.tracker.log_params({f"pseudo_labels.{k}": summary[k] for k in (*keys, *counts)})
        self.tracker.set_tags(
            {
                "finetuned_from": str(self.source),
                "pseudo_labels_by_run": str(summary.get("labelled_by_run")),
            }
        )
        return resumed

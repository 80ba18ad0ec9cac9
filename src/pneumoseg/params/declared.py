"""What each DVC stage reads from ``params.yaml`` and the keys exempt from declaration."""

from __future__ import annotations

import hashlib
import json
from typing import Any

# The threshold search's keys: thresholds runs it, evaluate cross-fits it.
THRESHOLD_SEARCH = (
    "thresholds.trials",
    "thresholds.seed",
    "thresholds.space",
    "thresholds.exhaustive",
    "thresholds.exhaustive_areas",
    "thresholds.group_by",
)

# How ensemble members are weighted: thresholds fits the weights, evaluate cross-fits the fit.
MEMBER_WEIGHTS = ("ensemble.weights", "ensemble.weight_step")

# What each DVC stage reads, besides the paths that dvc.yaml interpolates (``${data.size}`` in a
# dep or out makes DVC track that key through the path). dvc.yaml lists exactly these keys
# under each stage's ``params:``; tests/test_declarations.py runs every stage with a params
# object that records each key it reads and checks both directions against dvc.yaml.
STAGE_PARAMS: dict[str, tuple[str, ...]] = {
    "demo": ("demo.n_train", "demo.n_test", "demo.size", "demo.positive_fraction", "demo.seed"),
    "convert": (
        "data.rle_csv",
        "data.rle_dialect",
        "data.size",
        "data.clahe",
        "data.sample_submission",
        "data.max_failed_fraction",
        "data.file_timeout",
        "data.pseudonymize_ids",
    ),
    "arrays": ("arrays.sizes",),
    "split": ("split.n_folds", "split.seed"),
    "train": (
        "train.seed",
        "train.model",
        "train.optimizer",
        "train.batch_size",
        "train.nproc_per_node",
        "train.nnodes",
        "train.accumulate_steps",
        "train.grad_clip",
        "train.amp",
        "train.channels_last",
        "train.val_threshold",
        "train.overlays",
        "train.observe_heldout_every",
        "train.selection",
        "train.checkpoint",
        "train.swa",
        "train.ema",
        "train.snapshots",
        "train.grad_checkpointing",
        "train.augment",
        "train.parts",
    ),
    "oof": (
        "ensemble.members",
        "pseudo_label.folds",  # the folds whose fine-tuned model is used
        "oof.size",
        "oof.tta_hflip",
        "oof.tta_scales",
        "oof.tta_gammas",
        "oof.checkpoints",
        "oof.batch_size",
        "train.folds",
    ),
    "thresholds": (*MEMBER_WEIGHTS, *THRESHOLD_SEARCH),
    "evaluate": (
        "evaluate.bootstrap",
        "evaluate.gallery",
        *MEMBER_WEIGHTS,
        *THRESHOLD_SEARCH,
        "provenance.studies",
    ),
    "register": (
        "registry.auto_promote",
        "train.folds",
        "ensemble.members",
        "pseudo_label.folds",  # the folds whose fine-tuned model is used
        "oof.tta_hflip",
        "oof.tta_scales",
        "oof.tta_gammas",
        "oof.checkpoints",
        "oof.batch_size",
        "data.size",
        "data.clahe",
        "submit.dialect",
        "serving.max_rows",
        "serving.max_image_pixels",
    ),
    "submit": (
        "submit.dialect",
        "train.folds",
        "ensemble.members",
        "pseudo_label.folds",  # the folds whose fine-tuned model is used
        "oof.tta_hflip",
        "oof.tta_scales",
        "oof.tta_gammas",
        "oof.checkpoints",
        "oof.batch_size",
    ),
}

# The pipeline's row in MLflow reads the stages' records and their params in dvc.lock (lineage,
# like the data hash), no key of its own but its output path.
STAGE_PARAMS["result"] = ()

# The pseudo-labels of fold k: its final model predicts the test images as submit would (the
# oof section's TTA); finetune@<fold> continues that model with the train keys and its own.
STAGE_PARAMS["pseudo_label"] = (
    "pseudo_label.positive_confidence",
    "pseudo_label.negative_confidence",
    "pseudo_label.pixel_threshold",
    "pseudo_label.positive_min_area",
    "oof.tta_hflip",
    "oof.tta_scales",
    "oof.tta_gammas",
    "oof.batch_size",
)
STAGE_PARAMS["finetune"] = (*STAGE_PARAMS["train"], "pseudo_label.finetune")

# An ensemble member's stage (member@<name>-<fold>) reads what train@<fold> reads, and its own
# ensemble.members.<name> (declared in dvc.yaml through ${item.member}).
STAGE_PARAMS["member"] = STAGE_PARAMS["train"]

# Keys a stage may read without declaring them, because they cannot change its result. Each
# one is a decision, with its reason (README "Parameters" shows this table).
EXEMPT_KEYS: dict[str, str] = {
    "data.workers": "how many processes convert in parallel; the outputs are identical",
    "train.workers": "DataLoader processes; augmentation is seeded per item, so the weights are "
    "identical",
    "train.rdzv_endpoint": "where the machines of a several-machine training meet, not what "
    "they compute",
    "train.work_dir": "where the resume state of a running training lives (deleted at its end)",
    "thresholds.storage": "where the Optuna study is stored, not what it finds",
    "mlflow": "where runs and model versions are recorded, not what is computed",
    "studies": "Optuna studies run beside the pipeline; `study apply` writes their results "
    "into the keys above",
}


def read_keys(params: Any, keys: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """``{key: value}`` of dotted keys (``train.parts``), read attribute by attribute; sections
    come back as plain JSON-ready dicts."""
    out: dict[str, Any] = {}
    for key in keys:
        node = params
        for token in key.split("."):
            node = getattr(node, token)
        if hasattr(node, "model_dump"):
            node = node.model_dump(mode="json")
        elif isinstance(node, list):
            node = [v.model_dump(mode="json") if hasattr(v, "model_dump") else v for v in node]
        out[key] = node
    return out


def stage_values(params: Any, stage: str) -> dict[str, Any]:
    """The values of the keys stage ``stage`` declares (:data:`STAGE_PARAMS`)."""
    return read_keys(params, STAGE_PARAMS[stage])


def digest(values: dict[str, Any]) -> str:
    """Short sha256 of JSON-ready ``values``, stable across key order."""
    blob = json.dumps(values, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def stage_digest(params: Any, stage: str) -> str:
    """:func:`digest` of the keys the stage declares: what resume and upload compare."""
    return digest(stage_values(params, stage))

"""``pneumoseg upload --fold K``: put a fold training's local record into MLflow after the
tracking server was down while it trained: a new run when it never answered (``mlflow_run_id:
null`` in ``metrics/fold<k>.json``), the missing epochs and final record into the existing run
when it went away during the training (``mlflow_incomplete: true``).

The record is what training always writes: the per-epoch history (``plots/fold<k>/history.csv``),
the final metrics, the plots and the model files. Params must be those of the training (the
params hash is checked); the new run id goes into ``metrics/fold<k>.json`` and, in a DVC project,
``dvc commit`` records that file in ``dvc.lock`` so nothing reruns.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import subprocess
from pathlib import Path
from typing import Any

from pneumoseg.files import write_json
from pneumoseg.params import Params, flatten, stage_digest, stage_values
from pneumoseg.tracking import Tracker
from pneumoseg.training.record import log_fold_record

log = logging.getLogger(__name__)


def read_history(path: Path) -> list[dict[str, float]]:
    """``history.csv`` rows as numbers (empty cells dropped)."""
    if not path.is_file():
        raise ValueError(f"{path}: not found (the per-epoch history of the training)")
    rows = []
    with path.open(newline="") as fh:
        for i, row in enumerate(csv.DictReader(fh), start=2):
            try:
                rows.append({k: float(v) for k, v in row.items() if v not in ("", None)})
            except ValueError as exc:
                raise ValueError(f"{path}: line {i}: not a number ({exc})") from None
    return rows


def upload_fold(params: Params, fold: int, progress: bool = True) -> str | None:
    """Create the MLflow run of an untracked fold training; returns its id (None when the fold
    was tracked already)."""
    cfg = params.train
    metrics_path = Path(cfg.metrics_dir) / f"fold{fold}.json"
    if not metrics_path.is_file():
        raise ValueError(f"{metrics_path}: not found; train fold {fold} first")
    result: dict[str, Any] = json.loads(metrics_path.read_text())
    existing = result.get("mlflow_run_id")
    if existing and not result.get("mlflow_incomplete"):
        log.info("upload: fold %d is tracked already (run %s)", fold, existing)
        return None
    params_hash = stage_digest(params, "train")
    if result.get("params_hash") != params_hash:
        raise ValueError(
            f"{metrics_path}: trained with params {result.get('params_hash')}, params.yaml now "
            f"gives {params_hash}; check out the params of that training to upload it"
        )
    history = read_history(Path(cfg.plots_dir) / f"fold{fold}" / "history.csv")
    tracker = Tracker(params.mlflow)
    tags = {
        "stage": "train",
        "fold": str(fold),
        "params_hash": params_hash,
        "data_hash": str(result.get("data_hash")),
        "uploaded_after_tracking_failure": "true",
    }
    run_id = tracker.start(f"train-fold{fold}", tags, existing)  # an incomplete run: reopened
    if run_id is None:
        raise RuntimeError("MLflow is still unreachable (see the warning above); try again later")
    if existing:
        tracker.set_tags({"uploaded_after_tracking_failure": "true"})
    else:
        tracker.log_params(flatten(stage_values(params, "train")))
    tracker.log_rows(history)  # only the epochs the run does not hold
    result["mlflow_run_id"] = run_id
    result.pop("mlflow_incomplete", None)
    log_fold_record(tracker, params, fold, result, len(history), model=True)
    tracker.end("FINISHED")
    if not tracker.complete:
        raise RuntimeError("MLflow failed during the upload (see the warning above)")
    write_json(metrics_path, result)
    print(f"upload: fold {fold} -> MLflow run {run_id}; {metrics_path} records it")
    _dvc_commit(fold)
    return run_id


def _dvc_commit(fold: int) -> None:
    """Record the changed metrics file in dvc.lock (``dvc commit``) so the stage is not rerun."""
    if not Path("dvc.lock").is_file() or shutil.which("dvc") is None:
        return
    stage = f"train@{fold}"
    proc = subprocess.run(
        ["dvc", "commit", "--force", "--quiet", stage], capture_output=True, text=True
    )
    if proc.returncode:
        first = (proc.stderr or proc.stdout).strip().splitlines()[:1]
        log.warning("upload: `dvc commit %s` failed (%s); run it by hand", stage, first)
    else:
        log.info("upload: dvc.lock updated (dvc commit %s)", stage)


def run(params: Params, fold: int | None = None, progress: bool = True) -> list[str | None]:
    """CLI entry: upload ``fold`` (or every fold of ``train.folds``)."""
    folds = [fold] if fold is not None else params.train.folds
    return [upload_fold(params, f, progress) for f in folds]

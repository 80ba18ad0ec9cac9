"""Adding a fold retrains nothing already trained; the helpers that read `dvc exp show`.

Queued and temporary experiments keeping their MLflow runs in the repo's store (their stages run
in copies under ``.dvc/tmp/exps`` that are deleted afterwards) are tested with the rows they
make, in tests/test_results.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pipeline_helpers import DvcProject, cli, dvc, set_params

pytestmark = pytest.mark.slow

RUN_ID_FILES = {  # DVC metrics file -> its MLflow run id key
    "metrics/fold0.json": "mlflow_run_id",
    "metrics/fold1.json": "mlflow_run_id",
    "metrics/thresholds.json": "mlflow_run_id",
    "metrics/evaluate.json": "mlflow_run_id",
    "metrics/registered.json": "run_id",
}


def experiments(project: Path) -> dict[str, dict[str, Any]]:
    """Experiment name (and "workspace") -> {metrics file: its data}, from `dvc exp show`."""
    shown = json.loads(dvc("exp", "show", "--json", cwd=project).stdout)
    out: dict[str, dict[str, Any]] = {}
    for baseline in shown:
        revs = [baseline] + [r for e in baseline.get("experiments") or [] for r in e["revs"]]
        for rev in revs:
            metrics = ((rev.get("data") or {}).get("metrics")) or {}
            name = rev.get("name") or rev["rev"]
            out[name] = {path: m["data"] for path, m in metrics.items()}
    return out


def run_ids(metrics: dict[str, Any]) -> dict[str, str]:
    return {path: metrics[path][key] for path, key in RUN_ID_FILES.items()}


def test_adding_a_fold_leaves_the_trained_folds_up_to_date(
    dvc_project: DvcProject, tmp_path: Path
) -> None:
    project = dvc_project.copy(tmp_path / "p")
    set_params(project, {"train": {"folds": [0, 1, 2]}})
    status = json.loads(dvc("status", "--json", cwd=project).stdout)
    assert "train@0" not in status and "train@1" not in status
    assert "train@2" in status
    assert {"oof", "register", "submit"} <= set(status)  # they read train.folds
    # fold 0's record still matches the training params: upload accepts it
    metrics = project / "metrics/fold0.json"
    record = json.loads(metrics.read_text()) | {"mlflow_run_id": None}
    metrics.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    cli("-q", "upload", "--fold", "0", cwd=project)
    assert json.loads(metrics.read_text())["mlflow_run_id"]

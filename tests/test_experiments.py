"""DVC experiments keep their MLflow runs, and adding a fold retrains nothing already trained.

Real DVC (``dvc exp run --queue`` + ``dvc queue start``, ``dvc exp run --temp``) and a real
MLflow sqlite store: the queued and temporary experiments run their stages in copies of the
repo under ``.dvc/tmp/exps`` that are deleted afterwards; their runs and model versions must
be in the repo's own store, tagged with the experiment's name.
"""

from __future__ import annotations

import json
import time
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


def test_queued_and_temp_experiments_keep_their_runs_in_the_repo_store(
    dvc_project: DvcProject, tmp_path: Path
) -> None:
    project = dvc_project.copy(tmp_path / "p")
    for seed in (1, 2):  # a new threshold study each: thresholds, evaluate, register, submit
        dvc("exp", "run", "--queue", "-S", f"thresholds.seed={seed}", "-n", f"queued-{seed}",
            cwd=project)  # fmt: skip
    try:
        dvc("queue", "start", "-j", "2", cwd=project)  # two at once on one sqlite store
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            status = dvc("queue", "status", cwd=project).stdout
            if "Running" not in status and "Queued" not in status:
                break
            time.sleep(3)
        assert status.count("Success") == 2, status
    finally:
        dvc("queue", "stop", "--kill", cwd=project, check=False)
    dvc("exp", "run", "--temp", "-S", "thresholds.seed=3", "-n", "temp-3", cwd=project)

    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{project}/mlruns/mlflow.db"
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    shown = experiments(project)
    base = run_ids(shown["workspace"])
    for name in ("queued-1", "queued-2", "temp-3"):
        ids = run_ids(shown[name])
        # the folds were not retrained: the baseline's runs; everything else is new
        assert ids["metrics/fold0.json"] == base["metrics/fold0.json"]
        for path, run_id in ids.items():
            run = client.get_run(run_id)  # in the repo's store (raises if not)
            if run_id != base[path]:
                assert run.data.tags["dvc_exp_name"] == name, (path, run.data.tags)
                assert run.data.tags["dvc_exp_baseline_rev"]
        assert {ids[p] for p in RUN_ID_FILES if "fold" not in p}.isdisjoint(base.values())
        registered = shown[name]["metrics/registered.json"]
        version = client.get_model_version(registered["name"], registered["version"])
        assert version.tags["dvc_exp_name"] == name
        study = shown[name]["metrics/thresholds.json"]["study_name"]
        assert study != shown["workspace"]["metrics/thresholds.json"]["study_name"]
    assert not list((project / ".dvc/tmp/exps").rglob("mlflow.db"))  # no store in a copy


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

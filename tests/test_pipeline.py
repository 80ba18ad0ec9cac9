"""End to end: the real `dvc repro` on a tiny demo project."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from pipeline_helpers import BIN, DvcProject, make_project, repro, run

pytestmark = pytest.mark.slow


def test_dvc_repro_end_to_end(dvc_project: DvcProject, tmp_path: Path) -> None:
    assert dvc_project.ran == {
        "demo",
        "convert",
        "arrays",
        "split",
        "train@0",
        "train@1",
        "oof",
        "thresholds",
        "evaluate",
        "register",
        "submit",
        "result",
    }
    project = dvc_project.copy(tmp_path / "proj")
    for path in (
        "data/processed/manifest.csv",
        "data/folds.csv",
        "models/folds/fold0/model.pt",
        "models/folds/fold1/model.pt",
        "metrics/fold0.json",
        "plots/fold1/learning_curves.png",
        "models/postprocess.json",
        "metrics/thresholds.json",
        "metrics/evaluate.json",
        "metrics/registered.json",
        "submission/submission.csv",
    ):
        assert (project / path).is_file(), path
    # dvc.lock -> metrics file -> MLflow run, for every stage that makes a run
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlruns/mlflow.db")
    for fold in (0, 1):
        run_id = json.loads((project / f"metrics/fold{fold}.json").read_text())["mlflow_run_id"]
        assert client.get_run(run_id).data.tags["fold"] == str(fold)
    for stage, key in (("thresholds", "mlflow_run_id"), ("evaluate", "mlflow_run_id")):
        run_id = json.loads((project / f"metrics/{stage}.json").read_text())[key]
        assert client.get_run(run_id).data.tags["stage"] == stage
    registered = json.loads((project / "metrics/registered.json").read_text())
    assert client.get_run(registered["run_id"]).data.tags["stage"] == "register"
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert "train@0" in lock["stages"]
    # each fold run's "Datasets used" carry DVC's md5 of the data and folds it trained on
    md5 = {s: lock["stages"][s]["outs"][0]["md5"] for s in ("convert", "split")}
    for fold in (0, 1):
        run_id = json.loads((project / f"metrics/fold{fold}.json").read_text())["mlflow_run_id"]
        inputs = client.get_run(run_id).inputs.dataset_inputs
        assert {d.dataset.name: d.dataset.digest for d in inputs} == {
            "processed": md5["convert"],
            "folds": md5["split"],
        }

    # `dvc plots show`: every plot of dvc.yaml loads; one chart overlays both folds' curves
    shown = json.loads(run([str(BIN / "dvc"), "plots", "show", "--json"], cwd=project).stdout)
    assert "errors" not in shown, shown.get("errors")
    (chart,) = shown["data"]["train loss by fold"]
    values = chart["content"]["data"]["values"]
    assert {v["fold"] for v in values} == {"0", "1"} and all(v["train_loss"] for v in values)
    assert chart["content"]["encoding"]["color"]["field"] == "fold"

    assert repro(project) == set()  # nothing changed: nothing runs

    # A fold trained while MLflow was down: `pneumoseg upload` tracks it; dvc.lock stays true.
    metrics0 = project / "metrics/fold0.json"
    record = json.loads(metrics0.read_text()) | {"mlflow_run_id": None}
    metrics0.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    run([sys.executable, "-m", "pneumoseg", "-q", "upload", "--fold", "0"], cwd=project)
    uploaded = json.loads(metrics0.read_text())["mlflow_run_id"]
    assert client.get_run(uploaded).data.tags["uploaded_after_tracking_failure"] == "true"
    assert repro(project) == set()

    # what a change would rerun, from `dvc status` (the stages whose own deps changed)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["parts"][0]["lr"] = 0.002
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert changed(project) == {"train@0", "train@1"}  # a train.* key: training only

    params["data"]["size"] = 48
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert changed(project) == {"convert", "train@0", "train@1", "register"}  # never demo


def changed(project: Path) -> set[str]:
    """The stages `dvc status` reports as changed."""
    out = run([str(BIN / "dvc"), "status", "--json"], cwd=project).stdout
    return set(json.loads(out))


def test_invalid_params_stop_before_any_work(tmp_path: Path) -> None:
    project = make_project(tmp_path / "bad", {"train": {"parts": [{"lr": -1}]}})
    proc = run([str(BIN / "dvc"), "repro"], cwd=project, check=False)
    assert proc.returncode != 0
    assert "params.yaml: train.parts[0].lr: must be > 0" in proc.stdout + proc.stderr
    assert not (project / "data/raw/demo").exists()

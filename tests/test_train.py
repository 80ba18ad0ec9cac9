"""Training: resume equivalence after kill -9, parts hand-over, tracking, failures."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from pipeline_helpers import env, pneumoseg, prepared_data

pytestmark = pytest.mark.slow

FOUR_EPOCHS = {
    "train": {
        "parts": [
            {"size": 64, "epochs": 2, "lr": 0.003, "loss": {"bce": 1, "dice": 1}},
            {
                "size": 96,
                "epochs": 2,
                "lr": 0.001,
                "scheduler": {"name": "constant"},
                "loss": {"bce": 3, "focal": 4, "dice": 1},
                "sample_rate": {"start": 0.6, "end": 0.3, "shape": "step", "steps": 2},
            },
        ]
    }
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepared_data(tmp_path_factory.mktemp("train") / "base", FOUR_EPOCHS)


def clone(base: Path, dest: Path) -> Path:
    shutil.copytree(base, dest)
    return dest


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def mlflow_runs(project: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("pneumoseg")
    return client.search_runs([exp.experiment_id]) if exp else []


def test_train_records_everything_and_parts_hand_over(data_dir: Path, tmp_path: Path) -> None:
    project = clone(data_dir, tmp_path / "p")
    pneumoseg("-q", "train", "--fold", "0", cwd=project)
    result = json.loads((project / "metrics/fold0.json").read_text())
    history = (project / "plots/fold0/history.csv").read_text().splitlines()
    header = history[0].split(",")
    rows = [dict(zip(header, line.split(","), strict=True)) for line in history[1:]]
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]  # global epochs across parts
    assert [int(r["size"]) for r in rows] == [64, 64, 96, 96]
    assert [int(r["part"]) for r in rows] == [0, 0, 1, 1]
    for key in ("train_bce", "train_dice", "val_focal", "val_kaggle_dice", "val_empty_acc"):
        assert key in header
    assert "train_focal" not in rows[0] or rows[0]["train_focal"] == ""  # part 0 has no focal
    # the model file rebuilds itself and is loadable with weights_only
    from pneumoseg.models import load_model_file

    model, meta = load_model_file(project / "models/folds/fold0/model.pt")
    assert meta["size"] == 96 and meta["fold"] == 0 and meta["mlflow_run_id"]
    ckpts = json.loads((project / "models/folds/fold0/checkpoints.json").read_text())
    assert {c["part"] for c in ckpts} == {0, 1} and len(ckpts) <= 4
    for c in ckpts:
        assert (project / "models/folds/fold0/checkpoints" / c["path"]).is_file()
        assert c["path"] == f"part{c['part']}-epoch{c['epoch']:03d}.pt"
    mode = yaml.safe_load((project / "params.yaml").read_text())["train"]["checkpoint"]["mode"]
    part1 = [c for c in ckpts if c["part"] == 1]
    key = lambda c: (c["score"], -c["epoch"])  # noqa: E731
    best = max(part1, key=key) if mode == "max" else min(part1, key=key)
    final = state_dict(project / "models/folds/fold0/model.pt")
    chosen = state_dict(project / "models/folds/fold0/checkpoints" / best["path"])
    assert all(torch.equal(final[k], chosen[k]) for k in final)
    # MLflow: one run with tags, params, per-epoch histories and artifacts
    (run,) = mlflow_runs(project)
    assert run.info.run_id == result["mlflow_run_id"]
    tags = run.data.tags
    assert tags["stage"] == "train" and tags["fold"] == "0"
    assert {"git_commit", "git_dirty", "data_hash", "params_hash"} <= set(tags)
    assert run.data.params["train.parts.1.loss.focal"] == "4.0"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlruns/mlflow.db")
    hist = client.get_metric_history(run.info.run_id, "val_kaggle_dice")
    assert sorted(m.step for m in hist) == [1, 2, 3, 4]
    assert {m.key for m in [*client.get_metric_history(run.info.run_id, "sample_rate")]} == {
        "sample_rate"
    }
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"plots", "model", "params.yaml", "environment"} <= artifacts
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/learning_curves.png", "plots/val_overlays.png"} <= plots
    assert not (project / "checkpoints/fold0").exists()  # resume state cleaned up


def _last_epoch(state: Path) -> int:
    try:
        blob = torch.load(state, map_location="cpu", weights_only=False)
    except Exception:
        return -1
    run = blob["run"]
    return len(run["history"])


def test_kill_and_resume_gives_identical_weights(data_dir: Path, tmp_path: Path) -> None:
    reference = clone(data_dir, tmp_path / "ref")
    pneumoseg("-q", "train", "--fold", "1", cwd=reference)

    project = clone(data_dir, tmp_path / "killed")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pneumoseg", "-q", "train", "--fold", "1"],
        cwd=project,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = project / "checkpoints/fold1/last.pt"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if state.exists() and _last_epoch(state) >= 2:  # kill inside part 1 (epoch 3)
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (project / "models/folds/fold1/model.pt").exists()
    killed_run = torch.load(state, map_location="cpu", weights_only=False)["run"]["mlflow_run_id"]

    pneumoseg("-q", "train", "--fold", "1", cwd=project)
    ref = state_dict(reference / "models/folds/fold1/model.pt")
    got = state_dict(project / "models/folds/fold1/model.pt")
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    ref_metrics = json.loads((reference / "metrics/fold1.json").read_text())
    got_metrics = json.loads((project / "metrics/fold1.json").read_text())
    assert got_metrics["final"] == ref_metrics["final"]
    assert got_metrics["mlflow_run_id"] == killed_run  # the same MLflow run was continued
    (run,) = mlflow_runs(project)
    assert run.info.status == "FINISHED"


def test_tracking_failure_does_not_stop_training(data_dir: Path, tmp_path: Path) -> None:
    project = clone(data_dir, tmp_path / "offline")
    e = env() | {
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:9",  # nothing listens there
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "2",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "pneumoseg", "-q", "train", "--fold", "0"],
        cwd=project,
        env=e,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "MLflow start failed" in proc.stderr
    assert (project / "models/folds/fold0/model.pt").is_file()
    result = json.loads((project / "metrics/fold0.json").read_text())
    assert result["mlflow_run_id"] is None
    assert len((project / "plots/fold0/history.csv").read_text().splitlines()) == 5
    assert "pneumoseg upload --fold K" in proc.stderr

    # Once the store is back, the local record becomes an MLflow run, without retraining.
    pneumoseg("-q", "upload", "--fold", "0", cwd=project)
    result = json.loads((project / "metrics/fold0.json").read_text())
    runs = mlflow_runs(project)
    assert [r.info.run_id for r in runs] == [result["mlflow_run_id"]]
    run = runs[0]
    assert run.data.tags["uploaded_after_tracking_failure"] == "true"
    assert run.data.params["train.parts.0.epochs"] == "2"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlruns/mlflow.db")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [1, 2, 3, 4]
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert "model/model.pt" in arts
    # a second upload does nothing
    pneumoseg("-q", "upload", "--fold", "0", cwd=project)
    assert len(mlflow_runs(project)) == 1


def test_bad_monitor_and_bad_weights_fail_clearly(data_dir: Path, tmp_path: Path) -> None:
    project = clone(data_dir, tmp_path / "bad")
    params = project / "params.yaml"
    text = params.read_text()
    params.write_text(text.replace("encoder_weights: null", "encoder_weights: /no/such.pth"))
    proc = pneumoseg("train", "--fold", "0", cwd=project, check=False)
    assert proc.returncode == 1
    assert "model.encoder_weights" in proc.stderr and "/no/such.pth" in proc.stderr

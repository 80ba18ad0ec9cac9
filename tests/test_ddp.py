"""DistributedDataParallel: two CPU processes (gloo) started by torchrun train one fold."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from pipeline_helpers import prepared_data, run

pytestmark = pytest.mark.slow

ONE_EPOCH = {
    "train": {
        "parts": [{"size": 64, "epochs": 1, "lr": 0.003, "loss": {"bce": 1, "dice": 1}}],
    }
}


def test_torchrun_two_processes_train_one_fold(tmp_path: Path) -> None:
    project = prepared_data(tmp_path / "p", ONE_EPOCH)
    proc = run(
        [
            *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
            *("--nproc_per_node", "2", "-m", "pneumoseg", "-q", "train", "--fold", "0"),
        ],
        cwd=project,
        timeout=240,
    )
    # rank 0 alone logs, writes files and tracks; the loss covers both ranks' shares
    assert proc.stderr.count("fold 0 epoch 1/1") == 1, proc.stderr[-2000:]
    assert sorted(p.name for p in (project / "models/folds").iterdir()) == ["fold0"]
    assert (project / "models/folds/fold0/model.pt").is_file()
    assert sorted(p.name for p in (project / "metrics").iterdir()) == ["fold0.json"]
    result = json.loads((project / "metrics/fold0.json").read_text())
    assert result["epochs"] == 1 and result["mlflow_run_id"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("pneumoseg")
    (only,) = client.search_runs([exp.experiment_id])
    assert only.info.run_id == result["mlflow_run_id"]
    assert only.info.status == "FINISHED" and only.data.tags["fold"] == "0"
    assert "train_loss" in only.data.metrics
    assert not (project / "checkpoints/fold0").exists()  # resume state cleaned up once

"""DistributedDataParallel: two CPU processes (gloo) started by torchrun train one fold."""

from __future__ import annotations

import csv
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from pipeline_helpers import Pipeline, run, set_params

pytestmark = pytest.mark.slow

ONE_EPOCH = {
    "train": {
        "parts": [{"size": 64, "epochs": 1, "lr": 0.003, "loss": {"bce": 1, "dice": 1}}],
    }
}


def test_torchrun_two_processes_train_one_fold(tiny_pipeline: Pipeline, tmp_path: Path) -> None:
    project = tiny_pipeline.copy(tmp_path / "p")
    for name in ("mlruns", "models", "metrics", "plots"):
        shutil.rmtree(project / name, ignore_errors=True)
    set_params(project, ONE_EPOCH)
    proc = run(
        [
            *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
            *("--nproc_per_node", "2", "-m", "pneumoseg", "-q", "train", "--fold", "0"),
        ],
        cwd=project,
        timeout=240,
    )
    # rank 0 alone logs, writes files and tracks
    assert proc.stderr.count("fold 0 epoch 1/1") == 1, proc.stderr[-2000:]
    assert sorted(p.name for p in (project / "models/folds").iterdir()) == ["fold0"]
    assert (project / "models/folds/fold0/model.pt").is_file()
    assert sorted(p.name for p in (project / "metrics").iterdir()) == ["fold0.json"]
    result = json.loads((project / "metrics/fold0.json").read_text())
    assert result["epochs"] == 1 and result["mlflow_run_id"]
    # the epoch's loss covers both ranks' shares: every image of the epoch's sample (padded
    # to a multiple of the two ranks), not one rank's half
    from pneumoseg.artifacts import read_folds
    from pneumoseg.folds import FoldImages
    from pneumoseg.params import load_params
    from pneumoseg.sampling import epoch_sample, sample_rate_at

    cfg = load_params(project / "params.yaml").train
    folds = read_folds(project / "data/folds.csv")
    sel = cfg.selection
    images = FoldImages.of(folds, 0, sel.mode, sel.inner_fraction, cfg.seed)
    positive = np.array([folds[i][1] == 1 for i in images.train])
    rate = sample_rate_at(cfg.parts[0].sample_rate, 0, 1)
    sample = epoch_sample(positive, rate, cfg.seed, 1)
    with (project / "plots/fold0/history.csv").open(newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert int(row["train_items"]) == 2 * math.ceil(len(sample) / 2) > len(sample) / 2
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("pneumoseg")
    (only,) = client.search_runs([exp.experiment_id])
    assert only.info.run_id == result["mlflow_run_id"]
    assert only.info.status == "FINISHED" and only.data.tags["fold"] == "0"
    assert only.data.metrics["train_items"] == int(row["train_items"])
    assert not (project / "checkpoints/fold0").exists()  # resume state cleaned up once

"""DistributedDataParallel: two CPU processes (gloo) started by torchrun train one fold.

``train.nproc_per_node: 2`` makes ``pneumoseg train`` exec the command a user on a GPU machine
types (``python -m torch.distributed.run --standalone --nproc_per_node=2 -m pneumoseg ...``,
:func:`pneumoseg.training.launch.torchrun_command`), so the DVC stage's test covers a torchrun
launch by hand too."""

from __future__ import annotations

import csv
import json
import math
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from pipeline_helpers import ROOT, DvcProject, dvc, env, run, set_params

pytestmark = pytest.mark.slow


def epoch_sample_size(project: Path, fold: int) -> int:
    """Images in epoch 1's sample of ``fold`` (all ranks, unpadded), computed independently."""
    from pneumoseg.artifacts import read_folds
    from pneumoseg.folds import FoldImages
    from pneumoseg.params import load_params
    from pneumoseg.sampling import epoch_sample, sample_rate_at

    cfg = load_params(project / "params.yaml").train
    folds = read_folds(project / "data/folds.csv")
    sel = cfg.selection
    images = FoldImages.of(folds, fold, sel.mode, sel.inner_fraction, cfg.seed)
    positive = np.array([folds[i][1] == 1 for i in images.train])
    rate = sample_rate_at(cfg.parts[0].sample_rate, 0, 1)
    return len(epoch_sample(positive, rate, cfg.seed + 1000 * fold, 1))


def test_nproc_per_node_runs_the_dvc_stage_in_two_ranks(
    dvc_project: DvcProject, tmp_path: Path
) -> None:
    """`train.nproc_per_node: 2` and a plain `dvc repro`: the unchanged stage command starts
    two gloo ranks; the fold gets one MLflow run whose loss counts both ranks' items; a
    classification head that a part leaves without gradients (loss.cls 0) does not stop DDP."""
    project = dvc_project.copy(tmp_path / "p")
    before = json.loads((project / "metrics/fold0.json").read_text())["mlflow_run_id"]
    part = {"size": 64, "epochs": 1, "lr": 0.003, "loss": {"bce": 1, "dice": 1}}
    head_trained = {**part, "loss": {"bce": 1, "dice": 1, "cls": 1}}
    # batch 1: several steps per rank, so a step after one without head gradients comes
    train = {"nproc_per_node": 2, "batch_size": 1, "model": {"classification_head": True}}
    set_params(project, {"train": {**train, "parts": [head_trained, part]}})
    reproduced = dvc("repro", "train@0", cwd=project)
    assert "Running stage 'train@0'" in reproduced.stdout
    # rank 0 alone logs, writes files and tracks
    printed = reproduced.stdout + reproduced.stderr
    assert printed.count("fold 0 epoch 2/2") == 1, printed[-2000:]
    assert "running under torchrun" in printed
    assert not (project / "checkpoints/fold0").exists()  # resume state cleaned up once
    result = json.loads((project / "metrics/fold0.json").read_text())
    assert result["epochs"] == 2
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("pneumoseg-stages")
    runs = client.search_runs([exp.experiment_id], "tags.fold = '0'")
    (new,) = [r for r in runs if r.info.run_id != before]  # one run for the two ranks
    assert new.info.run_id == result["mlflow_run_id"] and new.info.status == "FINISHED"
    assert new.data.params["train.nproc_per_node"] == "2"
    with (project / "plots/fold0/history.csv").open(newline="") as fh:
        row, _ = list(csv.DictReader(fh))  # part 0 (head trained), part 1 (head unused)
    n = epoch_sample_size(project, 0)
    assert int(row["train_items"]) == 2 * math.ceil(n / 2) > n / 2  # both ranks' items
    items = client.get_metric_history(new.info.run_id, "train_items")
    assert [m.value for m in items if m.step == 1] == [int(row["train_items"])]
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock["stages"]["train@0"]["cmd"] == "pneumoseg -q train --fold 0"
    two_machines_train_like_one(project, tmp_path / "nodes")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def two_machines_train_like_one(one_machine: Path, project: Path) -> None:
    """``train.nnodes: 2``: two "machines" (two torchrun launchers, one rank each, the same
    command in the same shared folder) meet at a c10d rendezvous on 127.0.0.1 and train the
    fold bit for bit as two ranks on one machine did, with one MLflow run."""
    shutil.copytree(one_machine, project, symlinks=True)
    before = json.loads((project / "metrics/fold0.json").read_text())["mlflow_run_id"]
    endpoint = f"127.0.0.1:{free_port()}"
    set_params(project, {"train": {"nproc_per_node": 1, "nnodes": 2, "rdzv_endpoint": endpoint}})
    command = [sys.executable, "-m", "pneumoseg", "-q", "train", "--fold", "0"]
    machines = [
        subprocess.Popen(command, cwd=project, env=env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]  # fmt: skip
    printed = [m.communicate(timeout=600)[0] for m in machines]
    assert [m.returncode for m in machines] == [0, 0], "\n".join(p[-2000:] for p in printed)
    assert sum("meeting the other machines at " + endpoint in p for p in printed) == 2
    assert sum(p.count("fold 0 epoch 2/2") for p in printed) == 1  # global rank 0 alone logs
    result = json.loads((project / "metrics/fold0.json").read_text())
    assert result["mlflow_run_id"] != before
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlruns/mlflow.db")
    run_ = client.get_run(result["mlflow_run_id"])
    assert run_.data.params["train.nnodes"] == "2" and run_.info.status == "FINISHED"
    import torch

    def weights(root: Path) -> dict:
        return torch.load(root / "models/folds/fold0/model.pt", weights_only=True)["state_dict"]

    mine, theirs = weights(project), weights(one_machine)
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


GATHER = """
import os, sys
import numpy as np
from pneumoseg.training.distributed import Dist, shutdown
dist = Dist.from_env()
ids = [f"img{i}" for i in range(7)]
mine = dist.shard(ids)
rows = np.array([[int(i[3:]), dist.rank, 0, 0] for i in mine], dtype=np.int64)
gathered = dist.gather_rows(rows)
assert [f"img{r}" for r in gathered[:, 0]] == ids, gathered
assert gathered[:, 1].tolist() == [i % 2 for i in range(7)], gathered  # each scored once
with open(f"rank{dist.rank}.txt", "w") as fh:  # one file per rank: stdout would interleave
    fh.write(f"rank {dist.rank} scored {len(mine)} of {len(ids)}")
dist.barrier()
shutdown()  # leave the group together, as training does (a rank gone first aborts the other)
"""


def test_validation_is_split_across_ranks_and_gathered_in_order(tmp_path: Path) -> None:
    script = tmp_path / "gather.py"
    script.write_text(GATHER)
    run(
        [
            *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
            *("--nproc_per_node", "2", str(script)),
        ],
        cwd=tmp_path,
        timeout=120,
    )
    assert (tmp_path / "rank0.txt").read_text() == "rank 0 scored 4 of 7"
    assert (tmp_path / "rank1.txt").read_text() == "rank 1 scored 3 of 7"


def test_train_execs_torchrun_once_and_a_rank_trains_in_place(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The launching process replaces itself by torchrun with the same arguments (it cannot
    report to coverage after the exec, so this checks the decision itself); a rank (WORLD_SIZE
    set by torchrun) and ``nproc_per_node: 1`` train where they are."""
    import os

    from pneumoseg.params import load_params
    from pneumoseg.training import launch

    execs: list[list[str]] = []
    monkeypatch.setattr(os, "execv", lambda path, args: execs.append([path, *args]))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    params = load_params(ROOT / "params.yaml")
    two = params.model_copy(update={"train": params.train.model_copy(update={"nproc_per_node": 2})})
    argv = ["-q", "train", "--fold", "1"]
    launch.torchrun_if_asked(params, argv)  # the shipped nproc_per_node: 1
    assert execs == []
    launch.torchrun_if_asked(two, argv)
    assert execs == [[sys.executable, sys.executable, "-m", "torch.distributed.run",
                      "--standalone", "--nproc_per_node=2", "-m", "pneumoseg", *argv]]  # fmt: skip
    monkeypatch.setenv("WORLD_SIZE", "2")  # inside a rank: no second launch
    launch.torchrun_if_asked(two, argv)
    assert len(execs) == 1
    monkeypatch.delenv("WORLD_SIZE")
    nodes = {"nnodes": 3, "rdzv_endpoint": "node0.cluster:29400"}
    machines = params.model_copy(update={"train": params.train.model_copy(update=nodes)})
    launch.torchrun_if_asked(machines, argv)
    assert execs[1] == [sys.executable, sys.executable, "-m", "torch.distributed.run",
                        "--nnodes=3", "--rdzv_backend=c10d",
                        "--rdzv_endpoint=node0.cluster:29400",
                        "--rdzv_id=pneumoseg-train-fold-1",  # the same on every machine
                        "--nproc_per_node=1", "-m", "pneumoseg", *argv]  # fmt: skip

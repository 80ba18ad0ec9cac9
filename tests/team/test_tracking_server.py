"""The team's tracking server: ``mlflow server`` on PostgreSQL with its artifacts in an S3
bucket (moto's server), on 127.0.0.1, one worker. ``dvc repro`` with
``MLFLOW_TRACKING_URI=http://...`` trains, evaluates and registers through it; the fold runs,
their metric histories and artifacts land in PostgreSQL and the bucket; ``models promote`` and
``predict --model models:/pneumoseg@champion`` work through the server; no password leaks; the
queued experiment then travels to a fresh clone through git and the S3 remote. And
bench/team.py runs on its smallest input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from engines import S3, Postgres, free_port
from faults.test_tracking_outage import complete, train_with_outage
from pipeline_helpers import (
    BIN,
    TWO_PART_TRAINING,
    DvcProject,
    env,
    git_commit,
    http_server,
    make_project,
    run_queue,
    set_params,
)
from test_bench import RATIO, bench
from test_experiments import experiments
from test_results import check_row, shown_results, ui_rows

from .conftest import SECRET
from .test_dvc_remote import add_remote, experiment_travels

PG_PASSWORD = "pg-canary-Passw0rd-7c2e"


@pytest.fixture(scope="module")
def tracking_server(
    postgres: Postgres, s3: S3, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The command a team runs (README "Scale-out"), on a free port."""
    db = postgres.create_database("mlflow", "mlflow", PG_PASSWORD)
    backend = db.replace("postgresql://", "postgresql+psycopg://", 1)
    port = free_port()
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", backend,
           "--artifacts-destination", f"s3://{s3.bucket}/mlflow"]  # fmt: skip
    log = tmp_path_factory.mktemp("mlflow-team") / "server.log"
    with http_server(cmd, port, log, extra_env=s3.env()) as (url, _):
        yield url
    assert PG_PASSWORD not in log.read_text() and SECRET not in log.read_text()


def through(server: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """A command with ``MLFLOW_TRACKING_URI`` set to the server (the only setting users add)."""
    proc = subprocess.run(
        list(args), cwd=cwd, env=env() | {"MLFLOW_TRACKING_URI": server},
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, f"{args} exited {proc.returncode}\n{proc.stderr[-3000:]}"
    for secret in (PG_PASSWORD, SECRET):
        assert secret not in proc.stdout + proc.stderr
    return proc


def test_dvc_repro_tracks_and_registers_through_the_server(
    tracking_server: str, postgres: Postgres, s3: S3, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    project = make_project(tmp_path / "p")
    git_commit(project, "init")
    through(tracking_server, str(BIN / "dvc"), "repro", cwd=project)
    assert not (project / "mlruns").exists()  # nothing went to a local store

    client = MlflowClient(tracking_uri=tracking_server, registry_uri=tracking_server)
    experiment = client.get_experiment_by_name("pneumoseg-stages")
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # the server's bucket
    folds = client.search_runs([experiment.experiment_id], "tags.stage = 'train'")
    assert sorted(r.data.tags["fold"] for r in folds) == ["0", "1"]
    for run in folds:
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "val_loss")
        assert [m.step for m in history] == [1, 2]  # every epoch, once
    keys = s3.keys("mlflow/")
    assert any(k.endswith("plots/learning_curves.png") for k in keys)
    assert sum(k.endswith("model.pt") for k in keys) >= 2  # fold models and the package
    version = client.get_model_version_by_alias("pneumoseg", "challenger")
    assert version.version == "1"
    for run in client.search_runs([experiment.experiment_id]):
        record = str(run.data.params) + str(run.data.tags)
        assert PG_PASSWORD not in record and SECRET not in record
    bucket = s3.client()  # every row the server wrote and every object in the bucket
    stored = {k: bucket.get_object(Bucket=s3.bucket, Key=k)["Body"].read() for k in keys}
    stored["the mlflow database"] = postgres.dump("mlflow")
    assert b"val_loss" in stored["the mlflow database"]
    for secret in (PG_PASSWORD, SECRET):
        assert not [k for k, data in stored.items() if secret.encode() in data]

    # one row per pipeline result on the server: the repro and a threshold-only experiment,
    # queued (`dvc queue start`), each stage run tagged with its experiment (two experiments at
    # once on one store: tests/test_results.py)
    add_remote(project, s3)  # the team's S3 remote (credentials in .dvc/config.local)
    git_commit(project, "dvc repro")
    dvc = str(BIN / "dvc")
    through(tracking_server, dvc, "exp", "run", "--queue", "-S", "thresholds.seed=3",
            "-n", "server-1", cwd=project)  # fmt: skip
    printed = run_queue(project, ("server-1",), {"MLFLOW_TRACKING_URI": tracking_server})
    assert "Running stage 'thresholds'" in printed  # the experiment's log was read
    assert PG_PASSWORD not in printed and SECRET not in printed
    rows = ui_rows(client)
    assert len(rows) == 2
    shown = shown_results(project)
    by_name = {r.data.tags.get("dvc_exp_name", "baseline"): r for r in rows}
    for name, row in by_name.items():
        check_row(client, row, shown[name])
    files = experiments(project)
    only = by_name["server-1"]
    assert only.data.tags["run.train-fold0"] == by_name["baseline"].data.tags["run.train-fold0"]
    assert only.data.params["thresholds.seed"] == "3"
    for path, key in (("metrics/thresholds.json", "mlflow_run_id"),
                      ("metrics/evaluate.json", "mlflow_run_id"),
                      ("metrics/registered.json", "run_id")):  # fmt: skip
        run = client.get_run(files["server-1"][path][key])  # on the server (raises if not)
        assert run.data.tags["dvc_exp_name"] == "server-1"

    pneumoseg = [sys.executable, "-m", "pneumoseg"]
    through(tracking_server, *pneumoseg, "models", "promote", "1", cwd=project)
    dicom = next((project / "data/raw/demo").rglob("*.dcm"))
    champion = ["--model", "models:/pneumoseg@champion"]
    through(tracking_server, *pneumoseg, "-q", "predict", *champion, "--input", str(dicom),
            "--out", "pred", cwd=project)  # fmt: skip
    assert (project / "pred/predictions.csv").read_text().count("\n") == 2
    assert '"version": "1"' in (project / "pred/model.json").read_text()
    # an experiment travels to a fresh clone through a git remote and the S3 remote
    experiment_travels(project, "server-1", s3, tmp_path)


def test_the_server_dies_mid_training_and_comes_back(
    postgres: Postgres, s3: S3, tracking_server: str, dvc_project: DvcProject, tmp_path: Path
) -> None:
    """kill -9 of the server after epoch 1, a new server process on the same port, database
    and bucket after epoch 2: training completes and its run is complete (through the
    tracker's reconnect and backfill, or `pneumoseg upload` when the server was back too late
    for the final record)."""
    project = dvc_project.copy(tmp_path / "p")
    for name in ("mlruns", "checkpoints", "models", "metrics", "plots"):
        shutil.rmtree(project / name, ignore_errors=True)
    set_params(project, TWO_PART_TRAINING)
    port = free_port()
    backend = f"postgresql+psycopg://mlflow:{PG_PASSWORD}@127.0.0.1:{postgres.port}/mlflow"
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", backend,
           "--artifacts-destination", f"s3://{s3.bucket}/mlflow"]  # fmt: skip
    flag, stop = tmp_path / "server-down", threading.Event()
    servers: list[Any] = []

    def start() -> int:
        server = http_server(cmd, port, tmp_path / f"server{len(servers)}.log", extra_env=s3.env())
        servers.append(server)
        return server.__enter__()[1]

    def follow(pid: int) -> None:  # the flag file that tests/outage_at.py sets and clears
        while not stop.is_set():
            if flag.exists() and pid:
                os.killpg(pid, signal.SIGKILL)  # the server dies
                servers[-1].__exit__(None, None, None)
                pid = 0
            elif not flag.exists() and not pid:
                pid = start()  # a new server process, same port, database and bucket
            time.sleep(0.1)

    watcher = threading.Thread(target=follow, args=(start(),), daemon=True)
    watcher.start()
    url = f"http://127.0.0.1:{port}"
    try:
        trained = train_with_outage(project, url, flag, down=1, up=2)
        assert trained.returncode == 0, trained.stderr[-3000:]
        deadline = time.monotonic() + 120
        while flag.exists() or len(servers) < 2:  # the new server is up
            assert time.monotonic() < deadline
            time.sleep(0.5)
        result = json.loads((project / "metrics/fold0.json").read_text())
        if result.get("mlflow_incomplete"):
            through(url, sys.executable, "-m", "pneumoseg", "-q", "upload", "--fold", "0",
                    cwd=project)  # fmt: skip
            result = json.loads((project / "metrics/fold0.json").read_text())
        assert "mlflow_incomplete" not in result
        assert complete(url, result["mlflow_run_id"])
    finally:
        stop.set()
        watcher.join(timeout=30)
        servers[-1].__exit__(None, None, None)


def test_the_team_bench_runs(dvc_project: DvcProject, tmp_path: Path) -> None:
    """bench/team.py on its smallest input (see tests/test_bench.py): tracking through an
    MLflow server on PostgreSQL + S3 and a DVC remote on S3, each against a bare client."""
    project = dvc_project.copy(tmp_path / "p")
    out = bench("team.py", "--epochs", "3", "--project", str(project))
    assert "tracker / bare client on the server:" in out and RATIO.search(out), out[-2000:]
    assert "dvc push" in out, out[-2000:]

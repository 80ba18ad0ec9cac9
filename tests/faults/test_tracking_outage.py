"""Tracking outage: a real ``mlflow server`` behind a TCP proxy that the training's own
end-of-epoch hook (tests/outage_at.py) cuts and restores, so the outage starts and ends at known
epochs. Training completes either way; the run is completed by training itself when the store
comes back, or by ``pneumoseg upload`` when it does not."""

from __future__ import annotations

import json
import select
import shutil
import socket
import socketserver
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from engines import free_port
from pipeline_helpers import (
    BIN,
    TWO_PART_TRAINING,
    Pipeline,
    env,
    http_server,
    set_params,
)

pytestmark = [pytest.mark.slow, pytest.mark.faults]

Record = Callable[[str, str, str, bool], None]
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server (sqlite backend, served artifacts) on 127.0.0.1."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
           "--artifacts-destination", str(root / "artifacts")]  # fmt: skip
    with http_server(cmd, port, root / "server.log") as (url, _):
        yield url


class Proxy(socketserver.ThreadingTCPServer):
    """Forwards to the server while ``flag`` does not exist; with it, refuses new connections
    and cuts open ones (the store is unreachable)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, upstream: int, flag: Path) -> None:
        self.upstream, self.flag = upstream, flag
        super().__init__(("127.0.0.1", 0), ProxyHandler)


class ProxyHandler(socketserver.BaseRequestHandler):
    server: Proxy

    def handle(self) -> None:
        if self.server.flag.exists():
            return
        with socket.create_connection(("127.0.0.1", self.server.upstream)) as up:
            peers = {self.request: up, up: self.request}
            while not self.server.flag.exists():
                ready, _, _ = select.select(list(peers), [], [], 0.1)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    peers[sock].sendall(data)


@pytest.fixture
def store(server: str, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(URL of the proxied store, the flag file that takes it down)."""
    flag = tmp_path / "store-down"
    proxy = Proxy(int(server.rsplit(":", 1)[1]), flag)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{proxy.server_address[1]}", flag
    proxy.shutdown()
    proxy.server_close()


def train_with_outage(
    project: Path, url: str, flag: Path, down: int, up: int
) -> subprocess.CompletedProcess:
    e = env() | {"MLFLOW_TRACKING_URI": url, "PNEUMOSEG_OUTAGE_FLAG": str(flag)}
    return subprocess.run(
        [sys.executable, str(HERE.parent / "outage_at.py"), str(down), str(up), "-q", "train",
         "--fold", "0"],
        cwd=project, env=e, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def run_ids(url: str) -> list[str]:
    """The ids of the runs in the store's ``pneumoseg`` experiment."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=url)
    exp = client.get_experiment_by_name("pneumoseg-stages")
    return [r.info.run_id for r in client.search_runs([exp.experiment_id])] if exp else []


def complete(url: str, run_id: str) -> bool:
    """The run holds each of the 4 epochs once, its params, final metrics and model file."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=url)
    run = client.get_run(run_id)
    steps = [m.step for m in client.get_metric_history(run_id, "train_loss")]
    artifacts = {a.path for a in client.list_artifacts(run_id, "model")}
    return (
        sorted(steps) == [1, 2, 3, 4]
        and run.info.status == "FINISHED"
        and run.data.params.get("train.parts.0.epochs") == "2"
        and "heldout_kaggle_dice" in run.data.metrics
        and "model/model.pt" in artifacts
    )


@pytest.fixture
def project(tiny_pipeline: Pipeline, tmp_path: Path) -> Path:
    project = tiny_pipeline.copy(tmp_path / "p")
    for name in ("mlruns", "checkpoints", "models", "metrics", "plots"):
        shutil.rmtree(project / name, ignore_errors=True)
    set_params(project, TWO_PART_TRAINING)
    return project


def test_store_down_at_start_and_back_mid_run(
    project: Path, store: tuple[str, Path], record: Record
) -> None:
    url, flag = store
    before = set(run_ids(url))
    flag.touch()  # unreachable at start; back after epoch 2
    proc = train_with_outage(project, url, flag, down=0, up=2)
    result = json.loads((project / "metrics/fold0.json").read_text())
    runs = [r for r in run_ids(url) if r not in before]
    held = (
        proc.returncode == 0
        and "MLflow start failed" in proc.stderr
        and "tracking resumes" in proc.stderr
        and runs == [result["mlflow_run_id"]]
        and "mlflow_incomplete" not in result
        and complete(url, result["mlflow_run_id"])
    )
    record(
        "MLflow down at start, back after epoch 2", "train",
        "training completes; one run, created late, holds every epoch once", held,
    )  # fmt: skip
    assert held, proc.stderr[-3000:]


def test_store_back_between_the_last_epoch_and_the_record(
    project: Path, store: tuple[str, Path], record: Record
) -> None:
    url, flag = store
    before = set(run_ids(url))
    proc = train_with_outage(project, url, flag, down=1, up=4)  # back after the last epoch
    result = json.loads((project / "metrics/fold0.json").read_text())
    runs = [r for r in run_ids(url) if r not in before]
    held = (
        proc.returncode == 0
        and runs == [result["mlflow_run_id"]]
        and "mlflow_incomplete" not in result
        and complete(url, result["mlflow_run_id"])
    )
    record(
        "MLflow gone after epoch 1, back after the last", "train",
        "the final record backfills every epoch before it is logged", held,
    )  # fmt: skip
    assert held, proc.stderr[-3000:]


def test_store_gone_mid_run_then_upload_completes_the_run(
    project: Path, store: tuple[str, Path], record: Record
) -> None:
    url, flag = store
    before = set(run_ids(url))
    proc = train_with_outage(project, url, flag, down=1, up=0)  # gone after epoch 1, for good
    result = json.loads((project / "metrics/fold0.json").read_text())
    trained = (
        proc.returncode == 0
        and result.get("mlflow_incomplete") is True
        and "pneumoseg upload --fold 0" in proc.stderr
    )
    flag.unlink()
    upload = subprocess.run(
        [sys.executable, "-m", "pneumoseg", "-q", "upload", "--fold", "0"],
        cwd=project, env=env() | {"MLFLOW_TRACKING_URI": url}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    after = json.loads((project / "metrics/fold0.json").read_text())
    runs = [r for r in run_ids(url) if r not in before]
    held = (
        trained
        and upload.returncode == 0
        and runs == [result["mlflow_run_id"]] == [after["mlflow_run_id"]]
        and "mlflow_incomplete" not in after
        and complete(url, after["mlflow_run_id"])
    )
    record(
        "MLflow gone after epoch 1, never back", "train + upload",
        "training completes; `pneumoseg upload` completes the same run, every epoch once", held,
    )  # fmt: skip
    assert held, (proc.stderr + upload.stderr)[-3000:]


def test_a_run_left_running_by_a_killed_stage_is_marked_killed(
    tmp_path: Path, record: Record
) -> None:
    """A stage killed with -9 cannot end its run; the next start of that stage ends it."""
    from mlflow.tracking import MlflowClient

    from pneumoseg.params import Params
    from pneumoseg.tracking import Tracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    start = (
        "import os, sys\n"
        "from pneumoseg.params import Params\n"
        "from pneumoseg.tracking import Tracker\n"
        "t = Tracker(Params().mlflow)\n"
        "print(t.start('evaluate', {'stage': 'evaluate'}), flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    killed = subprocess.run(
        [sys.executable, "-c", start], cwd=tmp_path, env=env() | {"MLFLOW_TRACKING_URI": uri},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    dead_run = killed.stdout.strip()
    client = MlflowClient(tracking_uri=uri)
    before = client.get_run(dead_run).info.status
    alive = Tracker(Params().mlflow)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mine = alive.start("evaluate", {"stage": "evaluate"})
        other = Tracker(Params().mlflow).start("evaluate", {"stage": "evaluate"})
    held = (
        killed.returncode == -9
        and before == "RUNNING"
        and client.get_run(dead_run).info.status == "KILLED"
        and client.get_run(mine).info.status == "RUNNING"  # its process lives: left alone
        and other is not None
    )
    record(
        "kill -9", "any stage's MLflow run", "left RUNNING, marked KILLED on the next start", held
    )
    assert held, (killed.stderr[-2000:], before)

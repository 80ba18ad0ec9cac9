"""Training studies on PostgreSQL (Debian's server on 127.0.0.1): two ``pneumoseg study run``
workers in separate processes share one study; a worker killed mid-trial leaves no trial
RUNNING once a worker starts again, and the study still reaches its count."""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from engines import Postgres
from pipeline_helpers import Pipeline, set_params
from test_study import SLOW_STUDY, TINY_STUDY, one_thread_env

PASSWORD = "optuna-canary-Pw-41d8"


@pytest.fixture(scope="module")
def storage(postgres: Postgres) -> str:
    return postgres.create_database("studies", "optuna", PASSWORD)


@pytest.fixture(scope="module")
def base(tiny_pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = tiny_pipeline.copy(tmp_path_factory.mktemp("pg-study") / "base")
    set_params(project, {"studies": {"tiny": TINY_STUDY, "slow": SLOW_STUDY}})
    return project


def worker(project: Path, storage: str, *args: str) -> Any:
    import subprocess
    import sys

    return subprocess.Popen(
        [sys.executable, "-m", "pneumoseg", "-q", "study", "run", *args],
        cwd=project, env=one_thread_env() | {"PNEUMOSEG_OPTUNA_STORAGE": storage},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def load(storage: str, name: str) -> Any:
    import optuna

    from pneumoseg.studies.storage import open_storage

    return optuna.load_study(study_name=name, storage=open_storage(storage))


def test_two_workers_on_postgres_reach_the_count_with_unique_numbers(
    base: Path, storage: str, tmp_path: Path
) -> None:
    project = shutil.copytree(base, tmp_path / "p")
    procs = [worker(project, storage, "tiny", "--trials", "4") for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
        assert PASSWORD not in out
    ran = [int(re.search(r"this worker ran (\d+) trial", out).group(1)) for out in outputs]
    study = load(storage, "tiny")
    numbers = [t.number for t in study.trials]
    assert numbers == list(range(len(numbers)))  # unique, nothing lost
    finished = [t for t in study.trials if t.state.is_finished() and t.state.name != "FAIL"]
    assert len(finished) >= 4 and min(ran) >= 1
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2


def test_a_killed_worker_leaves_no_trial_running(base: Path, storage: str, tmp_path: Path) -> None:
    project = shutil.copytree(base, tmp_path / "p")
    proc = worker(project, storage, "slow", "--trials", "1")
    last = project / "optuna/trials/slow/trial-0/work/fold0/last.pt"
    deadline = time.monotonic() + 300
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the trial finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [t.state.name for t in load(storage, "slow").trials] == ["RUNNING"]
    again = worker(project, storage, "slow", "--trials", "1")
    out = again.communicate(timeout=600)[0]
    assert again.returncode == 0, out[-3000:]
    study = load(storage, "slow")
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE"]
    assert study.trials[1].user_attrs["retry_of"] == 0

"""Training studies on PostgreSQL (Debian's server on 127.0.0.1): two ``pneumoseg study run``
workers in separate processes share one study; a worker killed mid-trial leaves no trial
RUNNING once a worker starts again, and the study still reaches its count."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from engines import Postgres
from pipeline_helpers import Pipeline, set_params
from test_study import SLOW_STUDY, TINY_STUDY, kill_during_first_trial, load, worker

PASSWORD = "optuna-canary-Pw-41d8"


@pytest.fixture(scope="module")
def storage(postgres: Postgres) -> str:
    return postgres.create_database("studies", "optuna", PASSWORD)


@pytest.fixture(scope="module")
def base(tiny_pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = tiny_pipeline.copy(tmp_path_factory.mktemp("pg-study") / "base")
    set_params(project, {"studies": {"tiny": TINY_STUDY, "slow": SLOW_STUDY}})
    return project


def test_two_workers_on_postgres_reach_the_count_with_unique_numbers(
    base: Path, storage: str, tmp_path: Path
) -> None:
    project = shutil.copytree(base, tmp_path / "p")
    procs = [worker(project, "tiny", "--trials", "4", storage=storage) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
        assert PASSWORD not in out
    ran = [int(re.search(r"this worker ran (\d+) trial", out).group(1)) for out in outputs]
    study = load(project, "tiny", storage)
    numbers = [t.number for t in study.trials]
    assert numbers == list(range(len(numbers)))  # unique, nothing lost
    finished = [t for t in study.trials if t.state.is_finished() and t.state.name != "FAIL"]
    assert len(finished) >= 4 and min(ran) >= 1
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2


def test_a_killed_worker_leaves_no_trial_running(base: Path, storage: str, tmp_path: Path) -> None:
    project = shutil.copytree(base, tmp_path / "p")
    kill_during_first_trial(
        project, worker(project, "slow", "--trials", "1", storage=storage), "slow"
    )
    assert [t.state.name for t in load(project, "slow", storage).trials] == ["RUNNING"]
    again = worker(project, "slow", "--trials", "1", storage=storage)
    out = again.communicate(timeout=600)[0]
    assert again.returncode == 0, out[-3000:]
    study = load(project, "slow", storage)
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE"]
    assert study.trials[1].user_attrs["retry_of"] == 0

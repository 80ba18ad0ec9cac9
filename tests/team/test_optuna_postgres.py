"""Studies on PostgreSQL (Debian's server on 127.0.0.1): two ``pneumoseg study run`` workers in
separate processes share one study; a worker killed mid-trial leaves no trial RUNNING once a
worker starts again, and the study still reaches its count; a server restart mid-study is
waited out; the threshold study gives on PostgreSQL what it gives on the journal file; and
bench/study_workers.py runs on its smallest input."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from engines import Postgres
from pipeline_helpers import DvcProject, env, set_params
from test_bench import RATIO, bench
from test_study import SLOW_STUDY, TINY_STUDY, kill_during_first_trial, load, worker

PASSWORD = "optuna-canary-Pw-41d8"


@pytest.fixture(scope="module")
def storage(postgres: Postgres) -> str:
    return postgres.create_database("studies", "optuna", PASSWORD)


@pytest.fixture(scope="module")
def base(dvc_project: DvcProject, tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = dvc_project.copy(tmp_path_factory.mktemp("pg-study") / "base")
    studies = {"tiny": TINY_STUDY, "slow": SLOW_STUDY, "restart": SLOW_STUDY}
    set_params(project, {"studies": studies})
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


def test_a_server_restart_mid_study_is_waited_out(
    base: Path, storage: str, postgres: Postgres, tmp_path: Path
) -> None:
    """``pg_ctl stop -m fast`` (every connection closed), 5 s without a server, a start: both
    workers' storage calls wait for the server, reconnect, and the study finishes its count
    without a failed trial."""
    project = shutil.copytree(base, tmp_path / "p")
    procs = [worker(project, "restart", "--trials", "2", storage=storage) for _ in range(2)]
    trained = project / "optuna/trials/restart/trial-0/work/fold0/last.pt"
    deadline = time.monotonic() + 300
    while not trained.exists() and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), "a worker ended before the restart"
        time.sleep(0.2)
    postgres.restart(down_seconds=5)
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
        assert PASSWORD not in out
    printed = "".join(outputs)
    assert "is unreachable" in printed and "is back" in printed  # the outage was met
    study = load(project, "restart", storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]


def test_the_threshold_study_on_postgres_selects_what_the_journal_does(
    dvc_project: DvcProject, storage: str, tmp_path: Path
) -> None:
    """The same seeded search on the journal file and on PostgreSQL: the same trials, the same
    deployed triplet and scores; the PostgreSQL study holds every trial."""
    import optuna

    from pneumoseg.studies.storage import open_storage

    project = dvc_project.copy(tmp_path / "p")
    set_params(project, {"thresholds": {"trials": 20}})
    chosen = {}
    for where, extra in (("journal", []), ("postgres", ["--storage", storage])):
        proc = subprocess.run(
            [sys.executable, "-m", "pneumoseg", "-q", "thresholds", *extra],
            cwd=project, env=env(), capture_output=True, text=True,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert PASSWORD not in proc.stdout + proc.stderr
        chosen[where] = json.loads((project / "models/postprocess.json").read_text())
        chosen[where].get("exhaustive", {}).pop("seconds", None)  # a timing
    journal, postgres = (chosen[k] for k in ("journal", "postgres"))
    assert postgres["storage"].startswith("postgresql://optuna:***@")
    assert postgres["n_trials"] == 20 and "optuna" in postgres
    differ = {k for k in journal if journal[k] != postgres.get(k)}
    assert differ == {"storage", "mlflow_run_id"}, {k: (journal[k], postgres[k]) for k in differ}
    name = journal["study_name"]
    study = optuna.load_study(study_name=name, storage=open_storage(storage))
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 20


def test_the_study_workers_bench_runs(dvc_project: DvcProject) -> None:
    """bench/study_workers.py (study workers on PostgreSQL) on its smallest input, on a copy of
    the shared project (see tests/test_bench.py)."""
    out = bench("study_workers.py", "--trials", "1", "--epochs", "1",
                "--project", str(dvc_project.path))  # fmt: skip
    assert "2 workers, the rule" in out and RATIO.search(out), out[-2000:]

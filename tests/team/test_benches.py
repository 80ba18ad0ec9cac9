"""The benches of the team engines run on their smallest input (see tests/test_bench.py):
bench/team.py (tracking through an MLflow server on PostgreSQL + S3, a DVC remote on S3) and
bench/study_workers.py (study workers on PostgreSQL)."""

from __future__ import annotations

from pathlib import Path

from pipeline_helpers import DvcProject
from test_bench import RATIO, bench


def test_the_team_bench_runs(dvc_project: DvcProject, tmp_path: Path) -> None:
    project = dvc_project.copy(tmp_path / "p")
    out = bench("team.py", "--epochs", "3", "--project", str(project))
    assert "tracker / bare client on the server:" in out and RATIO.search(out), out[-2000:]
    assert "dvc push" in out, out[-2000:]


def test_the_study_workers_bench_runs(dvc_project: DvcProject) -> None:
    out = bench(
        "study_workers.py", "--trials", "1", "--epochs", "1", "--project", str(dvc_project.path)
    )
    assert "2 workers, the rule" in out and RATIO.search(out), out[-2000:]

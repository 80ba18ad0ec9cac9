"""No password from a URL reaches an output file, a log line, an error message or MLflow.

A real PostgreSQL server holds the threshold study; its URL carries a canary password, given
through params.yaml, the ``--storage`` flag and ``PNEUMOSEG_OPTUNA_STORAGE``. Afterwards no
byte of any file the pipeline wrote (outputs, metrics, plots, the MLflow database and
artifacts, the registered model) and no line the commands printed contains the canary.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from engines import Postgres
from pipeline_helpers import Pipeline, env, set_params

pytestmark = pytest.mark.slow

CANARY = "CANARY-pw-7f3a9c"


def pneumoseg(project: Path, *args: str, extra_env: dict[str, str] | None = None):
    return subprocess.run(
        [sys.executable, "-m", "pneumoseg", *args],
        cwd=project,
        env=env() | (extra_env or {}),
        capture_output=True,
        text=True,
    )


def test_a_storage_password_reaches_no_output_log_or_mlflow(
    tiny_pipeline: Pipeline, postgres: Postgres, tmp_path: Path
) -> None:
    url = postgres.create_database("optuna_canary", "canary_user", CANARY)
    project = tiny_pipeline.copy(tmp_path / "p")
    printed: list[str] = []

    def check(proc: subprocess.CompletedProcess, ok: bool = True) -> None:
        printed.extend([proc.stdout, proc.stderr])
        assert (proc.returncode == 0) == ok, proc.stderr[-2000:]

    set_params(project, {"thresholds": {"storage": url, "trials": 25}})  # from params.yaml
    check(pneumoseg(project, "thresholds"))
    check(pneumoseg(project, "thresholds", "--trials", "30", "--storage", url))  # a flag
    set_params(project, {"thresholds": {"storage": None, "trials": 35}})
    check(pneumoseg(project, "thresholds", extra_env={"PNEUMOSEG_OPTUNA_STORAGE": url}))
    for stage in ("evaluate", "register", "submit"):
        check(pneumoseg(project, stage, extra_env={"PNEUMOSEG_OPTUNA_STORAGE": url}))
    # error paths: a server that does not answer, a study that does not exist
    dead = url.replace(f":{postgres.port}/", ":1/")
    proc = pneumoseg(project, "thresholds", "--storage", dead)
    check(proc, ok=False)
    assert "canary_user:***@127.0.0.1:1/optuna_canary" in proc.stderr
    check(pneumoseg(project, "study", "show", "loss-and-sampling", "--storage", url), ok=False)

    leaks = [p for p in printed if CANARY in p]
    assert not leaks, leaks[0][-500:]
    import json

    post = json.loads((project / "models/postprocess.json").read_text())
    assert post["storage"].startswith("postgresql://canary_user:***@")
    written = [
        p
        for p in project.rglob("*")
        if p.is_file() and p.name != "params.yaml" and "src" not in p.relative_to(project).parts
    ]
    assert any(p.name == "mlflow.db" for p in written)
    assert not [str(p) for p in written if CANARY.encode() in p.read_bytes()]

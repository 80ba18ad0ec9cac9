"""Every benchmark of ``make bench`` runs on its smallest input, so none rots between the
measurements (its figures are not checked: timings depend on the machine and on what else
runs; a bench's own output says what it compares)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from pipeline_helpers import ROOT, DvcProject, Pipeline, env

pytestmark = pytest.mark.slow


def bench(script: str, *args: str, cwd: Path = ROOT, timeout: float = 600) -> str:
    """``python bench/SCRIPT ARGS``: its stdout, failing with its output if it fails."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        cwd=cwd,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc.stdout


# a bench compares against its baseline: a ratio ("1.05x") or a table of both sides' figures
RATIO = re.compile(r"\d\.\d+x|\d+x |\d\.\d+ ms|\d img/s")


@pytest.mark.parametrize(
    ("script", "args"),
    [
        ("convert.py", ["--n", "4", "--size", "64", "--out-size", "32", "--repeats", "1"]),
        ("convert.py", ["--siim", "--n", "2", "--repeats", "1"]),
        ("loader.py", ["--images", "4", "--sizes", "256", "--workers", "0", "--rounds", "1",
                       "--no-rss"]),
        ("thresholds.py", ["--n", "40", "--size", "32", "--trials", "5"]),
        ("train_overhead.py", ["--sizes", "64", "--epochs", "1", "--images", "16"]),
    ],
)  # fmt: skip
def test_a_bench_runs_on_its_smallest_input(script: str, args: list[str]) -> None:
    out = bench(script, *args)
    assert RATIO.search(out), out[-2000:]


def test_the_no_op_repro_bench_runs_on_a_project(dvc_project: DvcProject, tmp_path: Path) -> None:
    project = dvc_project.copy(tmp_path / "p")
    out = bench("noop.py", str(project), "--repeats", "1")
    assert "project / floor (dvc repro) =" in out and RATIO.search(out), out[-2000:]


def test_the_predict_bench_runs_on_a_trained_project(
    tiny_pipeline: Pipeline, tmp_path: Path
) -> None:
    project = tiny_pipeline.copy(tmp_path / "p")
    out = bench("predict.py", str(project), "--n", "4", "--rounds", "1")
    assert "img/s" in out, out[-2000:]

"""Shared helpers for tests that run real stages on a tiny demo project in a temp folder."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TINY: dict[str, Any] = {
    "demo": {"n_train": 24, "n_test": 6, "size": 128, "seed": 7},
    "data": {"size": 64, "workers": 1},
    "arrays": {"sizes": []},
    "split": {"n_folds": 3},
    "oof": {"size": 64},
    "thresholds": {"trials": 20},
    "evaluate": {"bootstrap": 100},
    "train": {
        "folds": [0, 1],
        "batch_size": 4,
        "model": {"encoder": "tu-mobilenetv3_small_100", "decoder_channels": [32, 16, 8, 8, 4]},
        # the round-2 issue-11 tests were written for these (the demo defaults: none + swa)
        "selection": {"mode": "inner"},
        "checkpoint": {"top_k": 2, "final": "best"},
        "swa": {"epochs": 0},
        "parts": [
            {
                "size": 64,
                "epochs": 2,
                "lr": 0.003,
                "loss": {"bce": 1, "dice": 1},
                "sample_rate": {"start": 0.8, "end": 0.5, "shape": "linear"},
            }
        ],
    },
}


PINNED_THREADS = "1"  # the tests' trainings: one thread each (two xdist workers, two cores)


def pin_threads(monkeypatch: Any) -> None:
    """Pin the torch thread count of the trainings a test starts (in-process and subprocesses):
    the thread rule follows the other live trainers, and another count changes float sums, so
    a test that compares weights bit for bit pins it (conftest pins the whole run the same
    way; a test that exercises the rule unpins it)."""
    monkeypatch.setenv("PNEUMOSEG_THREADS", PINNED_THREADS)


def deep_update(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict update (lists replaced)."""
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


def write_params(path: Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The repo's params.yaml with the tiny settings (and ``overrides``) applied."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    deep_update(params, yaml.safe_load(yaml.safe_dump(TINY)))
    deep_update(params, overrides or {})
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def env() -> dict[str, str]:
    """Environment for subprocesses: the venv first on PATH, offline flags."""
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    e.pop("MLFLOW_TRACKING_URI", None)
    e.update(
        {
            "HF_HUB_OFFLINE": "1",
            "NO_ALBUMENTATIONS_UPDATE": "1",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DVC_NO_ANALYTICS": "1",
            "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@example.invalid",
            "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@example.invalid",
        }
    )
    return e


def run(cmd: list[str], cwd: Path, check: bool = True, **kw: Any) -> subprocess.CompletedProcess:
    """Run a command, failing the test with its output if it fails and ``check``."""
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        output = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{output}")
    return proc


def pneumoseg(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "pneumoseg", *args], cwd=cwd, check=check)


@functools.cache
def empty_store_file() -> Path:
    """An MLflow sqlite store with no runs, made by MLflow once per test process (creating one
    runs every schema migration: about 3 s, in each new store's first process)."""
    from mlflow.tracking import MlflowClient

    folder = Path(tempfile.mkdtemp(prefix="pneumoseg-empty-store-"))
    MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db").search_experiments()
    return folder / "mlflow.db"


def reset_outputs(
    project: Path, names: tuple[str, ...] = ("checkpoints", "models", "metrics", "plots")
) -> Path:
    """Remove ``names`` and give the project an empty MLflow store (``mlruns/``), as a project
    that never trained has, the migrations done."""
    for name in (*names, "mlruns"):
        shutil.rmtree(project / name, ignore_errors=True)
    (project / "mlruns").mkdir()
    shutil.copy(empty_store_file(), project / "mlruns/mlflow.db")
    return project


def make_project(path: Path, overrides: dict[str, Any] | None = None, git: bool = True) -> Path:
    """A project folder with dvc.yaml, tiny params.yaml and a copy of src/ (DVC code deps)."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "dvc.yaml", path / "dvc.yaml")
    shutil.copytree(ROOT / "src", path / "src", ignore=shutil.ignore_patterns("__pycache__"))
    write_params(path / "params.yaml", overrides)
    if git:
        run(["git", "init", "-q"], cwd=path)
        run([str(BIN / "dvc"), "init", "-q"], cwd=path)
        run([str(BIN / "dvc"), "config", "core.analytics", "false"], cwd=path)
        shutil.copytree(ROOT / ".dvc/plots", path / ".dvc/plots")  # dvc.yaml's plot template
        (path / ".gitignore").write_text("/mlruns/\n/checkpoints/\n/optuna/\n")
    return path


def prepared_data(path: Path, overrides: dict[str, Any] | None = None) -> Path:
    """Project with demo -> convert -> arrays -> split already run in-process (no DVC)."""
    from pneumoseg.params import load_params
    from pneumoseg.stages import arrays, convert, demo, split

    make_project(path, overrides, git=False)
    cwd = os.getcwd()
    os.chdir(path)
    try:
        params = load_params("params.yaml")
        demo.run(params, progress=False)
        convert.run(params, progress=False)
        arrays.run(params, progress=False)
        split.run(params)
    finally:
        os.chdir(cwd)
    return path


def cli(*args: str, cwd: Path, check: bool = True) -> tuple[int, str, str]:
    """Run ``pneumoseg`` in-process in ``cwd`` (saves the interpreter start-up of a subprocess);
    returns (exit code, stdout, stderr)."""
    import contextlib
    import io

    from pneumoseg.cli import main

    out, err, old = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        os.chdir(old)
    if check and code != 0:
        raise AssertionError(f"pneumoseg {' '.join(args)} exited {code}\n{err.getvalue()}")
    return code, out.getvalue(), err.getvalue()


def in_process(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """:func:`cli` with :func:`pneumoseg`'s result type: for a command whose test needs no
    process of its own (no signal, no kill, no start-up or environment check), about 5 s of
    imports sooner."""
    code, out, err = cli(*args, cwd=cwd, check=check)
    return subprocess.CompletedProcess(["pneumoseg", *args], code, out, err)


STAGES = (
    *("demo", "convert", "arrays", "split", "train", "member", "pseudo_label", "finetune"),
    "oof",
    *("thresholds", "evaluate", "register", "submit", "result"),
)


@dataclass
class Pipeline:
    """A tiny project after one run of every stage, with what each stage read (stage_probe)."""

    path: Path
    reports: dict[str, dict[str, Any]]  # "demo", ..., "train@0", ...

    def copy(self, dest: Path) -> Path:
        """A private copy for a test that changes files."""
        shutil.copytree(self.path, dest, symlinks=True)
        return dest


# The third-party libraries the stages import (none imports pneumoseg): a fork server loads
# them once, and each probe of the tiny pipeline's build is a fork of it (about 4 s of imports
# less per stage; the report lists the pneumoseg modules the stage imported, all new there).
PROBE_PRELOAD = [
    "torch", "segmentation_models_pytorch", "albumentations", "mlflow", "optuna",
    "matplotlib.pyplot", "pydicom", "cv2", "pandas",
]  # fmt: skip


@functools.cache
def probe_processes() -> Any:
    """The multiprocessing context whose fork server preloaded :data:`PROBE_PRELOAD`."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PROBE_PRELOAD)
    return context


def probe_stage(
    project: Path, stage: str, fold: int | None = None, member: str | None = None
) -> dict[str, Any]:
    """Run one stage through tests/stage_probe.py (:func:`stage_probe.probe_in_child`, a new
    process forked from the preloaded fork server); its report and wall time."""
    import stage_probe

    with tempfile.TemporaryDirectory(prefix="pneumoseg-probe-") as folder:
        out = Path(folder) / "report.json"
        start = time.monotonic()
        child = probe_processes().Process(
            target=stage_probe.probe_in_child,
            args=(str(project), env(), str(out), stage, fold, member),
        )
        child.start()
        child.join()
        seconds = time.monotonic() - start
        if child.exitcode != 0:
            raise AssertionError(
                f"stage_probe {stage} (fold {fold}, member {member}) exited {child.exitcode}; "
                "its traceback is on the test run's stderr"
            )
        return json.loads(out.read_text()) | {"wall_seconds": seconds}


def probed_pipeline(path: Path, overrides: dict[str, Any] | None = None) -> Pipeline:
    """:func:`make_project` (no git), then every stage once, each through the probe."""
    params = write_params_of(make_project(path, overrides, git=False))
    reports: dict[str, dict[str, Any]] = {}
    for stage in STAGES:
        if stage == "train":
            for k in params["train"]["folds"]:
                reports[f"train@{k}"] = probe_stage(path, "train", k)
        elif stage in ("pseudo_label", "finetune"):
            for k in params["pseudo_label"]["folds"]:
                reports[f"{stage}@{k}"] = probe_stage(path, stage, k)
        elif stage == "member":
            for name in params["ensemble"]["members"]:
                for k in params["train"]["folds"]:
                    reports[f"member@{name}-{k}"] = probe_stage(path, "train", k, name)
        else:
            reports[stage] = probe_stage(path, stage)
    return Pipeline(path, reports)


def write_params_of(project: Path) -> dict[str, Any]:
    return yaml.safe_load((project / "params.yaml").read_text())


def set_params(project: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """Apply ``overrides`` (nested, lists replaced) to the project's params.yaml."""
    params = deep_update(write_params_of(project), yaml.safe_load(yaml.safe_dump(overrides)))
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


@dataclass
class DvcProject:
    """A git + DVC tiny project after a real ``dvc repro`` from nothing, committed."""

    path: Path
    ran: set[str]  # the stages that first `dvc repro` ran

    def copy(self, dest: Path) -> Path:
        shutil.copytree(self.path, dest, symlinks=True)
        return dest


def dvc(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    return run([str(BIN / "dvc"), *args], cwd=cwd, check=check)


def run_queue(
    project: Path, names: tuple[str, ...], extra_env: dict[str, str] | None = None
) -> str:
    """``dvc queue start -j 2`` and wait until the experiments ``names`` all succeeded; returns
    everything the queue commands printed (the experiments' logs included).

    Each ``dvc queue logs -f NAME`` blocks until its task ends; polling ``dvc queue status``
    instead costs a DVC process (about 1.5 s of CPU) every few seconds for minutes. A task
    still queued when followed returns at once, so the status is polled until none is queued
    first, and once more at the end."""
    variables = env() | (extra_env or {})

    def queue(*args: str) -> str:
        proc = subprocess.run(
            [str(BIN / "dvc"), "queue", *args],
            cwd=project, env=variables, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        printed.append(proc.stdout + proc.stderr)
        return printed[-1]

    printed: list[str] = []
    try:
        queue("start", "-j", "2")
        deadline = time.monotonic() + 900
        status = queue("status")
        while "Queued" in status and time.monotonic() < deadline:
            time.sleep(5)
            status = queue("status")
        for name in names:
            queue("logs", "-f", name)
        while time.monotonic() < deadline:
            status = queue("status")
            if "Running" not in status and "Queued" not in status:
                break
            time.sleep(5)
        assert status.count("Success") == len(names), status
    finally:
        queue("stop", "--kill")
    return "".join(printed)


def repro(project: Path, *targets: str) -> set[str]:
    """`dvc repro`; the names of the stages that ran."""
    import re

    out = dvc("repro", *targets, cwd=project).stdout
    return set(re.findall(r"Running stage '([^']+)'", out))


def git_commit(project: Path, message: str, tag: str | None = None) -> str:
    """Commit everything (DVC outputs are git-ignored by DVC); returns the commit sha."""
    git = ("git", "-c", "advice.detachedHead=false")
    run([*git, "add", "-A"], cwd=project)
    run([*git, "commit", "-q", "-m", message], cwd=project)
    if tag:
        run([*git, "tag", tag], cwd=project)
    return run([*git, "rev-parse", "HEAD"], cwd=project).stdout.strip()


def reproduced_project(path: Path, overrides: dict[str, Any] | None = None) -> DvcProject:
    project = make_project(path, overrides)
    (project / "init.sha").write_text(git_commit(project, "init"))
    ran = repro(project)
    git_commit(project, "dvc repro", tag="base")
    return DvcProject(project, ran)


# Four epochs in two parts at 64 px: the smallest training with a part hand-over (fault cases).
TWO_PART_TRAINING = {
    "train": {
        "parts": [
            {"size": 64, "epochs": 2, "lr": 0.003, "loss": {"bce": 1, "dice": 1}},
            {"size": 64, "epochs": 2, "lr": 0.001, "scheduler": {"name": "constant"}},
        ]
    }
}


@contextlib.contextmanager
def http_server(
    cmd: list[str], port: int, log: Path, cwd: Path | None = None, extra_env: dict | None = None
) -> Iterator[tuple[str, int]]:
    """Start ``cmd`` (a server on 127.0.0.1:``port``, output to ``log``) in a session of its
    own, wait until ``/health`` answers 200, yield (base URL, pid); stop the whole session
    afterwards (SIGTERM, then SIGKILL)."""
    import signal
    import time
    import urllib.request

    url = f"http://127.0.0.1:{port}"
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env() | (extra_env or {}), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 300
            while True:
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, f"{cmd[0]} did not answer /health in time"
                with contextlib.suppress(OSError):
                    if urllib.request.urlopen(f"{url}/health", timeout=5).status == 200:
                        break
                time.sleep(0.5)
            yield url, proc.pid
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)

"""Lineage of a run: git commit and dirty flag, the DVC experiment it belongs to, the hash of
the data it read, the installed packages and the process that made it (:func:`worker_id`)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

DVC_EXPERIMENT_TAGS = {
    "DVC_EXP_NAME": "dvc_exp_name",
    "DVC_EXP_BASELINE_REV": "dvc_exp_baseline_rev",
}


def git_info(cwd: str | Path = ".") -> dict[str, str]:
    """Current commit and dirty flag (``unknown`` outside a git checkout)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=20
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}
    return {"git_commit": commit, "git_dirty": str(dirty).lower()}


def lineage_tags() -> dict[str, str]:
    """Tags every run gets: git commit and dirty flag, and inside a DVC experiment its name
    and baseline revision (``dvc_exp_name``, ``dvc_exp_baseline_rev``), so the MLflow UI can
    filter one experiment's runs."""
    tags = git_info()
    for env, tag in DVC_EXPERIMENT_TAGS.items():
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


def source_tags(lineage: dict[str, str], command: str) -> dict[str, str]:
    """MLflow's standard source tags, which runs created through ``MlflowClient`` do not get:
    the UI's Source, User and commit columns (``command``: the stage or command)."""
    import getpass

    tags = {"mlflow.source.name": f"pneumoseg {command}", "mlflow.source.type": "LOCAL"}
    with contextlib.suppress(Exception):  # a uid without a passwd entry (containers)
        tags["mlflow.user"] = getpass.getuser()
    if lineage.get("git_commit", "unknown") != "unknown":
        tags["mlflow.source.git.commit"] = lineage["git_commit"]
    return tags


def dvc_lock_stages() -> dict[str, dict[str, Any]]:
    """The stage entries of ``dvc.lock`` in the current folder ({} without one): what DVC
    recorded when each stage last ran or was restored (its params, deps and outs)."""
    lock = Path("dvc.lock")
    if not lock.is_file():
        return {}
    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    except yaml.YAMLError:
        return {}
    return stages if isinstance(stages, dict) else {}


def dvc_lock_params(stage: str) -> dict[str, Any] | None:
    """The ``params.yaml`` keys and values ``dvc.lock`` records for ``stage`` (e.g.
    ``train@0``): the params its outputs were made with; None when the lock has no entry."""
    entry = dvc_lock_stages().get(stage)
    if entry is None:
        return None
    return dict((entry.get("params") or {}).get("params.yaml") or {})


def dvc_md5(path: str, stage: str | None = None) -> str | None:
    """The md5 DVC recorded in ``dvc.lock`` for output ``path`` (of ``stage``, else of any
    stage; a folder's ends in ``.dir``), or None (no lock file, or not a DVC output)."""
    stages = dvc_lock_stages()
    wanted = path.rstrip("/")
    for name, entry in stages.items():
        if stage is not None and name != stage:
            continue
        for out in entry.get("outs", []):
            if out.get("path", "").rstrip("/") == wanted and out.get("md5"):
                return str(out["md5"])
    return None


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


def data_hash(processed_dir: str, folds_csv: str | None = None) -> str:
    """Hash of the processed data: the md5 DVC recorded in ``dvc.lock`` for the convert output
    (lineage only), else a sha256 of ``manifest.csv``; combined with the folds file."""
    parts: list[str] = []
    md5 = dvc_md5(processed_dir, "convert")
    if md5:
        parts.append(f"dvc:{md5}")
    else:
        manifest = Path(processed_dir) / "manifest.csv"
        if manifest.is_file():
            parts.append("manifest:" + file_digest(manifest))
    if folds_csv and Path(folds_csv).is_file():
        parts.append("folds:" + file_digest(folds_csv))
    return ";".join(parts) or "unknown"


def dataset_inputs(processed_dir: str, folds_csv: str) -> list[dict[str, str]]:
    """The data sets a training run reads, for MLflow's run inputs: ``name``, ``source`` (the
    path), ``digest`` (DVC's md5 from ``dvc.lock``, else ``sha256:`` of the manifest or folds
    file) and ``context``."""
    found = []
    for name, path, stage, fallback in (
        ("processed", processed_dir, "convert", Path(processed_dir) / "manifest.csv"),
        ("folds", folds_csv, "split", Path(folds_csv)),
    ):
        digest = dvc_md5(path, stage)
        if digest is None and fallback.is_file():
            digest = "sha256:" + file_digest(fallback)
        found.append(
            {"name": name, "source": path, "digest": digest or "unknown", "context": "training"}
        )
    return found


def pip_freeze() -> str:
    """Installed distributions as ``name==version`` lines (no subprocess)."""
    dists = {(d.metadata["Name"] or "?"): d.version for d in metadata.distributions()}
    return "\n".join(f"{n}=={v}" for n, v in sorted(dists.items(), key=lambda x: x[0].lower()))


def worker_id() -> str:
    """``host:pid:start`` of this process (the start time tells a reused pid apart)."""
    import psutil

    return f"{socket.gethostname()}:{os.getpid()}:{int(psutil.Process().create_time() * 1000)}"


def worker_alive(worker: str) -> bool | None:
    """Whether the process named by :func:`worker_id` still runs: None when it ran on another
    host (unknowable here; RDB storages use Optuna's heartbeat for those)."""
    import psutil

    host, _, rest = worker.partition(":")
    pid, _, start = rest.partition(":")
    if host != socket.gethostname():
        return None
    try:
        proc = psutil.Process(int(pid))
        return int(proc.create_time() * 1000) == int(start) and proc.status() != "zombie"
    except (psutil.NoSuchProcess, ValueError):
        return False

"""Lineage of a run: git commit and dirty flag, the DVC experiment it belongs to, the hash of
the data it read, the installed packages and the process that made it (:func:`worker_id`)."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
from importlib import metadata
from pathlib import Path

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


def data_hash(processed_dir: str, folds_csv: str | None = None) -> str:
    """Hash of the processed data: the md5 DVC recorded in ``dvc.lock`` for the convert output
    (lineage only), else a sha256 of ``manifest.csv``; combined with the folds file."""
    processed = processed_dir.rstrip("/")
    parts: list[str] = []
    lock = Path("dvc.lock")
    if lock.is_file():
        try:
            stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
            for out in stages.get("convert", {}).get("outs", []):
                if out.get("path", "").rstrip("/") == processed and out.get("md5"):
                    parts.append(f"dvc:{out['md5']}")
        except yaml.YAMLError:
            pass
    if not parts:
        manifest = Path(processed) / "manifest.csv"
        if manifest.is_file():
            parts.append("manifest:" + hashlib.sha256(manifest.read_bytes()).hexdigest()[:12])
    if folds_csv and Path(folds_csv).is_file():
        parts.append("folds:" + hashlib.sha256(Path(folds_csv).read_bytes()).hexdigest()[:12])
    return ";".join(parts) or "unknown"


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

"""MLflow tracking that never kills training: every call is guarded, failures warn once and the
local history (``plots/``, ``metrics/``) stays the record. Also lineage helpers (git, data hash).
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from pneumoseg.params import MlflowParams, Params

log = logging.getLogger(__name__)


def tracking_uri(cfg: MlflowParams) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``mlflow.tracking_uri`` (sqlite dirs created)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
    return uri


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


def data_hash(params: Params) -> str:
    """Hash of the processed data: the md5 DVC recorded in ``dvc.lock`` for the convert output,
    else a sha256 of ``manifest.csv``; combined with the folds file."""
    processed = params.data.processed_dir.rstrip("/")
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
    folds = Path(params.split.out)
    if folds.is_file():
        parts.append("folds:" + hashlib.sha256(folds.read_bytes()).hexdigest()[:12])
    return ";".join(parts) or "unknown"


def pip_freeze() -> str:
    """Installed distributions as ``name==version`` lines (no subprocess)."""
    dists = {(d.metadata["Name"] or "?"): d.version for d in metadata.distributions()}
    return "\n".join(f"{n}=={v}" for n, v in sorted(dists.items(), key=lambda x: x[0].lower()))


class Tracker:
    """One MLflow run, resumable by id. A failing backend turns the tracker off with a warning."""

    def __init__(self, cfg: MlflowParams, enabled: bool = True) -> None:
        self.cfg = cfg
        self.enabled = enabled
        self.client: Any = None
        self.run_id: str | None = None
        self.failed = False

    def _fail(self, what: str, exc: Exception) -> None:
        if not self.failed:
            log.warning(
                "MLflow %s failed (%s: %s); the work goes on without tracking and its record "
                "stays in the local files (plots/, metrics/, models/). Once the server is back, "
                "`pneumoseg upload --fold K` puts a fold training into MLflow (other stages: "
                "rerun them, `dvc repro -f -s <stage>`).",
                what,
                type(exc).__name__,
                str(exc).splitlines()[0] if str(exc) else "",
            )
        self.failed = True

    @property
    def active(self) -> bool:
        return self.enabled and not self.failed and self.run_id is not None

    def start(self, run_name: str, tags: dict[str, str], run_id: str | None = None) -> str | None:
        """Create a run (or reopen ``run_id``); returns the run id or None if tracking failed."""
        if not self.enabled:
            return None
        try:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=tracking_uri(self.cfg))
            if run_id is not None:
                self.client.update_run(run_id, status="RUNNING")
                self.run_id = run_id
                return run_id
            exp = self.client.get_experiment_by_name(self.cfg.experiment)
            if exp is None:
                location = None
                if tracking_uri(self.cfg).startswith("sqlite:"):
                    location = Path(self.cfg.artifact_location).resolve().as_uri()
                exp_id = self.client.create_experiment(
                    self.cfg.experiment, artifact_location=location
                )
            else:
                exp_id = exp.experiment_id
            run = self.client.create_run(exp_id, run_name=run_name, tags=tags)
            self.run_id = run.info.run_id
        except Exception as exc:
            self._fail("start", exc)
            return None
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params in batches of 100 (MLflow's limit per call)."""
        if not self.active:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        try:
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[i : i + 100])
        except Exception as exc:
            self._fail("log_params", exc)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """One batched call per step."""
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        try:
            self.client.log_batch(self.run_id, metrics=items)
        except Exception as exc:
            self._fail("log_metrics", exc)

    def set_tags(self, tags: dict[str, str]) -> None:
        if not self.active:
            return
        from mlflow.entities import RunTag

        try:
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        except Exception as exc:
            self._fail("set_tags", exc)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.active:
            return
        try:
            self.client.log_artifact(self.run_id, str(path), artifact_path)
        except Exception as exc:
            self._fail("log_artifact", exc)

    def log_text(self, text: str, artifact_file: str) -> None:
        if not self.active:
            return
        try:
            self.client.log_text(self.run_id, text, artifact_file)
        except Exception as exc:
            self._fail("log_text", exc)

    def end(self, status: str = "FINISHED") -> None:
        if not self.active:
            return
        try:
            self.client.set_terminated(self.run_id, status=status)
        except Exception as exc:
            self._fail("end", exc)

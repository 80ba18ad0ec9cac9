"""Optuna study infrastructure shared by the threshold search and the training studies:
persistent storage, MLflow logging of trials, and study plots (PNG + HTML)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import warnings
from pathlib import Path
from typing import Any

from pneumoseg.paths import in_repo, sqlite_in_repo
from pneumoseg.redact import redact_text
from pneumoseg.tracking import Tracker

log = logging.getLogger(__name__)
DEFAULT_JOURNAL = "optuna/journal.log"
STORAGE_ENV = "PNEUMOSEG_OPTUNA_STORAGE"
LOCK_GRACE_SECONDS = 10


def resolve_storage(storage: str | None) -> str:
    """``storage`` or ``$PNEUMOSEG_OPTUNA_STORAGE`` or the default journal file; a relative
    journal file or sqlite path resolves against the repo root (:mod:`pneumoseg.paths`), so
    studies of queued DVC experiments land in the user's storage."""
    target = storage or os.environ.get(STORAGE_ENV) or DEFAULT_JOURNAL
    if "://" in target:
        return sqlite_in_repo(target)
    return str(in_repo(target))


def open_storage(storage: str | None, heartbeat: int | None = None) -> Any:
    """An Optuna storage: an RDB URL (``postgresql://``, ``sqlite:///``) is used as is (with
    Optuna's trial heartbeat every ``heartbeat`` seconds when given, so trials of a dead worker
    on any host are failed); anything else is a JournalStorage file (safe for several processes
    on one host)."""
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage

    target = resolve_storage(storage)
    if "://" in target:
        return open_rdb_storage(target, heartbeat)
    path = Path(target).resolve()  # resolve_storage made it absolute already
    path.parent.mkdir(parents=True, exist_ok=True)
    # An absolute path and an O_EXCL lock file: Optuna's default symlink lock, given a relative
    # path, leaves a dangling link when a worker is killed and the next one spins forever.
    # A lock left by a killed worker is broken after LOCK_GRACE_SECONDS.
    lock = JournalFileOpenLock(str(path), grace_period=LOCK_GRACE_SECONDS)
    return JournalStorage(JournalFileBackend(str(path), lock_obj=lock))


def fail_stale_trials(study: Any) -> int:
    """Mark the study's RUNNING trials FAILED: for a study run by one process at a time, a
    RUNNING trial at start-up was left by a killed run. Returns how many were failed."""
    from optuna.trial import TrialState

    stale = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
    for trial in stale:
        study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
    if stale:
        log.warning(
            "optuna: marked %d stale RUNNING trial(s) of %s as FAILED", len(stale), study.study_name
        )
    return len(stale)


def open_rdb_storage(url: str, heartbeat: int | None = None) -> Any:
    """An RDBStorage (sqlite/postgresql/mysql URL); with ``heartbeat`` seconds, trials of a dead
    worker are failed and retried once. Connection problems raise one line naming the URL."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {}
    if heartbeat is not None:
        kwargs = {
            "heartbeat_interval": heartbeat,
            "grace_period": 4 * heartbeat,
            "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(max_retry=1),
        }
    try:
        with warnings.catch_warnings():  # heartbeat_interval is "experimental" since Optuna 2
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(url, **kwargs)
    except Exception as exc:  # sqlalchemy errors, missing drivers
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise RuntimeError(f"Optuna storage {redact_text(url)}: {redact_text(first)}") from None


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


class MlflowTrialLogger:
    """Optuna callback: each finished trial's value (and the running best) as MLflow metrics at
    step = trial number, in one batched call."""

    def __init__(self, tracker: Tracker, prefix: str = "") -> None:
        self.tracker = tracker
        self.prefix = prefix

    def __call__(self, study: Any, trial: Any) -> None:
        if trial.value is None:
            return
        metrics = {f"{self.prefix}trial_value": float(trial.value)}
        with contextlib.suppress(ValueError):  # no completed trial yet
            metrics[f"{self.prefix}best_value"] = float(study.best_value)
        self.tracker.log_metrics(metrics, step=trial.number)


def save_study_plots(study: Any, out_dir: Path, params: list[str] | None = None) -> list[Path]:
    """Optimisation history, slices, parameter importances and parallel coordinates as PNG
    (matplotlib) and self-contained HTML (plotly). Plots that cannot be made are skipped with a
    log line (e.g. importances need two completed trials and two parameters)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    import optuna.visualization as vis
    import optuna.visualization.matplotlib as vis_mpl

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with warnings.catch_warnings():  # matplotlib/optuna chatter about few or equal values
        warnings.simplefilter("ignore", UserWarning)
        for name in ("optimization_history", "slice", "param_importances", "parallel_coordinate"):
            kwargs = {} if name == "optimization_history" else {"params": params}
            try:
                ax = getattr(vis_mpl, f"plot_{name}")(study, **kwargs)
                fig = ax.flat[0].figure if hasattr(ax, "flat") else ax.figure
                fig.set_size_inches(10, 5)
                fig.tight_layout()
                fig.savefig(out_dir / f"{name}.png", dpi=90)
                plt.close(fig)
                written.append(out_dir / f"{name}.png")
                getattr(vis, f"plot_{name}")(study, **kwargs).write_html(out_dir / f"{name}.html")
                written.append(out_dir / f"{name}.html")
            except (ValueError, RuntimeError, ZeroDivisionError) as exc:
                log.info("study plot %s skipped: %s", name, exc)
    return written

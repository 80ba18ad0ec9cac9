"""Where studies live: a JournalStorage file (several processes on one host) or an RDB URL
(several hosts, with Optuna's heartbeat), and recovery of trials whose worker died."""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

from pneumoseg.lineage import worker_alive, worker_id
from pneumoseg.paths import in_repo, sqlite_in_repo
from pneumoseg.redact import redact_text

log = logging.getLogger("pneumoseg.studies")
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
    if path.is_file():
        lock.acquire()
        try:
            check_journal(path)
        finally:
            lock.release()
    return JournalStorage(JournalFileBackend(str(path), lock_obj=lock))


class JournalError(ValueError):
    """A journal file with a record that is not JSON (one line naming it and the way out)."""


def check_journal(path: Path) -> None:
    """Drop a torn last record (an append cut short by a kill, which Optuna skips on reading
    but would glue to the next append) and refuse a corrupt record anywhere else: every record
    after it would be unreadable."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with path.open("r+b") as fh:
            fh.truncate(keep)
            os.fsync(fh.fileno())
        log.warning("%s: dropped a torn last record (%d bytes)", path, len(data) - keep)
        data = data[:keep]
    for number, line in enumerate(data.splitlines(), start=1):
        try:
            json.loads(line)
        except ValueError:
            raise JournalError(
                f"{path}: line {number} is not a JSON record; keep the {number - 1} records "
                f"before it with `mv {path} {path}.bad && head -n {number - 1} {path}.bad > "
                f"{path}` (trials recorded after it are lost) or move the file aside to start "
                "the studies afresh"
            ) from None


def open_rdb_storage(url: str, heartbeat: int | None = None) -> Any:
    """An RDBStorage (sqlite/postgresql/mysql URL); with ``heartbeat`` seconds, trials of a dead
    worker are failed and retried once. Connection problems raise one line naming the URL."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {}
    if not url.startswith("sqlite:"):  # a server restart: pooled connections are tested first
        kwargs["engine_kwargs"] = {"pool_pre_ping": True}
    attempt = 0
    while True:
        try:
            with warnings.catch_warnings():  # the heartbeat is "experimental" since Optuna 2
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                if heartbeat is not None:
                    kwargs |= {
                        "heartbeat_interval": heartbeat,
                        "grace_period": 4 * heartbeat,
                        "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(1),
                    }
                storage = RDBStorage(url, **kwargs)
        except Exception as exc:  # sqlalchemy errors, missing drivers
            text, attempt = str(exc), attempt + 1
            if attempt < SCHEMA_ATTEMPTS and any(m in text for m in SCHEMA_RACE):
                time.sleep(0.5 * attempt)  # another worker is creating the tables: use them
                continue
            first = (text.strip().splitlines() or [type(exc).__name__])[0][:300]
            raise RuntimeError(f"Optuna storage {redact_text(url)}: {redact_text(first)}") from None
        if not url.startswith("sqlite:"):
            wait_for_server(storage.engine, url)
        return storage


RECONNECT_SECONDS = 300  # how long a storage call waits for a restarting database server


def wait_for_server(engine: Any, url: str) -> None:
    """New connections of ``engine`` wait up to :data:`RECONNECT_SECONDS` for a database
    server that is down (a restart, a failover) instead of failing the call: with the pool's
    pre-ping, the connections the restart closed are replaced by ones that waited. A call that
    was mid-query when the server went away still fails."""
    from sqlalchemy import event

    where = redact_text(url)

    @event.listens_for(engine, "do_connect")
    def connect(dialect: Any, record: Any, cargs: Any, cparams: Any) -> Any:
        deadline, waited = time.monotonic() + RECONNECT_SECONDS, False
        while True:
            try:
                connection = dialect.connect(*cargs, **cparams)
            except dialect.loaded_dbapi.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise
                if not waited:
                    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                    log.warning(
                        "Optuna storage %s is unreachable (%s); waiting up to %d s for it",
                        where, redact_text(first), RECONNECT_SECONDS,
                    )  # fmt: skip
                    waited = True
                time.sleep(1.0)
                continue
            if waited:
                log.warning("Optuna storage %s is back; the study goes on", where)
            return connection


# Workers started together on an empty database race to create Optuna's tables; the loser sees
# one of these errors and retries, finding the tables made.
SCHEMA_RACE = ("duplicate key value", "already exists", "UniqueViolation")
SCHEMA_ATTEMPTS = 4


UNOWNED_GRACE_SECONDS = 120  # a RUNNING trial without an owner this old is stale
OWNER_ATTR = "worker"  # trial user attribute: the worker_id() of the process running it
WORKER_PREFIX = "worker:"  # study user attribute per worker process: {"started", "done"}


def register_worker(study: Any, worker: str) -> None:
    """Record in the study that ``worker`` runs trials (before it creates any)."""
    study.set_user_attr(WORKER_PREFIX + worker, {"started": time.time(), "done": False})


def unregister_worker(study: Any, worker: str) -> None:
    info = dict(study.user_attrs.get(WORKER_PREFIX + worker, {}))
    study.set_user_attr(WORKER_PREFIX + worker, info | {"done": True, "ended": time.time()})


def live_workers(study: Any) -> list[str]:
    """The registered workers not done and not known dead, oldest first (``worker:<id>``)."""
    live = []
    for key, info in study.user_attrs.items():
        if not key.startswith(WORKER_PREFIX) or info.get("done"):
            continue
        if worker_alive(key.removeprefix(WORKER_PREFIX)) is not False:
            live.append((info.get("started", 0.0), key))
    return [k for _, k in sorted(live)]


def stale_trials(study: Any) -> list[Any]:
    """The RUNNING trials whose worker process is gone from this host; trials of other hosts
    are left to the RDB heartbeat. A trial without an owner yet (its worker was killed between
    creating it and naming itself) is stale when no other registered worker lives, else once
    it started over :data:`UNOWNED_GRACE_SECONDS` ago."""
    from optuna.trial import TrialState

    now, me = time.time(), WORKER_PREFIX + worker_id()
    stale = []
    orphans_possible = None  # computed once, when an unowned trial is met
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get(OWNER_ATTR)
        if owner:
            if worker_alive(owner) is not False:
                continue
        else:
            if orphans_possible is None:  # this process runs no trial while it checks
                orphans_possible = not [w for w in live_workers(study) if w != me]
            young = t.datetime_start and now - t.datetime_start.timestamp() < UNOWNED_GRACE_SECONDS
            if young and not orphans_possible:
                continue
        stale.append(t)
    return stale


def fail_stale_trials(study: Any) -> list[Any]:
    """Mark :func:`stale_trials` FAILED (``Study.tell``); returns them."""
    from optuna.trial import TrialState

    stale = stale_trials(study)
    for t in stale:
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
    if stale:
        log.warning(
            "optuna: %d trial(s) of %s were left RUNNING by a dead worker; marked FAILED",
            len(stale),
            study.study_name,
        )
    return stale

"""MLflow tracking that never kills the work, plus lineage (git, data hash, DVC experiment).

- The one place that resolves the tracking store (:func:`tracking_uri`), names and creates
  experiments (:func:`experiment_name`, :func:`ensure_experiment`) and tags runs
  (:func:`pneumoseg.lineage.lineage_tags`).
- Three experiments per project: ``mlflow.experiment`` holds one row per pipeline result (stage
  ``result``: what a person compares), ``<experiment>-stages`` the stage runs it links to
  (fold trainings, thresholds, evaluate, register), ``<experiment>-studies`` the Optuna studies.
- :class:`Tracker`: one run, resumable by id. Every call is guarded: a failing backend pauses
  tracking with a warning (the local files stay the record) until :meth:`Tracker.reconnect`.
  :meth:`Tracker.log_rows` logs per-epoch rows exactly once per step, also across a kill and
  resume (it asks the run which steps it already holds).
- A local sqlite store is shared by concurrent processes (``dvc queue start -j 2``, study
  workers) through :func:`pneumoseg.locks.store_lock`, so none fails with "database is locked".
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from pneumoseg.lineage import lineage_tags, source_tags, worker_alive, worker_id
from pneumoseg.locks import store_lock
from pneumoseg.params import MlflowParams
from pneumoseg.paths import has_scheme, in_repo, sqlite_in_repo
from pneumoseg.redact import redact, redact_text

log = logging.getLogger(__name__)
MAX_VALUE = 6000  # MLflow's limit for a param value
WORKER_TAG = "pneumoseg.worker"  # host:pid:start of the process that runs the run


def tracking_uri(cfg: MlflowParams) -> str:
    """``MLFLOW_TRACKING_URI`` if set (as given), else ``mlflow.tracking_uri`` with a relative
    sqlite path resolved against the repo root (see :mod:`pneumoseg.paths`)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or sqlite_in_repo(cfg.tracking_uri)


def artifact_location(cfg: MlflowParams, uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: ``mlflow.artifact_location`` under the repo
    root for a store without a server (sqlite, a database URL), None (the server decides) for a
    tracking server."""
    if uri.startswith(("http://", "https://", "databricks")) or not cfg.artifact_location:
        return None
    location = cfg.artifact_location
    return location if has_scheme(location) else in_repo(location).resolve().as_uri()


EXPERIMENT_KINDS = ("results", "stages", "studies")


def experiment_name(cfg: MlflowParams, kind: str = "stages") -> str:
    """The experiment of ``kind``: ``results`` is ``mlflow.experiment`` itself (one row per
    pipeline result), ``stages`` and ``studies`` are ``<experiment>-stages`` / ``-studies``."""
    if kind not in EXPERIMENT_KINDS:
        raise ValueError(f"experiment kind must be one of {EXPERIMENT_KINDS}, got {kind!r}")
    return cfg.experiment if kind == "results" else f"{cfg.experiment}-{kind}"


# The experiment's kind for MLflow 3's UI (model training, not GenAI). In 3.17 the UI's view
# switch is still a per-browser setting that starts on GenAI (README "Tracking with MLflow").
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def ensure_experiment(client: Any, cfg: MlflowParams, uri: str, name: str | None = None) -> str:
    """The id of experiment ``name`` (default ``mlflow.experiment``), created if missing with
    :func:`artifact_location` as a model-development experiment (an existing one without a
    kind gets it); safe when another process creates it at the same time. The results
    experiment is created first, so that on a new store it gets the first id (the README's
    link ``#/experiments/1``)."""
    name = name or cfg.experiment
    if name != cfg.experiment:
        _ensure_one(client, cfg, uri, cfg.experiment)
    return _ensure_one(client, cfg, uri, name)


def _ensure_one(client: Any, cfg: MlflowParams, uri: str, name: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return str(exp.experiment_id)
    try:
        return str(
            client.create_experiment(
                name,
                artifact_location=artifact_location(cfg, uri),
                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
            )
        )
    except MlflowException:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return str(exp.experiment_id)


@contextlib.contextmanager
def scoped_env(**values: str | None) -> Iterator[None]:
    """Set (or, with None, unset) environment variables for the block, then restore them."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def using_tracking_uri(uri: str) -> Iterator[None]:
    """Point mlflow's fluent API at ``uri`` for the block, then restore the previous state
    (``mlflow.set_tracking_uri`` also sets ``MLFLOW_TRACKING_URI`` in ``os.environ``)."""
    import mlflow

    with scoped_env(
        MLFLOW_TRACKING_URI=os.environ.get("MLFLOW_TRACKING_URI"),
        MLFLOW_REGISTRY_URI=os.environ.get("MLFLOW_REGISTRY_URI"),
    ):
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
            mlflow.set_registry_uri(None)  # type: ignore[arg-type]


@contextlib.contextmanager
def fluent_run(uri: str, run_id: str | None) -> Iterator[None]:
    """mlflow's fluent API on an existing run (for ``mlflow.pyfunc.log_model``)."""
    import mlflow

    with using_tracking_uri(uri), mlflow.start_run(run_id=run_id):
        yield


# Files uploaded as text pass the redactor (PNGs and model files hold no text to leak).
TEXT_ARTIFACTS = (".json", ".csv", ".yaml", ".yml", ".txt", ".md", ".html", ".log", ".toml")

# Retried at every epoch end, not by MLflow's ~4 minutes of retries per call; the user's wins.
RETRY_LATER_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


class Tracker:
    """One MLflow run, resumable by id. A failing backend pauses tracking with a warning; the
    work goes on and :meth:`reconnect` (called by training at every epoch end) resumes it once
    the store answers again: a run that could not be created is created then, with its params.

    Every run it creates carries :func:`lineage_tags`; params, tags and text artifacts pass
    through :func:`pneumoseg.redact.redact` (no URL password reaches MLflow). Runs go to the
    stages experiment unless ``experiment`` names another (:func:`experiment_name`).
    """

    def __init__(
        self,
        cfg: MlflowParams,
        enabled: bool = True,
        experiment: str | None = None,
        retry_later: bool = False,
    ) -> None:
        if retry_later and enabled:  # the caller calls reconnect() again and again
            for key, value in RETRY_LATER_ENV.items():
                os.environ.setdefault(key, value)
        self.cfg = cfg
        self.experiment = experiment or experiment_name(cfg, "stages")
        self.enabled = enabled
        self.client: Any = None
        self.uri = ""
        self.run_id: str | None = None
        self.failed = False  # the store stopped answering (until a reconnect succeeds)
        self.missed = False  # a call was lost: the run is incomplete unless backfilled
        self._logged_steps: set[int] | None = None  # steps of log_rows already in the run
        self._pending: tuple[str, dict[str, str]] | None = None  # a run not created yet
        self._pending_params: dict[str, Any] = {}
        self._system: Any = None  # MLflow's SystemMetricsMonitor while it runs

    def _fail(self, what: str, exc: Exception) -> None:
        self.missed = True
        if not self.failed:
            first = redact_text(str(exc).splitlines()[0] if str(exc) else "")
            hint = (
                "the work goes on, the local files (plots/, metrics/, models/) keep the record "
                "and training resumes tracking when the store answers; if it stays away, "
                "`pneumoseg upload --fold K` completes a fold's run (other stages: rerun them, "
                "`dvc repro -f -s <stage>`)"
            )
            log.warning("MLflow %s failed (%s: %s); %s", what, type(exc).__name__, first, hint)
        self.failed = True

    @property
    def active(self) -> bool:
        return self.enabled and not self.failed and self.run_id is not None

    @property
    def complete(self) -> bool:
        """The run exists and holds everything logged so far (no call was lost for good)."""
        return self.run_id is not None and not self.failed and not self.missed

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run one ``MlflowClient`` method under the store lock; a failure pauses tracking."""
        if not self.active:
            return None
        try:
            with store_lock(self.uri):
                return getattr(self.client, method)(*args, **kwargs)
        except Exception as exc:
            self._fail(method, exc)
            return None

    def start(
        self,
        run_name: str,
        tags: dict[str, str],
        run_id: str | None = None,
        reuse_tag: str | None = None,
    ) -> str | None:
        """Create a run (or reopen ``run_id``, or with ``reuse_tag`` the run of the experiment
        whose tag of that name has this ``tags`` value: a rerun after a kill makes no second
        run); returns the run id or None if tracking failed (:meth:`reconnect` then creates it
        later)."""
        if not self.enabled:
            return None
        self._pending = None if run_id else (run_name, tags)
        try:
            from mlflow.tracking import MlflowClient

            self.uri = tracking_uri(self.cfg)
            self.client = MlflowClient(tracking_uri=self.uri)
            with store_lock(self.uri):
                if run_id is None and reuse_tag is not None:
                    exp_id = ensure_experiment(self.client, self.cfg, self.uri, self.experiment)
                    query = f"tags.`{reuse_tag}` = '{tags[reuse_tag]}'"
                    hits = self.client.search_runs([exp_id], query, max_results=1)
                    run_id = hits[0].info.run_id if hits else None
                if run_id is not None:
                    self.run_id = run_id
                    self._logged_steps = None
                    self.client.update_run(run_id, status="RUNNING")
                    self.client.set_tag(run_id, WORKER_TAG, worker_id())
                    return run_id
                exp_id = ensure_experiment(self.client, self.cfg, self.uri, self.experiment)
                self._end_dead_runs(exp_id, tags.get("stage"))
                lineage = lineage_tags()
                standard = source_tags(lineage, tags.get("stage") or run_name)
                all_tags = {**standard, **lineage, WORKER_TAG: worker_id(), **tags}
                run = self.client.create_run(exp_id, run_name=run_name, tags=redact(all_tags))
            self.run_id = run.info.run_id
            self._pending = None
            self._logged_steps = set()
        except Exception as exc:
            self._fail("start", exc)
            return None
        return self.run_id

    def _end_dead_runs(self, exp_id: str, stage: str | None) -> None:
        """Mark KILLED the runs of this stage left RUNNING by a process of this host that died
        (a kill -9); a killed training's run is reopened by its rerun all the same."""
        if not stage:
            return
        query = f"attributes.status = 'RUNNING' and tags.stage = '{stage}'"
        for run in self.client.search_runs([exp_id], filter_string=query, max_results=200):
            if worker_alive(run.data.tags.get(WORKER_TAG, "")) is False:
                self.client.set_terminated(run.info.run_id, status="KILLED")
                log.info("MLflow run %s, left RUNNING by a dead process: KILLED", run.info.run_id)

    def linked_run(self, run_id: str) -> Any:
        """Another run of the store (``mlflow.entities.Run``), or None when it does not exist
        (deleted, another store) or tracking is off; a failing store pauses tracking."""
        if not self.active:
            return None
        from mlflow.exceptions import MlflowException

        try:
            with store_lock(self.uri):
                return self.client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            self._fail("get_run", exc)
        except Exception as exc:
            self._fail("get_run", exc)
        return None

    def set_experiment_tag(self, key: str, value: str) -> None:
        """A tag of this run's experiment (e.g. a saved view of the UI)."""
        run = self.linked_run(self.run_id) if self.run_id else None
        if run is not None:
            self._call("set_experiment_tag", run.info.experiment_id, key, value)

    def set_version_tag(self, name: str, version: str, key: str) -> None:
        """Tag model version ``name``/``version`` with this run's id under ``key``."""
        self._call("set_model_version_tag", name, version, key, self.run_id)

    def metric_history(self, run_id: str, key: str) -> list[Any]:
        """The logged values of metric ``key`` of run ``run_id`` ([] when none)."""
        return list(self._call("get_metric_history", run_id, key) or [])

    def reconnect(self) -> bool:
        """After a failure, try the store once more: create the run that could not be created
        (with the params logged meanwhile) or check that the run answers; rows missed since
        are then logged by :meth:`log_rows`. Returns whether tracking is on."""
        if not self.enabled or not self.failed:
            return self.active
        self.failed = False
        if self.run_id is None and self._pending is not None:
            if self.start(*self._pending) is None:
                return False
            params, self._pending_params = self._pending_params, {}
            self.log_params(params)
        elif self.run_id is not None:
            if self._call("update_run", self.run_id, status="RUNNING") is None and self.failed:
                return False
            self._logged_steps = None  # ask the run which rows it holds
        if self.active:  # what training lost meanwhile were rows, which log_rows backfills
            self.missed = False
            log.info("MLflow answers again; tracking resumes in run %s", self.run_id)
        return self.active

    def incomplete_record(self, stage: str) -> dict[str, bool]:
        """What a stage's metrics file adds when its run was never created or misses part of
        the record: ``{"mlflow_incomplete": True}``, with one warning naming the way out; {}
        for a complete run (or tracking switched off)."""
        if not self.enabled or self.complete:
            return {}
        what = "was never created" if self.run_id is None else f"{self.run_id} is incomplete"
        log.warning(
            "%s: its MLflow run %s; the local files are complete: once the store answers, "
            "`dvc repro -f -s %s` records it (the same outputs again)",
            stage,
            what,
            stage,
        )
        return {"mlflow_incomplete": True}

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params in batches of 100 (MLflow's limit per call); kept for the run when it
        could not be created yet."""
        if not self.active:
            if self.enabled and self.run_id is None and self._pending is not None:
                self._pending_params.update(params)
            return
        from mlflow.entities import Param

        items = [Param(k, redact(str(v))[:MAX_VALUE]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._call("log_batch", self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """One batched call per step."""
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._call("log_batch", self.run_id, metrics=items)

    def log_metrics_once(self, metrics: dict[str, float], step: int) -> None:
        """:meth:`log_metrics`, leaving out the keys the run holds at ``step`` already (a rerun
        after a kill between logging a record and writing its file logs nothing twice)."""
        if not self.active:
            return
        held = {
            key
            for key in metrics
            if any(m.step == step for m in self._call("get_metric_history", self.run_id, key) or [])
        }
        if not self.active:
            return
        fresh = {k: v for k, v in metrics.items() if k not in held}
        if fresh:
            self.log_metrics(fresh, step)

    def log_rows(
        self,
        rows: list[dict[str, Any]],
        sentinel: str = "train_loss",
        step_key: str = "epoch",
        skip: tuple[str, ...] = ("epoch", "part"),
    ) -> None:
        """Log every row (one step each) that the run does not hold yet, exactly once.

        A reopened run is asked once which steps of ``sentinel`` (a key of every row; the
        default suits training histories) it holds, so rows logged before a kill are not
        logged again and rows saved but never logged are logged now."""
        if not self.active:
            return
        if self._logged_steps is None:
            history = self._call("get_metric_history", self.run_id, sentinel)
            if history is None:
                return
            self._logged_steps = {int(m.step) for m in history}
        for row in rows:
            step = int(row[step_key])
            if step in self._logged_steps:
                continue
            self.log_metrics({k: v for k, v in row.items() if k not in skip}, step=step)
            if not self.active:
                return
            self._logged_steps.add(step)

    def set_tags(self, tags: dict[str, str]) -> None:
        if not self.active:
            return
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in redact(tags).items()]
        self._call("log_batch", self.run_id, tags=items)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file; a text file (:data:`TEXT_ARTIFACTS`) goes through the redactor first
        (a redacted copy is uploaded under the same name when it held a secret)."""
        if not self.active:
            return
        path = Path(path)
        if path.suffix.lower() in TEXT_ARTIFACTS and path.is_file():
            text = path.read_text(errors="replace")
            clean = redact_text(text)
            if clean != text:
                import tempfile

                with tempfile.TemporaryDirectory(prefix="pneumoseg-redacted-") as tmp:
                    copy = Path(tmp) / path.name
                    copy.write_text(clean)
                    self._call("log_artifact", self.run_id, str(copy), artifact_path)
                return
        self._call("log_artifact", self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call("log_text", self.run_id, redact(text), artifact_file)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        """A JSON or YAML artifact (by the file's suffix), redacted."""
        yml = artifact_file.endswith((".yaml", ".yml"))
        text = (
            yaml.safe_dump(data, sort_keys=False)
            if yml
            else json.dumps(data, indent=2, sort_keys=True) + "\n"
        )
        self.log_text(text, artifact_file)

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """Rows as an MLflow table (``log_table``: the UI shows it sortable under Artifacts);
        string cells pass through the redactor like every text artifact."""
        if not self.active:
            return
        import pandas as pd

        frame = pd.DataFrame([redact(row) for row in rows])
        self._call("log_table", self.run_id, data=frame, artifact_file=artifact_file)

    def log_datasets(self, datasets: list[dict[str, str]]) -> None:
        """Data sets as the run's inputs (the UI's "Datasets used"): ``name``, ``source`` (a
        path), ``digest`` (e.g. DVC's md5) and ``context`` each (:func:`lineage.dataset_inputs`)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [
            DatasetInput(
                Dataset(
                    name=d["name"],
                    digest=d["digest"][:36],  # MLflow's column width; DVC's md5 fits
                    source_type="local",
                    source=json.dumps({"uri": d["source"]}),
                ),
                tags=[InputTag("mlflow.data.context", d["context"])],
            )
            for d in datasets
        ]
        self._call("log_inputs", self.run_id, datasets=inputs)

    def monitor_system(self, resume: bool = False) -> None:
        """MLflow's system metrics for this run until :meth:`end`: ``system/cpu_utilization_
        percentage``, memory, disk, network and, with ``nvidia-ml-py``, GPU (runs made through
        ``MlflowClient`` do not get them from MLflow's switch). ``resume``: continue the steps
        of a reopened run. Off with ``mlflow.system_metrics: false``."""
        if not (self.cfg.system_metrics and self.active) or self._system is not None:
            return
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start chatter
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(
                self.run_id, resume_logging=resume, tracking_uri=self.uri
            )
        except Exception as exc:  # psutil missing, a store that stopped answering
            log.warning("MLflow system metrics are off for this run: %s", redact_text(str(exc)))
            return
        monitor.start()
        self._system = monitor

    def end(self, status: str = "FINISHED") -> None:
        if self._system is not None:
            self._system.finish()  # its last samples, before the run is closed
            self._system = None
        self._call("set_terminated", self.run_id, status=status)

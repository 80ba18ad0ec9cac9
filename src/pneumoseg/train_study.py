"""``pneumoseg study run|show|apply NAME``: Optuna studies over training params.

A study is declared in ``params.yaml`` under ``studies.<NAME>`` (see :class:`StudyParams`): a
search space of params paths (``train.parts[0].loss.bce``), a reduced training ``budget`` applied
to every trial, the folds and validation metric of the objective, sampler, pruner and storage.

- ``run``: each trial trains the chosen folds with the real training code (``FoldTrainer``) in its
  own folder under ``work_dir``, reports the metric every epoch (``trial.report``) and is pruned
  early when the pruner says so. Runs continue the stored study up to ``trials`` finished
  (complete + pruned) trials; several workers (processes or hosts) can share one study.
  A worker killed mid-trial leaves a RUNNING trial; the next worker to start marks it FAILED
  (its process is gone) and enqueues its params once more.
- MLflow: one parent run per study in the ``<experiment>-studies`` experiment (study plots,
  trial values), one nested run per trial (its params, per-epoch metric per fold, value), and the
  fold runs of the training code nested under the trial run.
- ``show``: trials table, best trial, parameter importances (``--json`` for scripts).
- ``apply``: writes the best trial's values into ``params.yaml`` in place (comments and order
  kept), or ``--exp`` runs ``dvc exp run -S ...`` with them.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import math
import os
import re
import shutil
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pneumoseg.params import (
    MISSING,
    Distribution,
    Params,
    ParamsError,
    StudyParams,
    format_validation_error,
    get_path,
    set_path,
)
from pneumoseg.redact import redact_text
from pneumoseg.studies import (
    MlflowTrialLogger,
    open_storage,
    resolve_storage,
    save_study_plots,
    worker_alive,
    worker_id,
)
from pneumoseg.tracking import Tracker

log = logging.getLogger(__name__)
HEARTBEAT_SECONDS = 30  # RDB storages: Optuna's trial heartbeat
MAX_FAILED_IN_A_ROW = 3
UNOWNED_GRACE_SECONDS = 120  # a RUNNING trial without an owner this old is stale


def study_config(params: Params, name: str) -> StudyParams:
    """The ``studies.<name>`` section, or a one-line error listing the defined studies."""
    if name not in params.studies:
        known = ", ".join(sorted(params.studies)) or "none"
        raise ValueError(f"params.yaml: studies.{name}: no such study (defined: {known})")
    return params.studies[name]


def mlflow_key(path: str) -> str:
    """``train.parts[0].lr`` -> ``train.parts.0.lr`` (MLflow keys and ``dvc exp run -S``)."""
    return re.sub(r"\[(\d+)\]", r".\1", path)


def parse_duration(text: str | float | None) -> float | None:
    """Seconds from ``3600``, ``90s``, ``30m``, ``2h`` or ``1.5h`` (None stays None)."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else float(text)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not m:
        raise ValueError(f"--timeout {text!r}: use seconds or a number with s, m or h (e.g. 2h)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def space_digest(cfg: StudyParams) -> str:
    """What makes trials comparable: space, budget, folds, metric and direction."""
    keys = {"space", "parts", "budget", "folds", "metric", "direction"}
    blob = cfg.model_dump(mode="json", include=keys)
    import hashlib

    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------ sampling
def suggest(trial: Any, path: str, dist: Distribution) -> Any:
    """One value of ``path`` from the trial (the Optuna param is named by the path)."""
    if dist.type == "categorical":
        return trial.suggest_categorical(path, dist.choices)
    assert dist.low is not None and dist.high is not None
    if dist.type == "int":
        step = int(dist.step or 1)
        return trial.suggest_int(path, int(dist.low), int(dist.high), step=step, log=dist.log)
    return trial.suggest_float(path, dist.low, dist.high, step=dist.step, log=dist.log)


def make_sampler(cfg: StudyParams, seed: int) -> Any:
    """TPE (multivariate), random, grid (every combination) or CMA-ES, seeded."""
    import optuna

    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if cfg.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if cfg.sampler == "grid":
        grid: dict[str, list[Any]] = {}
        for path, d in cfg.space.items():
            if d.type == "categorical":
                grid[path] = list(d.choices or [])
            elif d.type == "int":
                grid[path] = list(range(int(d.low or 0), int(d.high or 0) + 1, int(d.step or 1)))
            elif d.step is not None:
                n = int(math.floor(((d.high or 0) - (d.low or 0)) / d.step + 1e-9))
                grid[path] = [round((d.low or 0) + i * d.step, 10) for i in range(n + 1)]
            else:
                raise ValueError(f"studies: sampler grid: {path} needs a step or choices")
        return optuna.samplers.GridSampler(grid, seed=seed)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True)


def make_pruner(cfg: StudyParams) -> Any:
    import optuna

    p = cfg.pruner
    if p.name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=p.startup_trials, n_warmup_steps=p.warmup_epochs
        )
    if p.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1)
    return optuna.pruners.NopPruner()


def trial_selection(params: Params) -> dict[str, Any]:
    """The images that score a study's trials: the pipeline's ``train.selection``, except that
    a pipeline without one (``mode: none``) gets the inner split (a trial needs a score)."""
    sel = params.train.selection
    return {
        "mode": "inner" if sel.mode == "none" else sel.mode,
        "inner_fraction": sel.inner_fraction,
    }


def trial_params(
    params: Params, cfg: StudyParams, values: dict[str, Any], trial_dir: Path, experiment: str
) -> Params:
    """The params of one trial: ``params`` (its first ``cfg.parts`` parts) + the study budget +
    the trial's values, training only ``cfg.folds`` and writing into ``trial_dir`` (never the
    pipeline's outputs)."""
    raw = params.model_dump(mode="json", exclude={"studies"}) | {"studies": {}}
    raw["train"]["parts"] = raw["train"]["parts"][: cfg.parts]
    for path, value in [*cfg.budget.items(), *values.items()]:
        set_path(raw, path, value)
    raw["train"]["folds"] = list(cfg.folds)
    raw["train"]["selection"] = trial_selection(params)
    for key in ("models_dir", "work_dir", "metrics_dir", "plots_dir"):
        raw["train"][key] = str(trial_dir / key.removesuffix("_dir"))
    raw["mlflow"]["experiment"] = experiment
    from pydantic import ValidationError

    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        first = format_validation_error(err, "trial params").splitlines()[0]
        raise ParamsError(first) from None


# ------------------------------------------------------------------------------- the run
def close_child_runs(tracker: Tracker, status: str) -> None:
    """End the RUNNING MLflow runs nested under the tracker's run with ``status``."""
    if not tracker.active:
        return
    with contextlib.suppress(Exception):
        exp = tracker.client.get_run(tracker.run_id).info.experiment_id
        query = f"tags.mlflow.parentRunId = '{tracker.run_id}' and attributes.status = 'RUNNING'"
        for run in tracker.client.search_runs([exp], query):
            tracker.client.set_terminated(run.info.run_id, status=status)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (released by the OS when the process dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class StudyRunner:
    """One worker of a study (see the module docstring)."""

    def __init__(
        self,
        params: Params,
        name: str,
        storage: str | None = None,
        progress: bool = True,
    ) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.params = params
        self.name = name
        self.cfg = study_config(params, name)
        self.progress = progress
        self.storage_url = resolve_storage(storage or self.cfg.storage)
        self.storage = open_storage(self.storage_url, heartbeat=HEARTBEAT_SECONDS)
        self.experiment = f"{params.mlflow.experiment}-studies"
        self.mlflow_cfg = params.mlflow.model_copy(update={"experiment": self.experiment})
        self.work = Path(self.cfg.work_dir) / name
        self.worker = worker_id()
        self.study = optuna.create_study(
            study_name=name,
            storage=self.storage,
            direction=self.cfg.direction,
            load_if_exists=True,
        )
        self._check_space()
        self.seed = self.cfg.seed + self._register_worker()
        self.study.sampler = make_sampler(self.cfg, self.seed)
        self.study.pruner = make_pruner(self.cfg)
        self.parent = Tracker(self.mlflow_cfg)
        self.trial_logger = MlflowTrialLogger(self.parent)

    # ---------------------------------------------------------------- study bookkeeping
    def _check_space(self) -> None:
        digest = space_digest(self.cfg)
        stored = self.study.user_attrs.get("space_digest")
        if stored is None:
            self.study.set_user_attr("space_digest", digest)
            self.study.set_user_attr("metric", self.cfg.metric)
            self.study.set_user_attr("space", sorted(self.cfg.space))
            selection = trial_selection(self.params) | {"seed": self.params.train.seed}
            self.study.set_user_attr("selection", selection | {"folds": list(self.cfg.folds)})
        elif stored != digest:
            raise ValueError(
                f"study {self.name}: the stored study was run with another space, budget, folds "
                f"or metric (in {redact_text(self.storage_url)}); give the changed study a new "
                "name in params.yaml"
            )

    def _live_workers(self) -> list[str]:
        attrs = self.study.user_attrs
        live = []
        for key, info in attrs.items():
            if not key.startswith("worker:") or info.get("done"):
                continue
            if worker_alive(key.removeprefix("worker:")) is not False:
                live.append((info.get("started", 0.0), key))
        return [k for _, k in sorted(live)]

    def _register_worker(self) -> int:
        """Record this worker; its index among the live workers offsets the sampler seed (so
        parallel workers do not draw the same values; a lone worker always gets index 0)."""
        key = f"worker:{self.worker}"
        with file_lock(self._lock_path()):  # workers on this host register one at a time
            self.study.set_user_attr(key, {"started": time.time(), "done": False})
            live = self._live_workers()
        return live.index(key) if key in live else 0

    def _lock_path(self) -> Path:
        return Path(self.cfg.work_dir) / f".{self.name}.lock"

    def _unregister_worker(self) -> None:
        key = f"worker:{self.worker}"
        info = dict(self.study.user_attrs.get(key, {}))
        self.study.set_user_attr(key, info | {"done": True, "ended": time.time()})

    def recover_dead_trials(self) -> int:
        """Fail RUNNING trials whose worker process is gone (same host), end their MLflow runs,
        delete their files and enqueue their params once more. Returns how many."""
        from optuna.trial import TrialState

        n = 0
        now = time.time()
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            owner = t.user_attrs.get("worker")
            if owner:
                if worker_alive(owner) is not False:
                    continue
            elif t.datetime_start and now - t.datetime_start.timestamp() < UNOWNED_GRACE_SECONDS:
                continue
            self.study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
            self._end_trial_runs(t.user_attrs.get("mlflow_run_id"))
            shutil.rmtree(self.work / f"trial-{t.number}", ignore_errors=True)
            retry = not t.user_attrs.get("retry_of")
            if retry and t.params:
                self.study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
            log.warning(
                "study %s: trial %d was left RUNNING by a dead worker; marked FAILED%s",
                self.name,
                t.number,
                " and queued again" if retry and t.params else "",
            )
            n += 1
        return n

    def _end_trial_runs(self, run_id: str | None) -> None:
        """Mark a dead trial's MLflow run and its RUNNING fold runs FAILED."""
        if not run_id:
            return
        tracker = Tracker(self.mlflow_cfg)
        if tracker.start("", {}, run_id) is None:
            return
        close_child_runs(tracker, "FAILED")
        tracker.end("FAILED")

    def _counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.study.get_trials(deepcopy=False):
            counts[t.state.name] = counts.get(t.state.name, 0) + 1
        return counts

    def _start_parent(self) -> None:
        """The study's parent MLflow run: created once per study (under a lock so two workers
        starting together agree), reopened by every worker."""
        with file_lock(self._lock_path()):
            run_id = self.study.user_attrs.get("mlflow_parent_run_id")
            tags = {
                "stage": "study",
                "optuna_study": self.name,
                "optuna_storage": redact_text(self.storage_url),
            }
            self.parent.start(f"study-{self.name}", tags, run_id)
            if self.parent.run_id and self.parent.run_id != run_id:
                self.study.set_user_attr("mlflow_parent_run_id", self.parent.run_id)
                self.parent.log_params(
                    {
                        "sampler": self.cfg.sampler,
                        "seed": self.cfg.seed,
                        "pruner": self.cfg.pruner.name,
                        "metric": self.cfg.metric,
                        "direction": self.cfg.direction,
                        "folds": self.cfg.folds,
                        **{f"budget.{mlflow_key(k)}": v for k, v in self.cfg.budget.items()},
                        **{
                            f"space.{mlflow_key(k)}": json.dumps(d.model_dump(exclude_none=True))
                            for k, d in self.cfg.space.items()
                        },
                    }
                )

    # --------------------------------------------------------------------- the objective
    def objective(self, trial: Any) -> float:
        """Train the study's folds with the trial's values; the mean final validation metric."""
        import optuna

        from pneumoseg.training.trainer import FoldTrainer

        trial.set_user_attr("worker", self.worker)
        values = {path: suggest(trial, path, d) for path, d in self.cfg.space.items()}
        trial_dir = self.work / f"trial-{trial.number}"
        params = trial_params(self.params, self.cfg, values, trial_dir, self.experiment)
        tracker = Tracker(self.mlflow_cfg)
        tags = {
            "stage": "study-trial",
            "optuna_study": self.name,
            "optuna_trial": str(trial.number),
        }
        if self.parent.run_id:
            tags["mlflow.parentRunId"] = self.parent.run_id
        run_id = tracker.start(f"{self.name}-trial-{trial.number}", tags)
        if run_id:
            trial.set_user_attr("mlflow_run_id", run_id)
        tracker.log_params(
            {"trial_number": trial.number, **{mlflow_key(k): v for k, v in values.items()}}
        )
        metric = self.cfg.metric
        epochs = sum(p.epochs for p in params.train.parts)
        finals: list[float] = []
        status = "FAILED"
        try:
            for i, fold in enumerate(self.cfg.folds):

                def report(row: dict[str, Any], i: int = i, fold: int = fold) -> None:
                    if metric not in row:
                        raise ValueError(
                            f"params.yaml: studies.{self.name}.metric: {metric!r} is not a "
                            f"validation metric (one of "
                            f"{', '.join(k for k in row if k.startswith('val_'))})"
                        )
                    value = float(row[metric])
                    tracker.log_metrics({f"fold{fold}_{metric}": value}, step=row["epoch"])
                    trial.report(value, step=i * epochs + row["epoch"])
                    if trial.should_prune():
                        raise optuna.TrialPruned(f"pruned at fold {fold} epoch {row['epoch']}")

                trainer = FoldTrainer(
                    params,
                    fold,
                    progress=self.progress,
                    parent_run_id=run_id,
                    on_epoch=report,
                    log_model=False,
                )
                result = trainer.run()
                finals.append(float(result["final"][metric]))
                tracker.log_metrics({f"fold{fold}_final_{metric}": finals[-1]}, step=trial.number)
            value = sum(finals) / len(finals)
            tracker.log_metrics({"objective": value}, step=trial.number)
            status = "FINISHED"
            return value
        except optuna.TrialPruned:
            status = "KILLED"
            tracker.set_tags({"optuna_state": "PRUNED"})
            raise
        finally:
            if status != "FINISHED":  # e.g. Ctrl-C inside a fold's training
                close_child_runs(tracker, status)
            tracker.end(status)
            shutil.rmtree(trial_dir, ignore_errors=True)

    def after_trial(self, study: Any, trial: Any) -> None:
        """Parent run: trial value, best so far, state counts and fresh study plots."""
        self.trial_logger(study, trial)
        counts = self._counts()
        self.parent.log_metrics(
            {f"trials_{k.lower()}": float(v) for k, v in counts.items()}, step=trial.number
        )
        best = self._best()
        if best is not None:
            self.parent.set_tags({"best_trial": str(best.number), "best_value": f"{best.value}"})
        if self.parent.active:
            plots_dir = self.work / f"plots-{os.getpid()}"  # one folder per worker process
            plots = save_study_plots(study, plots_dir, sorted(self.cfg.space))
            for path in plots:
                self.parent.log_artifact(path, "plots")
        value = "-" if trial.value is None else f"{trial.value:.4f}"
        log.info(
            "study %s: trial %d %s value %s; best %s; %d/%d finished",
            self.name,
            trial.number,
            trial.state.name,
            value,
            "-" if best is None else f"{best.value:.4f} (trial {best.number})",
            counts.get("COMPLETE", 0) + counts.get("PRUNED", 0),
            self.target,
        )

    def _best(self) -> Any:
        with contextlib.suppress(ValueError):
            return self.study.best_trial
        return None

    def run(self, trials: int | None = None, timeout: float | None = None) -> dict[str, Any]:
        """Run trials until the study holds ``trials`` finished trials (or ``timeout``)."""
        from optuna.trial import TrialState

        self.target = trials or self.cfg.trials
        timeout = timeout if timeout is not None else self.cfg.timeout
        deadline = time.monotonic() + timeout if timeout else math.inf
        self._start_parent()
        ran = failed_in_a_row = 0
        try:
            while time.monotonic() < deadline:
                self.recover_dead_trials()
                counts = self._counts()
                finished = counts.get("COMPLETE", 0) + counts.get("PRUNED", 0)
                if finished + counts.get("RUNNING", 0) >= self.target:
                    break
                before = len(self.study.get_trials(deepcopy=False))
                self.study.optimize(
                    self.objective,
                    n_trials=1,
                    catch=(ParamsError,),
                    callbacks=[self.after_trial],
                    gc_after_trial=True,
                )
                ran += 1
                mine = self.study.get_trials(deepcopy=False)[before:]
                mine = [t for t in mine if t.user_attrs.get("worker") == self.worker]
                if mine and mine[-1].state == TrialState.FAIL:
                    failed_in_a_row += 1
                    if failed_in_a_row >= MAX_FAILED_IN_A_ROW:
                        raise RuntimeError(
                            f"study {self.name}: {failed_in_a_row} trials in a row failed; "
                            "see the warnings above"
                        )
                else:
                    failed_in_a_row = 0
        finally:
            self._unregister_worker()
            self.parent.end("FINISHED")
            shutil.rmtree(self.work / f"plots-{os.getpid()}", ignore_errors=True)
        counts = self._counts()
        best = self._best()
        summary = {
            "study": self.name,
            "ran": ran,
            "counts": counts,
            "best": None if best is None else {"number": best.number, "value": best.value},
            "mlflow_parent_run_id": self.parent.run_id,
        }
        log.info(
            "study %s: this worker ran %d trial(s); study: %s; best %s",
            self.name,
            ran,
            ", ".join(f"{v} {k.lower()}" for k, v in sorted(counts.items())),
            "-" if best is None else f"{best.value:.4f} (trial {best.number})",
        )
        return summary


# ----------------------------------------------------------------------------- show/apply
def load_study(params: Params, name: str, storage: str | None = None) -> Any:
    """The stored study (a one-line error when it does not exist yet)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = study_config(params, name)
    url = resolve_storage(storage or cfg.storage)
    if "://" not in url and not Path(url).exists():
        raise ValueError(f"study {name}: no Optuna storage at {url}; run `pneumoseg study run`")
    try:
        return optuna.load_study(study_name=name, storage=open_storage(url))
    except KeyError:
        raise ValueError(
            f"study {name}: not found in {redact_text(url)}; run `pneumoseg study run {name}`"
        ) from None


def study_summary(study: Any) -> dict[str, Any]:
    """``{"study", "direction", "trials": [{"number", "state", "value", "params"}], "best",
    "importances"}``."""
    import optuna

    trials = [
        {
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            "params": t.params,
            "duration_s": t.duration.total_seconds() if t.duration else None,
        }
        for t in study.get_trials(deepcopy=False)
    ]
    best = None
    with contextlib.suppress(ValueError):
        b = study.best_trial
        best = {"number": b.number, "value": b.value, "params": b.params}
    importances: dict[str, float] = {}
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) >= 2:
        with (
            contextlib.suppress(ValueError, RuntimeError, ZeroDivisionError),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore", UserWarning)
            importances = {
                k: float(v) for k, v in optuna.importance.get_param_importances(study).items()
            }
    return {
        "study": study.study_name,
        "direction": study.direction.name.lower(),
        "metric": study.user_attrs.get("metric"),
        "trials": trials,
        "best": best,
        "importances": importances,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """A terminal table of the trials, the best trial and the importances."""
    trials = summary["trials"]
    names = sorted({k for t in trials for k in t["params"]})
    out = io.StringIO()
    states: dict[str, int] = {}
    for t in trials:
        states[t["state"]] = states.get(t["state"], 0) + 1
    counts = ", ".join(f"{v} {k.lower()}" for k, v in sorted(states.items()))
    out.write(
        f"study {summary['study']}: {len(trials)} trials ({counts or 'none'}); "
        f"{summary['direction']} {summary['metric']}\n"
    )
    header = ["#", "state", "value", *names]
    rows = [
        [
            str(t["number"]),
            t["state"],
            _fmt(t["value"]),
            *(_fmt(t["params"].get(n)) for n in names),
        ]
        for t in trials
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        out.write("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + "\n")
    best = summary["best"]
    if best:
        out.write(f"best: trial {best['number']} value {best['value']:.4f}\n")
        for k, v in best["params"].items():
            out.write(f"  {k}: {_fmt(v)}\n")
    else:
        out.write("best: none yet (no completed trial)\n")
    if summary["importances"]:
        out.write("importances:\n")
        for k, v in summary["importances"].items():
            out.write(f"  {k}: {v:.3f}\n")
    return out.getvalue()


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def best_values(study: Any, name: str) -> dict[str, Any]:
    try:
        return dict(study.best_trial.params)
    except ValueError:
        raise ValueError(f"study {name}: no completed trial yet") from None


def yaml_scalar(value: Any) -> str:
    """``value`` as one line of YAML (``1.25``, ``linear``, ``true``, ``null``, or a flow
    collection such as ``[{name: a, trial: 3}]``)."""
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False)
    return text.removesuffix("\n...\n").split("\n", 1)[0]


def _scalar_end(line: str, col: int, flow: bool) -> int:
    """End column of the YAML scalar that starts at ``col`` (quoted or plain)."""
    if line[col : col + 1] in ("'", '"'):
        quote, i = line[col], col + 1
        while i < len(line):
            if line[i] == "\\" and quote == '"':
                i += 2
                continue
            if line[i] == quote:
                if quote == "'" and line[i + 1 : i + 2] == "'":
                    i += 2
                    continue
                return i + 1
            i += 1
        return len(line.rstrip("\n"))
    stops = re.compile(r"\s+#|[,}\]]|\n" if flow else r"\s+#|\n")
    m = stops.search(line, col)
    end = m.start() if m else len(line)
    return len(line[:end].rstrip())


def edit_yaml_scalars(text: str, values: dict[str, Any]) -> tuple[str, list[tuple[str, Any, Any]]]:
    """Replace the scalar values at params paths in YAML ``text``, touching nothing else (each
    value is rewritten in place at its line and column). Returns the new text and
    (path, old, new) for each change. Every path must already be written in the text."""
    from ruamel.yaml import YAML

    data = YAML().load(text)
    lines = text.splitlines(keepends=True)
    edits = []
    changes = []
    for key, value in values.items():
        tokens = re.findall(r"[^.\[\]]+|\[\d+\]", key)
        *head, last_tok = tokens
        parent = get_path(data, "".join(t if t.startswith("[") else f".{t}" for t in head)[1:])
        last: Any = int(last_tok[1:-1]) if last_tok.startswith("[") else last_tok
        present = parent is not MISSING and (
            last in parent if isinstance(parent, dict) else 0 <= last < len(parent)
        )
        if not present:
            raise ValueError(
                f"params file: {key} is not written in the file; add it (with any value) so "
                "`study apply` can set it in place"
            )
        old = parent[last]
        line, col = parent.lc.value(last) if isinstance(parent, dict) else parent.lc.item(last)
        if isinstance(old, (dict, list)):
            if _flow_end(lines[line], col) is None:
                raise ValueError(
                    f"params file: {key} is a mapping or list over several lines; write it "
                    "in flow style on one line (e.g. [] or {}) so `study apply` can set it"
                )
            edits.append((line, col, None, yaml_scalar(value)))
        else:
            edits.append((line, col, bool(parent.fa.flow_style()), yaml_scalar(value)))
        changes.append((key, old, value))
    for line, col, flow, new in sorted(edits, reverse=True):
        text_line = lines[line]
        end = _flow_end(text_line, col) if flow is None else _scalar_end(text_line, col, flow)
        lines[line] = text_line[:col] + new + text_line[end:]
    return "".join(lines), changes


def _flow_end(line: str, col: int) -> int | None:
    """End column of the one-line flow collection (``[...]``, ``{...}``) starting at ``col``;
    None when there is none or it continues on another line."""
    if line[col : col + 1] not in ("[", "{"):
        return None
    depth, quote, i = 0, "", col
    while i < len(line):
        c = line[i]
        if quote:
            if c == "\\" and quote == '"':
                i += 1
            elif c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def apply_to_file(path: Path, values: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """Write ``values`` (params paths) into the YAML file in place (only those values change:
    comments, order and layout stay); the result is validated before the file is replaced."""
    import yaml
    from pydantic import ValidationError

    text = path.read_text()
    if PROVENANCE_KEY in values and get_path(yaml.safe_load(text), PROVENANCE_KEY) is MISSING:
        text = (
            text.rstrip("\n")
            + "\n\nprovenance:  # written by `pneumoseg study apply`\n  studies: []\n"
        )
    new_text, changes = edit_yaml_scalars(text, values)
    data = yaml.safe_load(new_text)
    for key, value in values.items():  # the edit must read back as exactly these values
        if get_path(data, key) != value:
            raise ValueError(f"{path.name}: {key}: could not be set in place")
    try:
        Params.model_validate(data)
    except ValidationError as err:
        raise ParamsError(format_validation_error(err, path.name).splitlines()[0]) from None
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(new_text)
    tmp.replace(path)
    return changes


PROVENANCE_KEY = "provenance.studies"


def hydra_value(value: Any) -> str:
    """``value`` in the override grammar of ``dvc exp run -S`` (Hydra's): ``{key:value}``
    with bare keys, quoted strings, ``[a,b]`` lists."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return json.dumps(value)  # numbers, true/false, null


def applied_record(params: Params, name: str, study: Any) -> list[dict[str, Any]]:
    """``provenance.studies`` after applying study ``name``: its entry (the best trial, the
    folds and images that scored the trials) replaces an earlier one of the same name."""
    best = study.best_trial
    seen = study.user_attrs.get("selection")  # studies from before it was recorded: held_out
    seen = seen or {"mode": "held_out", "folds": list(study_config(params, name).folds)}
    entry = {
        "name": name,
        "trial": best.number,
        "value": best.value,
        "folds": list(seen["folds"]),
        "selection": seen["mode"],
        "inner_fraction": seen.get("inner_fraction", params.train.selection.inner_fraction),
        "seed": seen.get("seed", params.train.seed),
    }
    others = [s.model_dump(mode="json") for s in params.provenance.studies if s.name != name]
    return [*others, entry]


def apply(
    params: Params,
    name: str,
    params_file: str | Path = "params.yaml",
    storage: str | None = None,
    exp: bool = False,
) -> dict[str, Any]:
    """Best trial -> ``params.yaml`` (in place) or -> ``dvc exp run -S ...`` (``exp``)."""
    study = load_study(params, name, storage)
    values = best_values(study, name)
    best = study.best_trial
    applied = applied_record(params, name, study)
    if exp:
        cmd = ["dvc", "exp", "run"]
        for key, value in values.items():
            cmd += ["-S", f"{mlflow_key(key)}={json.dumps(value)}"]
        cmd += ["-S", f"{PROVENANCE_KEY}={hydra_value(applied)}"]
        print(" ".join(cmd))
        proc = subprocess.run(cmd, check=False)
        if proc.returncode:
            raise RuntimeError(f"study {name}: `dvc exp run` exited with {proc.returncode}")
        return {"trial": best.number, "value": best.value, "values": values, "exp": True}
    changes = apply_to_file(Path(params_file), values | {PROVENANCE_KEY: applied})
    print(f"{params_file}: best trial {best.number} of study {name} (value {best.value:.4f})")
    for key, old, new in changes:
        print(f"  {key}: {_fmt(old)} -> {_fmt(new)}")
    print("next: git diff params.yaml && dvc repro")
    return {"trial": best.number, "value": best.value, "values": values, "exp": False}


def run(
    params: Params,
    action: str,
    name: str,
    trials: int | None = None,
    timeout: str | None = None,
    storage: str | None = None,
    json_out: bool = False,
    exp: bool = False,
    params_file: str = "params.yaml",
    progress: bool = True,
) -> Any:
    """CLI entry of ``pneumoseg study ACTION NAME``."""
    if action == "run":
        runner = StudyRunner(params, name, storage, progress)
        return runner.run(trials, parse_duration(timeout))
    if action == "show":
        summary = study_summary(load_study(params, name, storage))
        print(json.dumps(summary, indent=2) if json_out else format_summary(summary), end="")
        if json_out:
            print()
        return summary
    if action == "apply":
        return apply(params, name, params_file, storage, exp)
    raise ValueError(f"study: unknown action {action!r} (run, show, apply)")

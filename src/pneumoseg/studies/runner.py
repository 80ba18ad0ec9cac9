"""A study over training params and the worker that runs it (``pneumoseg study run``).

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
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from pneumoseg.lineage import worker_id
from pneumoseg.locks import file_lock
from pneumoseg.params import (
    Params,
    ParamsError,
)
from pneumoseg.redact import redact_text
from pneumoseg.studies.config import (
    make_pruner,
    make_sampler,
    mlflow_key,
    space_digest,
    study_config,
    suggest,
    trial_params,
    trial_selection,
)
from pneumoseg.studies.report import MlflowTrialLogger, save_study_plots
from pneumoseg.studies.storage import (
    OWNER_ATTR,
    WORKER_PREFIX,
    fail_stale_trials,
    live_workers,
    open_storage,
    register_worker,
    resolve_storage,
    unregister_worker,
)
from pneumoseg.tracking import Tracker, experiment_name

log = logging.getLogger("pneumoseg.studies")
HEARTBEAT_SECONDS = 30  # RDB storages: Optuna's trial heartbeat
MAX_FAILED_IN_A_ROW = 3


def close_child_runs(tracker: Tracker, status: str) -> None:
    """End the RUNNING MLflow runs nested under the tracker's run with ``status``."""
    if not tracker.active:
        return
    with contextlib.suppress(Exception):
        exp = tracker.client.get_run(tracker.run_id).info.experiment_id
        query = f"tags.mlflow.parentRunId = '{tracker.run_id}' and attributes.status = 'RUNNING'"
        for run in tracker.client.search_runs([exp], query):
            tracker.client.set_terminated(run.info.run_id, status=status)


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
        self.experiment = experiment_name(params.mlflow, "studies")
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
        self.parent = Tracker(self.params.mlflow, experiment=self.experiment)
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

    def _register_worker(self) -> int:
        """Record this worker; its index among the live workers offsets the sampler seed (so
        parallel workers do not draw the same values; a lone worker always gets index 0)."""
        key = WORKER_PREFIX + self.worker
        with file_lock(self._lock_path()):  # workers on this host register one at a time
            register_worker(self.study, self.worker)
            live = live_workers(self.study)
        return live.index(key) if key in live else 0

    def _lock_path(self) -> Path:
        return Path(self.cfg.work_dir) / f".{self.name}.lock"

    def recover_dead_trials(self) -> int:
        """Fail RUNNING trials whose worker process is gone (same host), end their MLflow runs,
        delete their files and enqueue their params once more. Returns how many."""
        failed = fail_stale_trials(self.study)
        for t in failed:
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
        return len(failed)

    def _end_trial_runs(self, run_id: str | None) -> None:
        """Mark a dead trial's MLflow run and its RUNNING fold runs FAILED."""
        if not run_id:
            return
        tracker = Tracker(self.params.mlflow, experiment=self.experiment)
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

        from pneumoseg.training.callbacks import TrainingDiverged
        from pneumoseg.training.trainer import FoldTrainer

        trial.set_user_attr(OWNER_ATTR, self.worker)
        values = {path: suggest(trial, path, d) for path, d in self.cfg.space.items()}
        trial_dir = self.work / f"trial-{trial.number}"
        params = trial_params(self.params, self.cfg, values, trial_dir)
        tracker = Tracker(self.params.mlflow, experiment=self.experiment)
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
                    experiment=self.experiment,
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
        except TrainingDiverged as exc:  # values that make the training diverge: a bad trial
            status = "KILLED"  # (pruned, so the sampler learns from it), not a broken worker
            tracker.set_tags({"optuna_state": "PRUNED", "pruned_because": str(exc)})
            log.info("study %s: trial %d diverged: %s", self.name, trial.number, exc)
            raise optuna.TrialPruned(str(exc)) from None
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
        finished = counts.get("COMPLETE", 0) + counts.get("PRUNED", 0)
        log.info(
            "study %s: trial %d %s value %s in %s; best %s; %d/%d finished%s",
            self.name,
            trial.number,
            trial.state.name,
            value,
            _minutes(trial.duration.total_seconds() if trial.duration else None),
            "-" if best is None else f"{best.value:.4f} (trial {best.number})",
            finished,
            self.target,
            self._eta(study, finished),
        )

    def _eta(self, study: Any, finished: int) -> str:
        """``; ETA ...``: the mean time of the study's finished trials times the trials left,
        shared by the live workers."""
        from optuna.trial import TrialState

        states = (TrialState.COMPLETE, TrialState.PRUNED)
        times = [t.duration.total_seconds() for t in study.get_trials(False, states) if t.duration]
        left = self.target - finished
        if not times or left <= 0:
            return ""
        workers = max(1, len(live_workers(study)))
        eta = sum(times) / len(times) * left / workers
        return f"; ETA {_minutes(eta)} ({workers} worker{'s' if workers > 1 else ''})"

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
                mine = [t for t in mine if t.user_attrs.get(OWNER_ATTR) == self.worker]
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
            unregister_worker(self.study, self.worker)
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
        states = ", ".join(f"{v} {k.lower()}" for k, v in sorted(counts.items()))
        best_text = "-" if best is None else f"{best.value:.4f} (trial {best.number})"
        print(
            f"study {self.name}: this worker ran {ran} trial(s); study: {states}; best {best_text}"
        )
        return summary


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


# ----------------------------------------------------------------------------- show/apply

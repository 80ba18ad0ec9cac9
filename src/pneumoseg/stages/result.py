"""Stage ``result``: the pipeline's one row in the MLflow runs table (see
:mod:`pneumoseg.results`) and ``result.out``, its headline numbers for ``dvc exp show``.

It runs last (after ``register``), once per pipeline result: a ``dvc repro`` that changed
something, every DVC experiment. A rerun with the same inputs (after a kill) reopens the same
row. The registered version gets the row's id as its ``pipeline_run_id`` tag.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from pneumoseg.files import read_json, write_json
from pneumoseg.lineage import lineage_tags
from pneumoseg.params import Params, digest
from pneumoseg.redact import redact_text
from pneumoseg.results import (
    CURVES,
    VIEW_TAG,
    Link,
    description,
    dumps,
    headline,
    params_digest,
    pipeline_params,
    read_per_image,
    results_view,
)
from pneumoseg.studies.storage import resolve_storage
from pneumoseg.tracking import Tracker, experiment_name

log = logging.getLogger(__name__)
RESULT_KEY = "result_key"  # tag: what the row is the result of (a rerun reopens the same row)
COMPLETE_TAG = "result_complete"  # tag: everything is logged (a rerun then logs nothing)


def training_links(tracker: Tracker, registered: dict[str, Any]) -> list[tuple[Link, Any]]:
    """Every training run of the registered ensemble (``train-fold<k>``, members, fine-tuned
    folds and the run each fine-tuning started from), with the run itself (None: missing)."""
    found: list[tuple[Link, Any]] = []
    seen: set[str] = set()
    queue = [(name, rid) for name, rid in (registered.get("training_run_ids") or {}).items()]
    while queue:
        name, run_id = queue.pop(0)
        run = tracker.linked_run(run_id) if run_id else None
        if run is None:
            found.append((Link(f"run.{name}", None, note=f"(model {name})"), None))
            continue
        if run_id in seen:
            continue
        seen.add(run_id)
        link = Link(f"run.{run.info.run_name}", run_id, run.info.experiment_id)
        found.append((link, run))
        source = run.data.tags.get("pseudo_labels_by_run")  # a fine-tuning: its starting run
        if run.data.tags.get("stage") == "finetune" and source and source != "None":
            queue.append((f"source-of-{run.info.run_name}", source))
    return found


def stage_link(tracker: Tracker, name: str, run_id: str | None) -> Link:
    run = tracker.linked_run(run_id) if run_id else None
    return Link(f"run.{name}", run_id if run else None, run.info.experiment_id if run else None)


def run(params: Params, progress: bool = True) -> dict[str, Any]:
    """CLI/DVC entry: create (or reopen) the result's row, write ``result.out``."""
    evaluation = read_json(params.evaluate.out, "run `pneumoseg evaluate` first")
    thresholds = read_json(params.thresholds.metrics, "run `pneumoseg thresholds` first")
    registered = read_json(params.registry.out, "run `pneumoseg register` first")
    made = pipeline_params()
    scores = headline(evaluation)
    weights = (evaluation.get("ensemble") or {}).get("member_weights") or {}
    lineage = lineage_tags()
    exp_name = lineage.get("dvc_exp_name")
    stage_runs = {
        "thresholds": thresholds.get("mlflow_run_id"),
        "evaluate": evaluation.get("mlflow_run_id"),
        "register": registered.get("run_id"),
    }
    key = digest(
        {"params": params_digest(made.values), "runs": stage_runs, "exp": exp_name}
        | {"training": registered.get("training_run_ids"), "version": registered.get("version")}
    )
    commit = lineage.get("git_commit", "unknown")
    name = exp_name or f"repro-{commit[:8]}"
    tracker = Tracker(params.mlflow, experiment=experiment_name(params.mlflow, "results"))
    tags = {"stage": "result", RESULT_KEY: key}
    tracker.start(name, tags, reuse_tag=RESULT_KEY)
    row = tracker.linked_run(tracker.run_id) if tracker.run_id else None
    if row is not None and row.data.tags.get(COMPLETE_TAG) == "true":  # the same result again
        tracker.end()
        return finish(params, scores, tracker, name, [], 0)
    linked = training_links(tracker, registered)
    links = [link for link, _ in linked]
    links += [stage_link(tracker, stage, rid) for stage, rid in stage_runs.items()]
    study = {
        "name": str(thresholds.get("study_name") or ""),
        "storage": redact_text(resolve_storage(params.thresholds.storage)),
    }
    version = {"name": str(registered.get("name", "")), "version": str(registered.get("version"))}
    tracker.log_params({k: dumps(v) for k, v in made.flat().items()})
    tracker.log_metrics(scores | {f"member_weight.{m}": w for m, w in weights.items()}, step=0)
    for step, values in curves(tracker, linked).items():
        tracker.log_metrics(values, step)
    missing = [link.name for link in links if link.run_id is None]
    tracker.set_tags(
        {
            "data_hash": str(registered.get("data_hash", "unknown")),
            "params_hash": params_digest(made.values),
            "params_source": made.source,
            "optuna_study": study["name"],
            "optuna_storage": study["storage"],
            "registered_model": version["name"],
            "registered_model_version": version["version"],
            "mlflow.note.content": description(name, scores, links, study, version, made.source),
        }
        | {link.name: link.run_id for link in links if link.run_id}
        | ({"links_missing": ",".join(missing)} if missing else {})
        | ({"params_conflicting": ",".join(made.conflicts)} if made.conflicts else {})
    )
    tracker.log_table(read_per_image(params.evaluate.per_image), "per_image.json")
    if tracker.run_id and version["version"] not in ("", "None"):
        tracker.set_version_tag(version["name"], version["version"], "pipeline_run_id")
    tracker.set_experiment_tag(VIEW_TAG, results_view(int(time.time() * 1000)))
    if tracker.complete:
        tracker.set_tags({COMPLETE_TAG: "true"})
    tracker.end()
    return finish(params, scores, tracker, name, missing, len(links))


def curves(tracker: Tracker, linked: list[tuple[Link, Any]]) -> dict[int, dict[str, float]]:
    """Step -> ``{"<run name>/<curve>": value}`` of every linked training run's :data:`CURVES`
    (one batched call per step)."""
    by_step: dict[int, dict[str, float]] = {}
    for link, source in linked:
        if source is None:
            continue
        for curve in CURVES:
            if curve not in source.data.metrics:
                continue
            for m in tracker.metric_history(source.info.run_id, curve):
                key = f"{link.name.removeprefix('run.')}/{curve}"
                by_step.setdefault(int(m.step), {})[key] = float(m.value)
    return by_step


def finish(
    params: Params,
    scores: dict[str, float],
    tracker: Tracker,
    name: str,
    missing: list[str],
    n_links: int,
) -> dict[str, Any]:
    """Write ``result.out`` (the headline and the row's id) and say where the row is."""
    record: dict[str, Any] = scores | {"mlflow_run_id": tracker.run_id}
    record |= tracker.incomplete_record("result")
    out = Path(params.result.out)
    write_json(out, record, sort_keys=False)  # the headline's order: untouched first
    untouched = scores.get("kaggle_dice_untouched")
    shown = "n/a" if untouched is None else f"{untouched:.4f}"
    where = experiment_name(params.mlflow, "results")
    print(
        f"result: {name}: untouched {shown}; its row in MLflow experiment {where!r}: run "
        f"{tracker.run_id} ({n_links} linked runs"
        + (f", missing {', '.join(missing)}" if missing else "")
        + f") -> {out}"
    )
    return record

"""One MLflow row per pipeline result: what a person compares (stage ``result``).

A pipeline result (a ``dvc repro``, a DVC experiment) is one run in the results experiment
(``mlflow.experiment``; the stage runs it links to live in ``<experiment>-stages``):

- params: every key the pipeline's stages declare, with the values ``dvc.lock`` records for
  each stage, i.e. the params the outputs were made with, also for a stage DVC reused from its
  cache (flattened as the fold runs log them: ``train.parts.0.lr``);
- metrics: the headline scores of ``evaluate`` (:data:`HEADLINE`, the same numbers as
  ``metrics/result.json`` and so ``dvc exp show``), the ensemble weights
  (``member_weight.<name>``) and each linked training run's curves (``<fold run>/<key>`` per
  epoch, so Compare overlays them across results);
- tags: lineage (``dvc_exp_name``, git commit, data and params hashes) and a link to every
  run and object that made the result (``run.<name>``, ``optuna_study``,
  ``registered_model_version``); its description lists them as links;
- the per-image table of ``evaluate`` (``per_image.json``, sortable in the UI).
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pneumoseg.lineage import dvc_lock_params
from pneumoseg.params import digest, flatten

log = logging.getLogger(__name__)

# evaluate.json key -> the row's metric (and result.json's key): untouched first, as
# `dvc exp show` lists them
HEADLINE: dict[str, str] = {
    "kaggle_dice_untouched": "kaggle_dice_untouched",
    "kaggle_dice_untouched_ci95.0": "kaggle_dice_untouched_ci95_low",
    "kaggle_dice_untouched_ci95.1": "kaggle_dice_untouched_ci95_high",
    "kaggle_dice_cross_fitted": "kaggle_dice_cross_fitted",
    "kaggle_dice_cross_fitted_ci95.0": "kaggle_dice_cross_fitted_ci95_low",
    "kaggle_dice_cross_fitted_ci95.1": "kaggle_dice_cross_fitted_ci95_high",
    "kaggle_dice": "kaggle_dice_in_sample",
    "empty_baseline": "empty_baseline",
    "dice_pos": "dice_pos",
    "n_positive": "n_positive",
    "n_untouched": "n_untouched",
    "n_images": "n_images",
}

# The per-epoch curves copied from each linked training run (when it logged them).
CURVES = (
    "train_loss",
    "val_loss",
    "val_kaggle_dice",
    "observed_heldout_loss",
    "observed_heldout_kaggle_dice",
    "observed_heldout_dice_pos",
)


def pipeline_stages(register_params: Mapping[str, Any]) -> list[str]:
    """The DVC stages whose outputs the result is made of, in pipeline order (``result``
    itself excluded; ``submit`` stands beside it), from the ``train.folds``,
    ``ensemble.members`` and ``pseudo_label.folds`` that ``dvc.lock`` records for ``register``
    (the models registered; stale entries of removed stages stay in a lock file)."""
    folds = register_params.get("train.folds") or []
    members = list(register_params.get("ensemble.members") or {})
    tuned = register_params.get("pseudo_label.folds") or []
    stages = ["demo", "convert", "arrays", "split"]
    stages += [f"train@{k}" for k in folds]
    stages += [f"member@{m}-{k}" for m in members for k in folds]
    stages += [f"pseudo_label@{k}" for k in tuned] + [f"finetune@{k}" for k in tuned]
    return [*stages, "oof", "thresholds", "evaluate", "register"]


@dataclass
class PipelineParams:
    """The params a result was made with, as ``dvc.lock`` records them: ``values`` (dotted key
    -> value, unflattened), ``missing`` (stages the lock has no entry for: run outside DVC),
    ``conflicts`` (keys two stages recorded with different values: the first one is kept)."""

    values: dict[str, Any] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)

    @property
    def source(self) -> str:
        if not self.values:
            return "none: no dvc.lock entry for register (stages run outside DVC)"
        if self.missing:
            return f"dvc.lock (no entry for {', '.join(self.missing)})"
        return "dvc.lock"

    def flat(self) -> dict[str, Any]:
        """Dotted MLflow param names, as the fold runs log them (``train.parts.0.lr``)."""
        out: dict[str, Any] = {}
        for key, value in self.values.items():
            nested = flatten(value, key) if isinstance(value, (dict, list)) else {}
            out.update(nested or {key: value})  # an empty section stays one param
        return out


def pipeline_params() -> PipelineParams:
    """Every key the result's stages (:func:`pipeline_stages`) declare, with the values
    ``dvc.lock`` records for each: the params its outputs were made with, also when DVC
    reused them from its cache. Outside DVC (no lock entry for ``register``) there is no
    record of them: nothing is returned."""
    found = PipelineParams()
    register = dvc_lock_params("register")
    if register is None:
        return found
    for stage in pipeline_stages(register):
        locked = dvc_lock_params(stage)
        if locked is None:
            found.missing.append(stage)
            continue
        for key, value in locked.items():
            if key not in found.values:
                found.values[key] = value
            elif found.values[key] != value and key not in found.conflicts:
                found.conflicts.append(key)
    return found


def headline(evaluation: Mapping[str, Any]) -> dict[str, float]:
    """The :data:`HEADLINE` numbers of ``metrics/evaluate.json`` (absent ones left out: e.g.
    no untouched score when every image was seen)."""
    flat = flatten(dict(evaluation))
    out = {}
    for key, name in HEADLINE.items():
        value = flat.get(key)
        if value is None and key.endswith((".0", ".1")):  # a [low, high] pair kept whole
            pair = evaluation.get(key[:-2])
            value = pair[int(key[-1])] if isinstance(pair, list) else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


@dataclass
class Link:
    """A run or object the result was made of."""

    name: str  # run.fold0, run.thresholds, ...
    run_id: str | None
    experiment_id: str | None = None
    note: str = ""


def read_per_image(path: str | Path) -> list[dict[str, Any]]:
    """``evaluate.per_image`` rows with numbers as numbers (for MLflow's table)."""

    def number(value: str) -> Any:
        if value == "":
            return None
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
        return value

    with Path(path).open(newline="") as fh:
        return [
            {k: (v if k in ("ImageId", "seen_by") else number(v)) for k, v in row.items()}
            for row in csv.DictReader(fh)
        ]


def run_url(link: Link) -> str:
    """The UI's address of a linked run, relative to the MLflow UI's root."""
    return f"#/experiments/{link.experiment_id}/runs/{link.run_id}"


def description(
    name: str,
    scores: Mapping[str, float],
    links: Iterable[Link],
    study: Mapping[str, str],
    version: Mapping[str, str],
    source: str,
) -> str:
    """The row's description (markdown, rendered by the run page): the headline and a link to
    every run and object that made the result."""

    def fmt(key: str) -> str:
        value = scores.get(key)
        return "n/a" if value is None else f"{value:.4f}"

    lines = [
        f"**Pipeline result {name}**: untouched Kaggle dice {fmt('kaggle_dice_untouched')} "
        f"(95% CI {fmt('kaggle_dice_untouched_ci95_low')}-"
        f"{fmt('kaggle_dice_untouched_ci95_high')}; images no decision saw), cross-fitted "
        f"{fmt('kaggle_dice_cross_fitted')}, in-sample (thresholds tuned on these images) "
        f"{fmt('kaggle_dice_in_sample')}, all-empty baseline {fmt('empty_baseline')}.",
        "",
        f"Params: every key the stages declare, as `{source}` records them.",
        "",
        "Made by:",
    ]
    for link in links:
        if link.run_id and link.experiment_id:
            lines.append(f"- {link.name}: [{link.run_id}]({run_url(link)}) {link.note}".rstrip())
        else:
            lines.append(f"- {link.name}: missing (no MLflow run recorded) {link.note}".rstrip())
    if study.get("name"):
        lines.append(
            f"- Optuna study `{study['name']}` in `{study.get('storage', '')}` "
            "(`optuna-dashboard` on that storage; its plots are on the thresholds run)"
        )
    if version.get("version"):
        lines.append(
            f"- registered model [{version['name']} version {version['version']}]"
            f"(#/models/{version['name']}/versions/{version['version']})"
        )
    lines += [
        "",
        "Per-image results: the `per_image.json` table under Artifacts (sort by "
        "`dice_cross_fitted`); the worst cases are pictured on the evaluate run "
        "(`plots/worst_false_*.png`, each tile labelled with its `row`).",
    ]
    return "\n".join(lines)


def dumps(value: Any) -> str:
    """A param value as MLflow shows it (lists and dicts as JSON)."""
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def params_digest(values: Mapping[str, Any]) -> str:
    """The row's ``params_hash``: a digest of every param the result was made with."""
    return digest(dict(values))


# The results experiment's saved view (the UI's "Views" menu; ``?viewStateShareKey=`` opens it):
# the headline as columns, best untouched score first. MLflow 3 keeps saved views in experiment
# tags ``mlflow.sharedViewState.<key>`` (an envelope with the UI state as a JSON string).
VIEW_KEY = "pneumoseg-results"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
VIEW_COLUMNS = (
    "kaggle_dice_untouched",
    "kaggle_dice_untouched_ci95_low",
    "kaggle_dice_untouched_ci95_high",
    "kaggle_dice_cross_fitted",
    "kaggle_dice_in_sample",
    "empty_baseline",
    "dice_pos",
    "n_positive",
)


def results_view(created_ms: int) -> str:
    """The saved view's tag value: headline columns, sorted by the untouched score."""
    columns = [f"metrics.`{m}`" for m in VIEW_COLUMNS] + ["tags.`registered_model_version`"]
    state = {
        "selectedColumns": columns,
        "columnOrder": columns,
        "columnWidths": {c: 24 + 8 * len(c.split("`")[1]) for c in columns},
        "orderByKey": "metrics.`kaggle_dice_untouched`",
        "orderByAsc": False,
        "searchFilter": "",
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "modelVersionFilter": "All Runs",
        "datasetsFilter": [],
    }
    envelope = {
        "name": "pneumoseg: results (untouched first)",
        "createdAt": created_ms,
        "updatedAt": created_ms,
        "state": json.dumps(state),
    }
    return json.dumps(envelope)

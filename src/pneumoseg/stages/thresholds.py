"""Stage ``thresholds``: tune the triplet rule on the OOF maps (an Optuna study scored exactly
by :class:`pneumoseg.postprocess.TripletScorer`, plus the exhaustive uint8 grid; the better one
is kept, see :func:`pneumoseg.postprocess.select_triplets`) and write ``postprocess.json``.

The study lives in a persistent storage and is named after the OOF data and the search
settings, so a killed run continues the same study while a new model gets a new one.
``evaluate`` cross-fits this same procedure (:func:`pneumoseg.postprocess.tune`).

With ensemble members in the OOF set, their weights come first (``ensemble.weights``: fitted on
the OOF maps, see :mod:`pneumoseg.postprocess.blend`, or equal) and the triplet is tuned on the
weighted maps; ``postprocess.json`` carries the weights to submit, register and predict.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from pneumoseg.artifacts import MEMBERS_DIR
from pneumoseg.files import read_json, write_json
from pneumoseg.lineage import worker_id
from pneumoseg.params import Params
from pneumoseg.plots import threshold_heatmap
from pneumoseg.postprocess import (
    SearchSettings,
    deployed_weights,
    group_labels,
    oof_scorer,
    search_objective,
    select_triplets,
)
from pneumoseg.progress import progress_bar
from pneumoseg.redact import redact
from pneumoseg.studies.report import MlflowTrialLogger, save_study_plots
from pneumoseg.studies.storage import (
    OWNER_ATTR,
    fail_stale_trials,
    open_storage,
    register_worker,
    resolve_storage,
    unregister_worker,
)
from pneumoseg.tracking import Tracker

log = logging.getLogger(__name__)
METRIC_KEYS = (
    "score",
    "optuna_best_score",
    "empty_baseline",
    "n_trials",
    "selected",
    "size",
    "study_name",
    "mlflow_run_id",
)


def study_name(
    oof_dir: str, settings: SearchSettings, weights: dict[str, float] | None = None
) -> str:
    """``thresholds-<hash of the OOF maps, the member weights and the search definition>``."""
    h = hashlib.sha256()
    members = sorted(Path(oof_dir).glob(f"{MEMBERS_DIR}/*/probs.npy"))
    for path in [Path(oof_dir) / n for n in ("ids.csv", "probs.npy", "masks.npy")] + members:
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    h.update(json.dumps([settings.space, settings.group_by, settings.seed]).encode())
    if weights is not None:
        h.update(json.dumps(weights, sort_keys=True).encode())
    return f"thresholds-{h.hexdigest()[:10]}"


def member_weights(params: Params) -> tuple[dict[str, float] | None, dict[str, Any]]:
    """The members' weights (None without members) and the fit's report (printed)."""
    weights, report = deployed_weights(
        params.oof.out_dir,
        params.data.processed_dir,
        params.thresholds,
        params.ensemble.weights,
        params.ensemble.weight_step,
    )
    if weights is not None:
        fit = report["member_weight_fit"]
        alone = ", ".join(f"{n} {v:.4f}" for n, v in fit["alone"].items())
        chosen = ", ".join(f"{n} {w:.2f}" for n, w in weights.items())
        print(f"thresholds: member weights ({fit['mode']}) {chosen}: grid optimum "
              f"{fit['score']:.4f} (equal {fit['equal']:.4f}; alone {alone})")  # fmt: skip
    return weights, report


def run(params: Params, progress: bool = True) -> dict[str, Any]:
    """CLI/DVC entry: run (or continue) the study to ``thresholds.trials`` trials."""
    import optuna

    cfg = params.thresholds
    weights, weight_report = member_weights(params)
    scorer, ids, manifest = oof_scorer(params.oof.out_dir, params.data.processed_dir, weights)
    settings = SearchSettings.of(cfg, scorer.has_cls)
    groups = group_labels(settings.group_by, ids, manifest)
    name = study_name(params.oof.out_dir, settings, weights)
    storage_url = resolve_storage(cfg.storage)
    study = optuna.create_study(
        study_name=name,
        storage=open_storage(cfg.storage),
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=settings.seed, multivariate=True),
        load_if_exists=True,
    )
    fail_stale_trials(study)
    done = sum(t.state.is_finished() for t in study.trials)
    tracker = Tracker(params.mlflow)
    run_id = study.user_attrs.get("mlflow_run_id")
    tracker.start("thresholds", {"stage": "thresholds", "optuna_study": name}, run_id)
    if tracker.run_id and not run_id:
        study.set_user_attr("mlflow_run_id", tracker.run_id)
        tracker.log_params(
            {"trials": settings.trials, "storage": storage_url, "group_by": settings.group_by}
            | {"seed": settings.seed, "exhaustive": settings.exhaustive}
            | {f"space.{k}": v for k, v in settings.space.items()}
            | {"oof.size": scorer.size, "n_images": len(ids)}
        )
    remaining = max(settings.trials - done, 0)
    if done:
        print(f"thresholds: continuing study {name} ({done} trials done, {remaining} to go)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t0 = time.perf_counter()
    objective, owner = search_objective(scorer, settings.space, groups), worker_id()

    def owned(trial: optuna.Trial) -> float:  # a worker that dies leaves its trial recoverable
        trial.set_user_attr(OWNER_ATTR, owner)
        if tracker.run_id:  # the run whose metrics hold this trial (step = trial number)
            trial.set_user_attr("mlflow_run_id", tracker.run_id)
        return objective(trial)

    register_worker(study, owner)  # before its first trial (see stale_trials)
    bar = progress_bar(total=remaining, desc="thresholds", unit="trial", bars_allowed=progress)
    try:
        study.optimize(
            owned,
            n_trials=remaining,
            callbacks=[MlflowTrialLogger(tracker), lambda _study, _trial: bar.update()],
        )
    finally:
        bar.close()
        unregister_worker(study, owner)
    elapsed = time.perf_counter() - t0
    grids: dict[float | None, Any] = {}
    post, report = select_triplets(study, scorer, settings, groups, grids=grids)
    post.weights = weights
    result: dict[str, Any] = {
        **post.as_dict(),
        **report,
        **weight_report,
        "n_trials": len(study.trials),
        "size": scorer.size,
        "empty_baseline": scorer.empty_baseline(),
        "study_name": name,
        "storage": redact(storage_url),
        "mlflow_run_id": tracker.run_id,
    }
    out = write_outputs(cfg, study, result, weights, tracker)
    heatmap(cfg, grids, settings, post, tracker)
    tracker.end()
    if incomplete := tracker.incomplete_record("thresholds"):
        write_json(cfg.metrics, read_json(cfg.metrics, "written above") | incomplete)
    ex = result.get("exhaustive")
    print(
        f"thresholds: best {result['score']:.4f} ({result['selected']}) after "
        f"{result['n_trials']} trials ({remaining} new in {elapsed:.1f}s; empty baseline "
        f"{result['empty_baseline']:.4f})"
        + (f"; exhaustive optimum {ex['score']:.4f} in {ex['seconds']}s" if ex else "")
        + f" -> {out}"
    )
    return result


def write_outputs(
    cfg: Any, study: Any, result: dict[str, Any], weights: Any, tracker: Tracker
) -> Path:
    """``postprocess.json``, the metrics file and the study plots (PNG for DVC, HTML for MLflow
    only), logged to the thresholds run; returns the postprocess path."""
    out = Path(cfg.out)
    write_json(out, result)
    metrics = {k: result.get(k) for k in METRIC_KEYS}
    if weights is not None:
        metrics["member_weights"] = weights
    if "exhaustive" in result:
        metrics["exhaustive_score"] = result["exhaustive"]["score"]
    write_json(cfg.metrics, metrics)
    with tempfile.TemporaryDirectory(prefix="pneumoseg-study-html-") as html:  # MLflow only
        for path in save_study_plots(study, Path(cfg.plots_dir), html_dir=Path(html)):
            tracker.log_artifact(path, "study_plots")
    tracker.log_metrics(
        {"best_score": result["score"], "empty_baseline": result["empty_baseline"]}
        | ({"exhaustive_score": result["exhaustive"]["score"]} if "exhaustive" in result else {}),
        step=len(study.trials),
    )
    tracker.log_artifact(out)
    return out


def heatmap(cfg: Any, grids: dict[Any, Any], settings: Any, post: Any, tracker: Tracker) -> None:
    """The exhaustive grid of the deployed triplet's gate (else the first), its triplet
    marked: ``plots/thresholds/exhaustive_heatmap.png``, logged too."""
    if not grids:
        return
    gate = post.default.cls_gate if post.default.cls_gate in grids else next(iter(grids))
    path = Path(cfg.plots_dir) / "exhaustive_heatmap.png"
    same = gate == post.default.cls_gate
    threshold_heatmap(grids[gate], settings.areas, post.default, path, same)
    tracker.log_artifact(path, "plots")

"""Stage ``thresholds``: an Optuna study over the triplet rule on the OOF maps, scored exactly
by :class:`pneumoseg.postprocess.TripletScorer` (one trial = O(N) vector operations), plus an
exhaustive scan of the whole uint8 grid to show the true optimum.

The study lives in a persistent storage and is named after the OOF data and the search space,
so a killed run continues the same study while a new model gets a new one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from pneumoseg.params import Params
from pneumoseg.postprocess import (
    Triplet,
    exhaustive_best,
    gate_levels,
    group_labels,
    oof_scorer,
    score_grouped,
    search_space,
    suggest_triplet,
    triplet_from_params,
)
from pneumoseg.redact import redact
from pneumoseg.studies import (
    MlflowTrialLogger,
    fail_stale_trials,
    open_storage,
    resolve_storage,
    save_study_plots,
)
from pneumoseg.tracking import Tracker

log = logging.getLogger(__name__)


def study_name(params: Params, space: dict[str, Any], groups: np.ndarray | None) -> str:
    """``thresholds-<hash of the OOF maps and the search definition>``."""
    h = hashlib.sha256()
    out = Path(params.oof.out_dir)
    for name in ("ids.csv", "probs.npy", "masks.npy"):
        with (out / name).open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    h.update(json.dumps([space, params.thresholds.group_by, params.thresholds.seed]).encode())
    return f"thresholds-{h.hexdigest()[:10]}"


def triplets_from(
    params: dict[str, Any], space: dict, groups: list[str] | None
) -> dict[str, Triplet]:
    if groups is None:
        return {"*": triplet_from_params(params, space)}
    return {g: triplet_from_params(params, space, f"{g}/") for g in groups}


def run(params: Params, progress: bool = True) -> dict[str, Any]:
    """CLI/DVC entry: run (or continue) the study to ``thresholds.trials`` trials."""
    import optuna

    cfg = params.thresholds
    scorer, ids, manifest = oof_scorer(params.oof.out_dir, params.data.processed_dir)
    space = search_space(cfg.space, scorer.has_cls)
    groups = group_labels(cfg.group_by, ids, manifest)
    group_names = sorted(set(groups.tolist())) if groups is not None else None
    name = study_name(params, space, groups)
    storage_url = resolve_storage(cfg.storage)
    storage = open_storage(cfg.storage)
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=cfg.seed, multivariate=True),
        load_if_exists=True,
    )
    fail_stale_trials(study)
    done = sum(t.state.is_finished() for t in study.trials)
    tracker = Tracker(params.mlflow)
    run_id = study.user_attrs.get("mlflow_run_id")
    tags = {"stage": "thresholds", "optuna_study": name}
    tracker.start("thresholds", tags, run_id)
    if tracker.run_id and not run_id:
        study.set_user_attr("mlflow_run_id", tracker.run_id)
        tracker.log_params(
            {
                "trials": cfg.trials,
                "storage": storage_url,
                "group_by": cfg.group_by,
                "seed": cfg.seed,
            }
            | {f"space.{k}": v for k, v in space.items()}
            | {"oof.size": scorer.size, "n_images": len(ids)}
        )

    def objective(trial: optuna.Trial) -> float:
        if groups is None:
            return scorer.score(suggest_triplet(trial, space))
        triplets = {g: suggest_triplet(trial, space, f"{g}/") for g in group_names}
        return score_grouped(scorer, groups, triplets)

    remaining = max(cfg.trials - done, 0)
    if done:
        print(f"thresholds: continuing study {name} ({done} trials done, {remaining} to go)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t0 = time.perf_counter()
    study.optimize(
        objective,
        n_trials=remaining,
        callbacks=[MlflowTrialLogger(tracker)],
        show_progress_bar=progress and remaining > 0,
    )
    elapsed = time.perf_counter() - t0
    best = triplets_from(study.best_params, space, group_names)
    gates = gate_levels(space.get("cls_gate"))
    areas = cfg.exhaustive_areas
    result: dict[str, Any] = {
        "score": float(study.best_value),
        "n_trials": len(study.trials),
        "size": scorer.size,
        "empty_baseline": scorer.empty_baseline(),
        "study_name": name,
        "storage": redact(storage_url),
        "mlflow_run_id": tracker.run_id,
    }
    if groups is None:
        result.update(asdict(best["*"]))
        if cfg.exhaustive:
            t1 = time.perf_counter()
            ex_best, ex_score = exhaustive_best(scorer, areas, gates)
            result["exhaustive"] = {
                **asdict(ex_best),
                "score": ex_score,
                "areas": list(areas),
                "gates": len(gates),
                "seconds": round(time.perf_counter() - t1, 3),
                "optuna_gap": ex_score - result["score"],
            }
            if ex_score > result["score"]:
                # The grid found a better triplet than the study: apply it, keep both on record.
                result.update(asdict(ex_best) | {"score": ex_score})
                result["selected"] = "exhaustive"
    else:
        # The score is additive over groups: per group, keep the better of the study's and the
        # grid's triplet. Images of a group never seen here get the ungrouped grid optimum.
        t1 = time.perf_counter()
        result.update(asdict(exhaustive_best(scorer, areas, gates)[0]))
        chosen: dict[str, Triplet] = {}
        selected: dict[str, str] = {}
        for g in group_names or []:
            idx = np.flatnonzero(groups == g)
            chosen[g], selected[g] = best[g], "optuna"
            if cfg.exhaustive:
                ex_best, ex_score = exhaustive_best(scorer, areas, gates, idx)
                if ex_score > scorer.score(best[g], idx):
                    chosen[g], selected[g] = ex_best, "exhaustive"
        result["score"] = score_grouped(scorer, groups, chosen)
        result["group_by"] = cfg.group_by
        result["groups"] = {g: asdict(t) for g, t in chosen.items()}
        result["group_selected"] = selected
        result["group_sizes"] = {g: int((groups == g).sum()) for g in chosen}
        if cfg.exhaustive:
            result["exhaustive"] = {
                "score": result["score"],
                "areas": list(areas),
                "gates": len(gates),
                "seconds": round(time.perf_counter() - t1, 3),
                "optuna_gap": result["score"] - float(study.best_value),
            }
        if "exhaustive" in selected.values():
            result["selected"] = "exhaustive" if "optuna" not in selected.values() else "mixed"
    result.setdefault("selected", "optuna")
    result["optuna_best_score"] = float(study.best_value)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    write_metrics(Path(cfg.metrics), result)
    for path in save_study_plots(study, Path(cfg.plots_dir)):
        tracker.log_artifact(path, "study_plots")
    tracker.log_metrics(
        {"best_score": result["score"], "empty_baseline": result["empty_baseline"]}
        | ({"exhaustive_score": result["exhaustive"]["score"]} if cfg.exhaustive else {}),
        step=len(study.trials),
    )
    tracker.log_artifact(out)
    tracker.end()
    ex = result.get("exhaustive")
    print(
        f"thresholds: best {result['score']:.4f} after {result['n_trials']} trials "
        f"({remaining} new in {elapsed:.1f}s; empty baseline {result['empty_baseline']:.4f})"
        + (f"; exhaustive optimum {ex['score']:.4f} in {ex['seconds']}s" if ex else "")
        + f" -> {out}"
    )
    return result


def write_metrics(path: Path, result: dict[str, Any]) -> None:
    """The DVC metrics file of the stage: its scores and MLflow run id (``dvc exp show``)."""
    keys = (
        "score",
        "optuna_best_score",
        "empty_baseline",
        "n_trials",
        "selected",
        "size",
        "study_name",
        "mlflow_run_id",
    )
    metrics = {k: result.get(k) for k in keys}
    if "exhaustive" in result:
        metrics["exhaustive_score"] = result["exhaustive"]["score"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")

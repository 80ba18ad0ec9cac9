"""Stage ``thresholds``: an Optuna study over the triplet rule on the OOF maps, scored exactly
by :class:`pneumoseg.postprocess.TripletScorer` (one trial = O(N) vector operations), plus an
exhaustive scan of the whole uint8 grid to show the true optimum.

The study lives in a persistent storage and is named after the OOF data and the search space,
so a killed run continues the same study while a new model gets a new one.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from pneumoseg.params import Params, ThresholdSpace
from pneumoseg.postprocess import (
    Triplet,
    TripletScorer,
    exhaustive_best,
    gate_levels,
    score_grouped,
    suggest_triplet,
    triplet_from_params,
)
from pneumoseg.stages.oof import read_oof_ids
from pneumoseg.studies import (
    MlflowTrialLogger,
    fail_stale_trials,
    open_storage,
    resolve_storage,
    save_study_plots,
)
from pneumoseg.tracking import Tracker, git_info

log = logging.getLogger(__name__)


def read_manifest(path: str | Path) -> dict[str, dict[str, str]]:
    """ImageId -> manifest row."""
    with Path(path).open(newline="") as fh:
        return {r["ImageId"]: r for r in csv.DictReader(fh)}


def load_oof(params: Params) -> tuple[TripletScorer, list[tuple[str, int]], dict[str, dict]]:
    """The OOF maps as a scorer (native widths per image from the manifest), ids and manifest."""
    out = Path(params.oof.out_dir)
    ids = read_oof_ids(out / "ids.csv")
    manifest = read_manifest(Path(params.data.processed_dir) / "manifest.csv")
    native = np.array([int(manifest[i]["width"]) for i, _ in ids])
    cls = np.load(out / "cls.npy") if (out / "cls.npy").is_file() else None
    probs = np.load(out / "probs.npy", mmap_mode="r")
    masks = np.load(out / "masks.npy", mmap_mode="r")
    return TripletScorer(probs, masks, native, cls), ids, manifest


def has_cls(params: Params) -> bool:
    return (Path(params.oof.out_dir) / "cls.npy").is_file()


def search_space(space: ThresholdSpace, has_cls: bool) -> dict[str, Any]:
    """The ``suggest_triplet`` space (areas as integer ranges; gate only with a head)."""
    out: dict[str, Any] = {
        "top_threshold": tuple(space.top_threshold),
        "bottom_threshold": tuple(space.bottom_threshold),
        "min_area": (int(space.min_area[0]), int(space.min_area[1])),
    }
    if space.min_component_area is not None:
        lo, hi = space.min_component_area
        out["min_component_area"] = (int(lo), int(hi))
    if space.cls_gate is not None and has_cls:
        out["cls_gate"] = tuple(space.cls_gate)
    return out


def groups_of(params: Params, ids: list[tuple[str, int]], manifest: dict) -> np.ndarray | None:
    """Per-image group labels for conditional thresholds (``thresholds.group_by``)."""
    key = params.thresholds.group_by
    if key is None:
        return None
    return np.array([manifest[i].get(key) or "unknown" for i, _ in ids])


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
    scorer, ids, manifest = load_oof(params)
    space = search_space(cfg.space, has_cls(params))
    groups = groups_of(params, ids, manifest)
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
    tags = {"stage": "thresholds", "optuna_study": name, **git_info()}
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
            | {"oof.size": params.oof.size, "n_images": len(ids)}
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
        "size": params.oof.size,
        "empty_baseline": scorer.empty_baseline(),
        "study_name": name,
        "storage": storage_url,
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
    plot_dir = Path(params.evaluate.plots_dir).parent / "thresholds"
    for path in save_study_plots(study, plot_dir):
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


def load_postprocess(path: str | Path) -> tuple[Triplet, str | None, dict[str, Triplet]]:
    """(default triplet, group_by key or None, per-group triplets) from ``postprocess.json``."""
    data = json.loads(Path(path).read_text())
    fields = {f: data[f] for f in Triplet.__dataclass_fields__}
    groups = {g: Triplet(**t) for g, t in data.get("groups", {}).items()}
    return Triplet(**fields), data.get("group_by"), groups

"""Stage ``evaluate``: honest numbers for the deployed post-processing on the OOF set.

``metrics/evaluate.json`` holds the in-sample ``kaggle_dice`` (thresholds tuned on these very
images), ``kaggle_dice_cross_fitted`` (the deployed search re-run without each held-out fold)
and ``kaggle_dice_untouched`` (cross-fitted, over the images no decision saw), each with a
bootstrap 95% interval, and a ``provenance`` block listing every decision and the OOF images it
saw (see :mod:`pneumoseg.evaluation`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pneumoseg.arrays import read_gray
from pneumoseg.artifacts import (
    image_path,
    load_oof,
    native_widths,
    read_folds,
    write_csv,
)
from pneumoseg.evaluation import (
    PER_IMAGE_FIELDS,
    bootstrap_ci,
    cross_fitted,
    decisions,
    members_cross_fitted,
    per_image_rows,
    selection_records,
    untouched,
    untouched_reason,
)
from pneumoseg.files import write_json
from pneumoseg.params import Params
from pneumoseg.plots import evaluation_plots
from pneumoseg.postprocess import (
    PostProcess,
    SearchSettings,
    apply_triplet,
    group_labels,
    oof_scorer,
)
from pneumoseg.progress import progress_bar
from pneumoseg.tracking import Tracker

PER_IMAGE_TABLE = "per_image.json"  # the MLflow table of evaluate.per_image (sortable)


def scored(dice: np.ndarray | None, bootstrap: int) -> dict[str, Any]:
    """Mean and bootstrap interval of per-image scores (None for no images)."""
    if dice is None or len(dice) == 0:
        return {"mean": None, "ci95": None, "n_images": 0}
    return {
        "mean": float(dice.mean()),
        "ci95": bootstrap_ci(dice, bootstrap),
        "n_images": len(dice),
    }


def run(params: Params, progress: bool = True) -> dict[str, Any]:
    """CLI/DVC entry: write ``evaluate.out`` and plots, log them to MLflow."""
    cfg, mode, step = params.evaluate, params.ensemble.weights, params.ensemble.weight_step
    post = PostProcess.load(params.thresholds.out)
    scorer, ids, manifest = oof_scorer(params.oof.out_dir, params.data.processed_dir, post.weights)
    settings = SearchSettings.of(params.thresholds, scorer.has_cls)
    oof = load_oof(params.oof.out_dir)
    compared = len(oof.members) + (3 if mode == "fitted" else 2) if oof.members else 1
    tracker = Tracker(params.mlflow)
    tracker.start("evaluate", {"stage": "evaluate"})
    groups = group_labels(post.group_by, ids, manifest)  # the deployed triplet's groups
    dice = post.per_image(scorer, groups)
    folds = np.array([f for _, f in ids])
    positive = scorer.gt > 0
    n_searches = len(np.unique(folds)) if len(np.unique(folds)) > 1 else 0
    bar = progress_bar(
        total=n_searches * settings.trials * compared, desc="evaluate: cross-fitting",
        unit="trial", bars_allowed=progress,
    )  # fmt: skip
    labels = group_labels(settings.group_by, ids, manifest)
    native = native_widths(ids, manifest)
    by_member = None
    if oof.members:
        by_member = members_cross_fitted(oof, native, settings, mode, step, labels, bar.update)
        cf_dice, cf_tuned = by_member["weighted"]
    else:
        cf_dice, cf_tuned = cross_fitted(scorer, folds, settings, labels, bar.update)
    bar.close()
    found = decisions(
        ids,
        selection_records(params.oof.out_dir, oof),
        params.provenance.studies,
        read_folds(params.split.out),
        settings,
        mode if oof.members else None,
    )
    clean = untouched(ids, found)
    tuned, cf = scored(dice, cfg.bootstrap), scored(cf_dice, cfg.bootstrap)
    clean_dice = cf_dice[clean] if cf_dice is not None else None
    fresh = scored(clean_dice, cfg.bootstrap)
    reason = None
    if cf_dice is None:
        reason = "one fold only: nothing to cross-fit"
    elif not clean.any():
        reason = untouched_reason(found, len(ids))
    lost = [
        i for k, (i, _) in enumerate(ids) if manifest[i].get("has_mask") == "1" and not positive[k]
    ]
    result: dict[str, Any] = {
        "kaggle_dice": tuned["mean"],
        "kaggle_dice_ci95": tuned["ci95"],
        "kaggle_dice_cross_fitted": cf["mean"],
        "kaggle_dice_cross_fitted_ci95": cf["ci95"],
        "kaggle_dice_untouched": fresh["mean"],
        "kaggle_dice_untouched_ci95": fresh["ci95"],
        "kaggle_dice_untouched_reason": reason,
        "n_untouched": fresh["n_images"],
        "empty_baseline": scorer.empty_baseline(),
        "empty_baseline_untouched": scorer.empty_baseline(np.flatnonzero(clean))
        if clean.any()
        else None,
        "dice_pos": float(dice[positive].mean()) if positive.any() else 0.0,
        "empty_acc": float((dice[~positive] == 1).mean()) if (~positive).any() else 1.0,
        "n_images": len(dice),
        "n_positive": int(positive.sum()),
        "n_positive_lost": len(lost),  # a lesion that vanished when the mask was downsampled
        "size": scorer.size,
        "thresholds": post.as_dict(),
        "group_by": post.group_by,
        "provenance": {
            "decisions": [d.describe(len(ids)) for d in found],
            "untouched_images": int(clean.sum()),
        },
        "per_fold": {},
        "mlflow_run_id": tracker.run_id,
    }
    if by_member is not None:
        result["ensemble"] = {
            "member_weights": post.weights,
            "mode": mode,  # ensemble.weights: fitted or equal
            "cross_fitted": {
                name: scored(dice_k, cfg.bootstrap)
                | {"untouched": scored(None if dice_k is None else dice_k[clean], 0)["mean"]}
                for name, (dice_k, _) in by_member.items()
            },
        }
    for k in np.unique(folds):
        idx = folds == k
        result["per_fold"][str(int(k))] = {
            "kaggle_dice": float(dice[idx].mean()),
            "kaggle_dice_cross_fitted": float(cf_dice[idx].mean()) if cf_dice is not None else None,
            "empty_baseline": scorer.empty_baseline(np.flatnonzero(idx)),
            "n_images": int(idx.sum()),
            "cross_fit_thresholds": cf_tuned.get(int(k)),
        }
    out = Path(cfg.out)
    write_json(out, result)
    table = per_image_rows(
        ids,
        np.array([manifest[i].get("has_mask") == "1" for i, _ in ids]),
        {
            "dice_cross_fitted": cf_dice,
            "dice_in_sample": dice,
            "gt_pixels": scorer.gt,
            "pred_pixels": post.predicted_pixels(scorer, groups),
            "max_level": scorer.max_level(),
            "untouched": clean,
        },
        found,
    )
    write_csv(cfg.per_image, PER_IMAGE_FIELDS, table)

    def case(i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        image_id = ids[i][0]
        native = int(manifest[image_id]["width"])
        cls = None if scorer.cls is None else int(scorer.cls[i])
        pred = apply_triplet(scorer.map(i), post.triplet(manifest[image_id]), native, cls)
        image = read_gray(image_path(params.data.processed_dir, image_id), scorer.size)
        return image, scorer.truth(i), pred

    plots = evaluation_plots(Path(cfg.plots_dir), scorer, post.default, dice, cfg.gallery, case)
    numbers = {
        k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    tracker.log_metrics(numbers, step=0)
    tracker.log_artifact(out)
    tracker.log_table(table, PER_IMAGE_TABLE)
    for path in plots:
        tracker.log_artifact(path, "plots")
    tracker.end()
    if incomplete := tracker.incomplete_record("evaluate"):
        write_json(out, result | incomplete)
    print(summary_line(result, out))
    return result


def summary_line(result: dict[str, Any], out: Path) -> str:
    def fmt(key: str) -> str:
        value, ci = result[key], result.get(f"{key}_ci95")
        if value is None:
            return "n/a"
        return f"{value:.4f}" + (f" ({ci[0]:.4f}-{ci[1]:.4f})" if ci else "")

    return (
        f"evaluate: kaggle_dice in-sample {fmt('kaggle_dice')}, cross-fitted "
        f"{fmt('kaggle_dice_cross_fitted')}, untouched {fmt('kaggle_dice_untouched')} "
        f"[{result['n_untouched']} images]; empty baseline {result['empty_baseline']:.4f}, "
        f"dice_pos {result['dice_pos']:.4f} -> {out}"
    ) + "".join(
        f"\n  cross-fitted {name}: {fmt_score(entry['mean'])}, untouched "
        f"{fmt_score(entry['untouched'])}"
        for name, entry in (result.get("ensemble") or {}).get("cross_fitted", {}).items()
    )


def fmt_score(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"

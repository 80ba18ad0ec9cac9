"""Stage ``evaluate``: honest numbers for the tuned post-processing on the OOF set.

``kaggle_dice`` uses the thresholds tuned on all OOF images (optimistic: tuned and scored on the
same images); ``kaggle_dice_cross_fitted`` tunes the triplet (exhaustive grid) on the other folds
and scores each held-out fold with it: the number to expect on new data.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from pneumoseg.params import Params
from pneumoseg.postprocess import (
    PostProcess,
    Triplet,
    TripletScorer,
    apply_triplet,
    exhaustive_best,
    gate_levels,
    group_labels,
    oof_scorer,
    search_space,
)
from pneumoseg.tracking import Tracker


def per_image_dice(
    scorer: TripletScorer,
    default: Triplet,
    groups: np.ndarray | None,
    triplets: dict[str, Triplet],
) -> np.ndarray:
    """Dice per OOF image, each image with its group's triplet (or the default)."""
    if groups is None or not triplets:
        return scorer.per_image(default)
    dice = np.empty(len(groups))
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        dice[idx] = scorer.per_image(triplets.get(str(g), default), idx)
    return dice


def bootstrap_ci(values: np.ndarray, n: int, seed: int = 0) -> list[float] | None:
    """95% percentile bootstrap interval of the mean (vectorised, seeded)."""
    if n == 0 or len(values) == 0:
        return None
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n, len(values)))].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def cross_fitted(
    scorer: TripletScorer,
    folds: np.ndarray,
    areas: list[float],
    gates: list[float | None] | None = None,
    groups: np.ndarray | None = None,
) -> tuple[np.ndarray | None, dict[int, dict[str, Any]]]:
    """Per-image dice where each fold is scored with the triplet tuned (exhaustive grid, every
    classifier gate in ``gates``) on the other folds; with ``groups``, one triplet per group,
    tuned on the other folds' images of that group (the ungrouped one when there are none)."""
    unique = np.unique(folds)
    if len(unique) < 2:
        return None, {}
    gates = gates or [None]
    dice = np.empty(len(folds))
    tuned: dict[int, dict[str, Any]] = {}
    for k in unique:
        held = folds == k
        rest = np.flatnonzero(~held)
        best, score = exhaustive_best(scorer, areas, gates, rest)
        tuned[int(k)] = dataclasses.asdict(best) | {"tuned_score": score}
        if groups is None:
            dice[held] = scorer.per_image(best, np.flatnonzero(held))
            continue
        tuned[int(k)]["groups"] = {}
        for g in np.unique(groups[held]):
            mine = np.flatnonzero(held & (groups == g))
            train = np.flatnonzero(~held & (groups == g))
            t = exhaustive_best(scorer, areas, gates, train)[0] if train.size else best
            dice[mine] = scorer.per_image(t, mine)
            tuned[int(k)]["groups"][str(g)] = dataclasses.asdict(t)
    return dice, tuned


def _plots(
    params: Params,
    scorer: TripletScorer,
    triplet: Triplet,
    dice: np.ndarray,
    positive: np.ndarray,
    ids: list[tuple[str, int]],
    native: np.ndarray,
    image_triplets: list[Triplet],
    cls: np.ndarray | None,
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pneumoseg.data import read_gray
    from pneumoseg.plots import save_overlay_grid

    out = Path(params.evaluate.plots_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    bottoms = np.arange(0, 256)
    scores = [
        scorer.score(dataclasses.replace(triplet, bottom_threshold=float(b) / 255)) for b in bottoms
    ]
    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    ax.plot(bottoms / 255, scores, label="tuned top/min_area, varying bottom")
    ax.axhline(scorer.empty_baseline(), color="grey", ls="--", label="all-empty baseline")
    ax.axvline(triplet.bottom_threshold, color="red", lw=0.8, label="tuned bottom")
    ax.set_xlabel("bottom threshold")
    ax.set_ylabel("Kaggle mean dice (OOF)")
    ax.legend(fontsize=8)
    fig.savefig(out / "score_vs_bottom.png", dpi=90)
    plt.close(fig)
    written.append(out / "score_vs_bottom.png")

    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    ax.hist(
        [dice[positive], dice[~positive]],
        bins=20,
        range=(0, 1),
        stacked=True,
        label=["pneumothorax", "no pneumothorax"],
    )
    ax.set_xlabel("per-image dice")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    fig.savefig(out / "dice_histogram.png", dpi=90)
    plt.close(fig)
    written.append(out / "dice_histogram.png")

    n = params.evaluate.gallery
    probs = np.load(Path(params.oof.out_dir) / "probs.npy", mmap_mode="r")
    masks = np.load(Path(params.oof.out_dir) / "masks.npy", mmap_mode="r")
    fp = [i for i in np.argsort(dice, kind="stable") if not positive[i] and dice[i] == 0][:n]
    fn = [i for i in np.argsort(dice, kind="stable") if positive[i]][:n]
    root = Path(params.data.processed_dir)
    for name, pick in (("worst_false_positives", fp), ("worst_false_negatives", fn)):
        if not pick:
            continue
        cases = []
        for i in pick:
            image_id = ids[i][0]
            c = None if cls is None else int(cls[i])
            pred = apply_triplet(np.asarray(probs[i]), image_triplets[i], int(native[i]), c)
            image = read_gray(root / "images" / f"{image_id}.png", scorer.size)
            cases.append((image, np.asarray(masks[i]), pred, float(dice[i])))
        written.append(save_overlay_grid(cases, out / f"{name}.png"))
    return written


def run(params: Params, progress: bool = True) -> dict[str, Any]:
    """CLI/DVC entry: write ``evaluate.out`` and plots, log them to MLflow."""
    scorer, ids, manifest = oof_scorer(params.oof.out_dir, params.data.processed_dir)
    post = PostProcess.load(params.thresholds.out)
    default, group_by, triplets = post.default, post.group_by, post.groups
    groups = group_labels(group_by, ids, manifest)
    dice = per_image_dice(scorer, default, groups, triplets)
    folds = np.array([f for _, f in ids])
    positive = scorer.gt > 0
    gates = gate_levels(search_space(params.thresholds.space, scorer.has_cls).get("cls_gate"))
    tracker = Tracker(params.mlflow)
    tracker.start("evaluate", {"stage": "evaluate"})
    cf_dice, cf_tuned = cross_fitted(
        scorer, folds, params.thresholds.exhaustive_areas, gates, groups
    )
    result: dict[str, Any] = {
        "kaggle_dice": float(dice.mean()),
        "kaggle_dice_ci95": bootstrap_ci(dice, params.evaluate.bootstrap),
        "kaggle_dice_cross_fitted": float(cf_dice.mean()) if cf_dice is not None else None,
        "empty_baseline": scorer.empty_baseline(),
        "dice_pos": float(dice[positive].mean()) if positive.any() else 0.0,
        "empty_acc": float((dice[~positive] == 1).mean()) if (~positive).any() else 1.0,
        "n_images": len(dice),
        "n_positive": int(positive.sum()),
        "thresholds": dataclasses.asdict(default),
        "group_by": group_by,
        "per_fold": {},
        "mlflow_run_id": tracker.run_id,
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
    out = Path(params.evaluate.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    native = np.array([int(manifest[i]["width"]) for i, _ in ids])
    image_triplets = [
        default if groups is None else triplets.get(str(g), default)
        for g in (groups if groups is not None else [None] * len(ids))
    ]
    cls_path = Path(params.oof.out_dir) / "cls.npy"
    cls = np.load(cls_path) if cls_path.is_file() else None
    plots = _plots(params, scorer, default, dice, positive, ids, native, image_triplets, cls)
    flat = {
        k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    tracker.log_metrics(flat, step=0)
    tracker.log_artifact(out)
    for path in plots:
        tracker.log_artifact(path, "plots")
    tracker.end()
    cf = result["kaggle_dice_cross_fitted"]
    ci = result["kaggle_dice_ci95"] or [float("nan")] * 2
    print(
        f"evaluate: kaggle_dice {result['kaggle_dice']:.4f} (95% CI {ci[0]:.4f}-{ci[1]:.4f}), "
        f"cross-fitted {'n/a (one fold)' if cf is None else f'{cf:.4f}'}, "
        f"empty baseline {result['empty_baseline']:.4f}, dice_pos {result['dice_pos']:.4f} "
        f"-> {out}"
    )
    return result

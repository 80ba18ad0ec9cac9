"""Honest numbers on the OOF set: cross-fitting, bootstrap intervals and provenance.

Every score says which decisions saw its images:

- ``kaggle_dice``: the deployed thresholds, tuned on all OOF images: in-sample, optimistic.
- ``kaggle_dice_cross_fitted``: for each held-out fold, the deployed search
  (:func:`pneumoseg.postprocess.tune`) re-run on the other folds' images, applied to this fold:
  no threshold saw the image it scores. Other decisions (checkpoint selection on the held-out
  fold, a study scored on OOF images) may still have seen them.
- ``kaggle_dice_untouched``: the cross-fitted score over the images that no decision saw at all:
  the number to expect on new data.

With ensemble members, the fitted member weights are cross-fitted like the thresholds (refitted
on the other folds' images, then the triplet tuned on those weighted maps), and each member
alone and the equal-weight mean are cross-fitted beside them (:func:`members_cross_fitted`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pneumoseg.artifacts import MEMBERS_DIR, OofSet, read_oof_models
from pneumoseg.folds import FoldImages
from pneumoseg.postprocess import (
    SearchSettings,
    TripletScorer,
    blended_scorer,
    fit_weights,
    oof_members,
    tune,
)


def bootstrap_ci(values: np.ndarray, n: int, seed: int = 0) -> list[float] | None:
    """95% percentile bootstrap interval of the mean of ``values`` (``n`` resamples, seeded);
    None without resamples or values."""
    values = np.asarray(values, dtype=np.float64)
    if n == 0 or len(values) == 0:
        return None
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n, len(values)))].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def cross_fitted(
    scorer: TripletScorer | Mapping[int, TripletScorer],
    folds: np.ndarray,
    settings: SearchSettings,
    groups: np.ndarray | None = None,
    after_trial: Callable[[], None] | None = None,
) -> tuple[np.ndarray | None, dict[int, dict[str, Any]]]:
    """Per-image dice where each fold is scored with the post-processing that the deployed
    search (same trials, seed, space, grid, groups) finds on the other folds' images; with
    fewer than two folds there is nothing to cross-fit (None). ``scorer`` may differ per
    held-out fold (fold -> scorer: maps whose member weights were fitted without it).
    ``after_trial``: called after each search trial (progress)."""
    unique = np.unique(folds)
    if len(unique) < 2:
        return None, {}
    dice = np.empty(len(folds))
    tuned: dict[int, dict[str, Any]] = {}
    for k in unique:
        held = np.flatnonzero(folds == k)
        fold_scorer = scorer[int(k)] if isinstance(scorer, Mapping) else scorer
        post, report = tune(fold_scorer, settings, groups, np.flatnonzero(folds != k), after_trial)
        dice[held] = post.per_image(fold_scorer, groups, held)
        tuned[int(k)] = post.as_dict() | {
            "tuned_score": report["score"],
            "selected": report["selected"],
        }
    return dice, tuned


def members_cross_fitted(
    oof: OofSet,
    native: np.ndarray,
    settings: SearchSettings,
    mode: str,
    step: float,
    groups: np.ndarray | None = None,
    after_trial: Callable[[], None] | None = None,
) -> dict[str, tuple[np.ndarray | None, dict[int, dict[str, Any]]]]:
    """:func:`cross_fitted` of each member alone, of the equal-weight mean and (``weighted``)
    of the deployed combination: with ``mode`` fitted, the weights are refitted on the other
    folds' images for each held-out fold (recorded in its ``member_weights``)."""
    maps, cls = oof_members(oof)
    folds = oof.folds

    def scorer(weights: Mapping[str, float]) -> TripletScorer:
        return blended_scorer(maps, oof.masks, native, cls, weights)

    out = {
        name: cross_fitted(scorer({n: float(n == name) for n in maps}), folds, settings,
                           groups, after_trial)
        for name in maps
    }  # fmt: skip
    out["equal"] = cross_fitted(
        scorer(dict.fromkeys(maps, 1.0)), folds, settings, groups, after_trial
    )
    if mode != "fitted" or len(np.unique(folds)) < 2:
        out["weighted"] = out["equal"]
        return out
    others = {int(k): np.flatnonzero(folds != k) for k in np.unique(folds)}
    fits = fit_weights(maps, oof.masks, native, cls, settings, step, others)
    dice, tuned = cross_fitted(
        {k: scorer(fit.weights) for k, fit in fits.items()}, folds, settings, groups, after_trial
    )
    for k, fit in fits.items():
        tuned[k]["member_weights"] = fit.weights
    out["weighted"] = (dice, tuned)
    return out


@dataclass
class Decision:
    """A choice that shaped the OOF scores, and the OOF images it saw while choosing."""

    name: str
    how: str
    saw: set[str] = field(default_factory=set)
    affects: tuple[str, ...] = ()

    def describe(self, n_oof: int) -> dict[str, Any]:
        return {
            "decision": self.name,
            "how": self.how,
            "oof_images_seen": len(self.saw),
            "oof_images": n_oof,
            "affects": list(self.affects),
        }


ALL_SCORES = ("kaggle_dice", "kaggle_dice_cross_fitted")


def decisions(
    ids: list[tuple[str, int]],
    models: dict[int, dict[str, Any]],
    studies: list[Any],
    folds: dict[str, tuple[int, int]],
    settings: SearchSettings,
    members: str | None = None,
) -> list[Decision]:
    """The decisions behind an OOF set: each fold's checkpoint selection (``models``: what
    ``oof`` recorded from the model files), each applied study (``provenance.studies``), the
    member weights (``members``: how they were set, None for one member), the deployed
    threshold search and their cross-fitted twins."""
    oof = {i for i, _ in ids}
    by_fold: dict[int, set[str]] = {}
    for i, k in ids:
        by_fold.setdefault(k, set()).add(i)
    out: list[Decision] = []
    selection = {k: (m.get("selection") or {}).get("mode", "held_out") for k, m in models.items()}
    saw = set().union(*(by_fold.get(k, set()) for k, on in selection.items() if on == "held_out"))
    hows = ", ".join(f"fold {k}: {on}" for k, on in sorted(selection.items()))
    out.append(
        Decision(
            "checkpoint selection",
            f"train.selection.mode per fold ({hows}); held_out picks epochs on the images OOF "
            "scores, inner on a split of the fold's training images, none picks nothing",
            saw,
            ALL_SCORES,
        )
    )
    observed = {k: m.get("observe_heldout_every") or 0 for k, m in sorted(models.items())}
    looked = set().union(*(by_fold.get(k, set()) for k, every in observed.items() if every))
    if looked:
        every = ", ".join(f"fold {k}: {n}" for k, n in observed.items() if n)
        out.append(
            Decision(
                "held-out curves (observed only)",
                f"train.observe_heldout_every ({every} epochs): each fold's held-out loss, Kaggle "
                "dice and dice_pos logged as the observed_heldout_* curves. No training decision "
                "reads them, but a person may have looked at them before changing params",
                looked,
            )
        )
    tuned = {k: m["pseudo_labels"] for k, m in sorted(models.items()) if m.get("pseudo_labels")}
    if tuned:
        out.append(pseudo_label_decision(tuned))
    for study in studies:
        seen: set[str] = set()
        for f in study.folds:
            images = FoldImages.of(folds, f, study.selection, study.inner_fraction, study.seed)
            seen |= set(images.select) & oof
        out.append(
            Decision(
                f"study {study.name} (trial {study.trial})",
                f"trials scored on the {study.selection} images of folds {list(study.folds)}; "
                "its values train every fold",
                seen,
                ALL_SCORES,
            )
        )
    if members:
        out.append(
            Decision(
                "member weights",
                f"ensemble.weights ({members}) on all OOF images: the grid candidate whose maps "
                "reach the best exhaustive triplet score",
                oof,
                ("kaggle_dice",),
            )
        )
        out.append(
            Decision(
                "member weights, cross-fitted",
                "the same fit per held-out fold, on the other folds' images",
                set(),
            )
        )
    search = f"Optuna TPE ({settings.trials} trials)" + (
        " + the exhaustive grid" if settings.exhaustive else ""
    )
    out.append(Decision("threshold search", f"{search} on all OOF images", oof, ("kaggle_dice",)))
    out.append(
        Decision(
            "threshold search, cross-fitted",
            f"the same search per held-out fold, on the other folds' images ({search})",
            set(),
        )
    )
    return out


def pseudo_label_decision(tuned: dict[int, dict[str, Any]]) -> Decision:
    """The fine-tuning on pseudo-labels (``pseudo_labels`` of each fine-tuned fold's model): test
    images only, each fold labelled by its own model, so no OOF image is seen."""
    first = next(iter(tuned.values()))
    counts = "; ".join(
        f"fold {k}: {p['n_positive']} positive + {p['n_empty']} empty of {p['n_test']} test "
        f"images, labelled by {', '.join(p['labelled_by'])}"
        for k, p in tuned.items()
    )
    return Decision(
        "pseudo-labels",
        f"folds {sorted(tuned)} fine-tuned on test images their own model labelled (largest "
        f"probability >= {first['positive_confidence']} and mask (>= "
        f"{first['pixel_threshold']}) area >= {first.get('positive_min_area', 0)} px: positive; "
        f"< {first['negative_confidence']}: empty): {counts}. "
        "Test images only, never an OOF image; the test truth is never read",
        set(),
    )


def selection_records(oof_dir: str, oof: OofSet) -> dict[int, dict[str, Any]]:
    """Per fold, the checkpoint selection of its models: a member that selected on the
    held-out fold makes the fold's images seen, whichever member it is."""
    records = read_oof_models(oof_dir)
    for name in oof.members:
        for k, record in read_oof_models(Path(oof_dir) / MEMBERS_DIR / name).items():
            if (record.get("selection") or {}).get("mode", "held_out") == "held_out":
                records[k] = record
    return records


def untouched(ids: list[tuple[str, int]], found: list[Decision]) -> np.ndarray:
    """Whether each OOF image was seen by no decision that affects the cross-fitted score."""
    seen = set().union(*(d.saw for d in found if "kaggle_dice_cross_fitted" in d.affects))
    return np.array([i not in seen for i, _ in ids], dtype=bool)


def untouched_reason(found: list[Decision], n_oof: int) -> str:
    """Why no OOF image is untouched (the decisions that saw them all)."""
    names = [d.name for d in found if "kaggle_dice_cross_fitted" in d.affects and d.saw]
    return f"every OOF image was seen by a decision ({', '.join(names)}) of {n_oof} images"


# The columns of the per-image table (``evaluate.per_image``; MLflow: ``per_image.json``).
PER_IMAGE_FIELDS = (
    "row",
    "ImageId",
    "fold",
    "has_mask",
    "dice_cross_fitted",
    "dice_in_sample",
    "gt_pixels",
    "pred_pixels",
    "max_prob",
    "untouched",
    "seen_by",
)


def per_image_rows(
    ids: list[tuple[str, int]],
    has_mask: np.ndarray,
    scores: Mapping[str, np.ndarray | None],
    found: list[Decision],
) -> list[dict[str, Any]]:
    """One row per OOF image, in OOF row order: its id (as in the manifest: pseudonymised when
    ids are), fold, whether it has a lesion, the cross-fitted and in-sample dice, truth and
    predicted pixels (at the OOF map size, the deployed post-processing), its largest
    probability, and the decisions that saw it (``seen_by``; none: ``untouched``).
    ``scores``: ``dice_cross_fitted`` (None with one fold), ``dice_in_sample``, ``gt_pixels``,
    ``pred_pixels``, ``max_level`` (0..255) and ``untouched`` (:func:`untouched`)."""
    cross = scores["dice_cross_fitted"]
    rows = []
    for k, (image_id, fold) in enumerate(ids):
        seen = [d.name for d in found if image_id in d.saw]
        rows.append(
            {
                "row": k,
                "ImageId": image_id,
                "fold": fold,
                "has_mask": int(has_mask[k]),
                "dice_cross_fitted": None if cross is None else round(float(cross[k]), 6),
                "dice_in_sample": round(float(scores["dice_in_sample"][k]), 6),
                "gt_pixels": int(scores["gt_pixels"][k]),
                "pred_pixels": int(scores["pred_pixels"][k]),
                "max_prob": round(int(scores["max_level"][k]) / 255, 4),
                "untouched": int(scores["untouched"][k]),
                "seen_by": "; ".join(seen),
            }
        )
    return rows

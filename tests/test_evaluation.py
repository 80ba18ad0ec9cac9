"""Honest numbers, checked against computations made by hand: bootstrap intervals, cross-fitting
of the deployed search, and which OOF images each decision saw."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pneumoseg.evaluation import bootstrap_ci, cross_fitted, decisions, untouched
from pneumoseg.folds import FoldImages
from pneumoseg.params import AppliedStudy
from pneumoseg.postprocess import SearchSettings, Triplet, TripletScorer, kaggle_dice_naive


def test_bootstrap_interval_by_hand() -> None:
    assert bootstrap_ci(np.full(7, 0.25), 200) == [0.25, 0.25]  # no spread, no interval
    # two values: resampled means of 2 draws are 0, 0.5 or 1 with chances 1/4, 1/2, 1/4, so
    # the 2.5% and 97.5% percentiles are the extremes
    assert bootstrap_ci(np.array([0.0, 1.0]), 4000) == [0.0, 1.0]
    assert bootstrap_ci(np.array([1.0, 2.0]), 0) is None and bootstrap_ci(np.array([]), 9) is None
    # a normal sample: the interval is mean +- 1.96 sd / sqrt(n), to a few percent
    x = np.random.default_rng(3).normal(0.5, 0.2, size=2000)
    lo, hi = bootstrap_ci(x, 4000)
    half = 1.96 * x.std() / np.sqrt(len(x))
    assert lo == pytest.approx(x.mean() - half, abs=0.1 * half)
    assert hi == pytest.approx(x.mean() + half, abs=0.1 * half)


VALUES = (40, 90, 160, 220)  # every map uses only these levels: ties act alike on every fold


def two_fold_maps() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fold 0 wants a low bottom threshold, fold 1 a high one: its lesions are only the pixels
    at 220, surrounded by 160."""
    rng = np.random.default_rng(0)
    probs, masks, folds = [], [], []
    for fold in (0, 1):
        for k in range(6):
            p = np.full((8, 8), VALUES[0], np.uint8)
            m = np.zeros((8, 8), np.uint8)
            if k < 4:  # a positive image
                r, c = rng.integers(0, 4, size=2)
                p[r : r + 4, c : c + 4] = VALUES[2]
                if fold == 0:
                    m[r : r + 4, c : c + 4] = 1  # the whole 160 region is the lesion
                else:
                    p[r + 1 : r + 3, c + 1 : c + 3] = VALUES[3]
                    m[r + 1 : r + 3, c + 1 : c + 3] = 1  # only the 220 core
            else:
                p[rng.integers(0, 8), rng.integers(0, 8)] = VALUES[1]  # a stray pixel
            probs.append(p)
            masks.append(m)
            folds.append(fold)
    return np.stack(probs), np.stack(masks), np.array(folds)


def brute_force_best(probs: np.ndarray, masks: np.ndarray, areas: list[float]) -> float:
    """The best mean dice over every (area, top, bottom <= top) between the levels in use."""
    cuts = [0, 60, 120, 190, 240]  # one threshold between each pair of levels
    best = -1.0
    for area, top, bottom in itertools.product(areas, cuts, cuts):
        if bottom <= top:
            t = Triplet(top_threshold=top / 255, min_area=area, bottom_threshold=bottom / 255)
            best = max(best, float(kaggle_dice_naive(probs, masks, t, 8).mean()))
    return best


def test_cross_fitting_scores_each_fold_with_the_other_folds_optimum() -> None:
    probs, masks, folds = two_fold_maps()
    scorer = TripletScorer(probs, masks, 8)
    areas = [0.0, 2.0]
    settings = SearchSettings(
        trials=5,
        seed=0,
        space={"top_threshold": (0.2, 0.95), "bottom_threshold": (0.05, 0.9), "min_area": (0, 2)},
        exhaustive=True,
        areas=tuple(areas),
        gates=(None,),
    )
    dice, tuned = cross_fitted(scorer, folds, settings)
    assert dice is not None and set(tuned) == {0, 1}
    for k in (0, 1):
        rest, held = folds != k, folds == k
        # tuned on the other fold only: as good as the brute force there ...
        assert tuned[k]["tuned_score"] == pytest.approx(
            brute_force_best(probs[rest], masks[rest], areas), abs=1e-12
        )
        t = Triplet(**{f: tuned[k][f] for f in Triplet.__dataclass_fields__})
        expected = kaggle_dice_naive(probs[held], masks[held], t, 8)
        np.testing.assert_allclose(dice[held], expected, atol=1e-12)  # ... and applied here
    # the folds disagree, so cross-fitting costs: below each fold's own (in-sample) optimum
    for k in (0, 1):
        held = folds == k
        assert dice[held].mean() < brute_force_best(probs[held], masks[held], areas) - 0.05
    one_fold, _ = cross_fitted(scorer, np.zeros(len(folds), int), settings)
    assert one_fold is None


def test_provenance_counts_the_images_each_decision_saw() -> None:
    # 3 folds of 10 images (3 positive each); OOF holds folds 0 and 1
    folds = {f"img{f}{i}": (f, int(i < 3)) for f in range(3) for i in range(10)}
    ids = [(i, f) for i, (f, _) in sorted(folds.items()) if f in (0, 1)]
    settings = SearchSettings(3, 0, {}, True, (0.0,), (None,))
    study = AppliedStudy(
        name="s", trial=2, folds=[0], selection="inner", inner_fraction=0.2, seed=5
    )
    models = {0: {"selection": {"mode": "inner"}}, 1: {"selection": {"mode": "inner"}}}
    found = decisions(ids, models, [study], folds, settings)
    by_name = {d.name: d for d in found}
    assert by_name["checkpoint selection"].saw == set()  # inner splits: no OOF image
    # the study scored its trials on the inner split of fold 0's training images (folds 1, 2)
    inner = set(FoldImages.of(folds, 0, "inner", 0.2, 5).select)
    assert inner and not inner & {i for i, (f, _) in folds.items() if f == 0}
    seen = by_name["study s (trial 2)"].saw
    assert seen == inner & {i for i, _ in ids} and seen  # its fold-1 images are OOF images
    assert by_name["threshold search"].saw == {i for i, _ in ids}
    clean = untouched(ids, found)
    assert [i for (i, _), c in zip(ids, clean, strict=True) if not c] == sorted(seen)
    # held-out selection (round 1) sees every OOF image of its fold
    models[1] = {"selection": {"mode": "held_out"}}
    found = decisions(ids, models, [], folds, settings)
    assert found[0].saw == {i for i, f in ids if f == 1}
    assert untouched(ids, found).tolist() == [f == 0 for _, f in ids]
    # models from before selection was recorded selected on the held-out fold
    found = decisions(ids, {0: {}, 1: {}}, [], folds, settings)
    assert not untouched(ids, found).any()


def test_inner_split_is_stratified_seeded_and_disjoint() -> None:
    folds = {f"i{k:03d}": (k % 5, int(k % 4 == 0)) for k in range(200)}
    images = FoldImages.of(folds, 2, "inner", 0.15, 42)
    train, select, held = set(images.train), set(images.select), set(images.held_out)
    assert not train & select and not (train | select) & held
    assert len(train | select | held) == 200 and len(held) == 40
    positives = [i for i in select if folds[i][1]]
    assert len(select) == pytest.approx(0.15 * 160, abs=1)
    assert len(positives) == round(0.15 * 40)  # stratified: 15% of the 40 training positives
    assert FoldImages.of(folds, 2, "inner", 0.15, 42) == images
    assert FoldImages.of(folds, 2, "inner", 0.15, 43).select != images.select
    assert FoldImages.of(folds, 2, "none", 0.15, 42).select == []
    assert FoldImages.of(folds, 2, "held_out", 0.15, 42).select == images.held_out

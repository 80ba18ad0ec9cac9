"""Triplet post-processing: reference semantics, exact fast scorer, exhaustive search, Optuna."""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from pneumoseg.postprocess import (
    Triplet,
    TripletScorer,
    apply_triplet,
    exhaustive_best,
    gate_levels,
    kaggle_dice_naive,
    level,
    scale_area,
    score_grouped,
    suggest_triplet,
    triplet_from_params,
)

N, S = 60, 32
NATIVES = np.array([64, 128, 256])


def _data(n: int = N, s: int = S, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Soft-edged disks: a strong one over the truth of positives, weaker decoys, speckle."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:s, :s]
    probs = np.empty((n, s, s), dtype=np.uint8)
    masks = np.zeros((n, s, s), dtype=np.uint8)
    for i in range(n):
        field = rng.random((s, s)) * rng.uniform(0.0, 0.5) * (rng.random((s, s)) < 0.3)
        positive = rng.random() < 0.4
        for b in range(int(rng.integers(0, 3)) + positive):
            strong = positive and b == 0
            cy, cx = rng.uniform(0, s, 2)
            r = rng.uniform(2.5, s / 4) if strong else rng.uniform(1.0, s / 6)
            d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
            peak = rng.uniform(0.6, 1.0) if strong else rng.uniform(0.15, 0.7)
            field = np.maximum(field, np.clip((r - d) / 1.5 + 0.5, 0, 1) * peak)
            if strong:
                masks[i] = d < r + rng.normal(0, 0.5)
        probs[i] = np.clip(np.rint(field * 255), 0, 255)
    probs[0] = 0  # all-zero map on ...
    probs[1] = 255  # ... and a saturated one
    return probs, masks


def _threshold(rng: np.random.Generator) -> float:
    """A threshold that is random, an exact level, a half-way tie, or a boundary."""
    kind = rng.integers(0, 4)
    if kind == 0:
        return float(rng.random())
    if kind == 1:
        return int(rng.integers(0, 256)) / 255
    if kind == 2:
        return (2 * int(rng.integers(0, 255)) + 1) / 510
    return float(rng.choice([0.0, 1.0]))


def _random_triplet(rng: np.random.Generator, components: bool, gate: bool) -> Triplet:
    return Triplet(
        top_threshold=_threshold(rng),
        min_area=float(rng.choice([0.0, rng.uniform(0, 3000), int(rng.integers(0, 40)) * 64])),
        bottom_threshold=_threshold(rng),
        min_component_area=float(rng.choice([0.0, rng.uniform(0, 600)])) if components else 0.0,
        cls_gate=_threshold(rng) if gate else None,
    )


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return _data()


def test_level_and_scale_area() -> None:
    assert [level(k / 255) for k in range(256)] == list(range(256))
    assert (level(0.0), level(1.0), level(0.5), level(1 / 510)) == (0, 255, 128, 0)
    for bad in (-0.01, 1.01, math.nan):
        with pytest.raises(ValueError):
            level(bad)
    assert scale_area(2000, 256, 1024) == 125
    assert scale_area(2001, 256, 1024) == 126  # 125.0625 -> ceil
    assert scale_area(900, 100, 300) == 100  # exact rationals (float gives 100.00000000000001)
    assert scale_area(0, 256, 1024) == 0
    assert scale_area(0.001, 256, 1024) == 1
    assert scale_area(np.float32(16.0), 256, 1024) == 1
    with pytest.raises(ValueError):
        scale_area(-1, 256, 1024)
    with pytest.raises(ValueError):
        Triplet(0.5, -1.0, 0.2)
    with pytest.raises(ValueError):
        Triplet(0.5, 0.0, 1.5)


def test_apply_triplet_semantics() -> None:
    prob = np.zeros((8, 8), dtype=np.uint8)
    prob[0:2, 0:2] = 200  # 4 strong pixels (a component)
    prob[0:2, 2:4] = 100  # 4 weak pixels, touching the strong block
    prob[7, 7] = 100  # isolated weak pixel
    above = Triplet(top_threshold=199 / 255, min_area=4, bottom_threshold=99 / 255)
    mask = apply_triplet(prob, above, native=8)
    assert mask.dtype == np.uint8 and mask.sum() == 9  # strict >: 200 > 199 and 100 > 99
    strict = Triplet(top_threshold=200 / 255, min_area=1, bottom_threshold=99 / 255)
    assert apply_triplet(prob, strict, native=8).sum() == 0  # 200 is not > 200
    assert apply_triplet(prob, Triplet(199 / 255, 5, 0.0), native=8).sum() == 0  # 4 < 5
    # native 16 on an 8x8 map: areas / 4, ceil -> 13 native = 3.25 -> 4 px (kept), 17 -> 5 px
    assert apply_triplet(prob, Triplet(199 / 255, 13, 0.0), native=16).sum() == 9
    assert apply_triplet(prob, Triplet(199 / 255, 16, 0.0), native=16).sum() == 9
    assert apply_triplet(prob, Triplet(199 / 255, 17, 0.0), native=16).sum() == 0
    comps = Triplet(199 / 255, 4, 99 / 255, min_component_area=2)
    assert apply_triplet(prob, comps, native=8).sum() == 8  # isolated pixel dropped
    big = Triplet(199 / 255, 4, 99 / 255, min_component_area=9)
    assert apply_triplet(prob, big, native=8).sum() == 0  # nothing left -> empty
    diag = np.zeros((4, 4), dtype=np.uint8)
    diag[0, 0] = diag[1, 1] = 255  # diagonal neighbours: one 8-connected component
    assert apply_triplet(diag, Triplet(0.5, 0, 0.5, min_component_area=2), native=4).sum() == 2
    gated = Triplet(0.5, 0, 0.5, cls_gate=100 / 255)
    assert apply_triplet(diag, gated, native=4, cls_u8=100).sum() == 0  # 100 <= 100
    assert apply_triplet(diag, gated, native=4, cls_u8=101).sum() == 2
    with pytest.raises(ValueError):
        apply_triplet(diag, gated, native=4)


def test_component_filter_matches_full_frame_labelling(data: tuple[np.ndarray, np.ndarray]) -> None:
    """apply_triplet labels only the foreground's bounding box; compare with the whole map."""
    probs, _ = data
    rng = np.random.default_rng(7)
    for prob in probs:
        lvl, min_px = int(rng.integers(0, 200)), int(rng.integers(1, 30))
        t = Triplet(0.0, 0, lvl / 255, min_component_area=min_px)  # native == S: no scaling
        _, labels, stats, _ = cv2.connectedComponentsWithStats(
            (prob > lvl).astype(np.uint8), connectivity=8
        )
        keep = stats[:, cv2.CC_STAT_AREA] >= min_px
        keep[0] = False
        assert np.array_equal(apply_triplet(prob, t, native=S), keep[labels].astype(np.uint8))


def _labelled_components(prob: np.ndarray, truth: np.ndarray, lvl: int) -> list[tuple[int, int]]:
    """Sorted (area, truth overlap) of the 8-connected components of ``prob > lvl`` (cv2)."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(
        (prob > lvl).astype(np.uint8), connectivity=8, ltype=cv2.CV_32S
    )
    overlap = np.bincount(labels[truth != 0], minlength=count)
    return sorted(zip(stats[1:, cv2.CC_STAT_AREA].tolist(), overlap[1:].tolist(), strict=True))


def test_component_table_equals_labelling_at_every_level(
    data: tuple[np.ndarray, np.ndarray],
) -> None:
    """One max-tree per map gives, at all 256 levels, exactly the components (area, truth
    overlap) that labelling ``map > level`` finds; maps of only zeros or one value included."""
    probs, masks = data
    probs, masks = probs[:12].copy(), masks[:12].copy()
    probs[0] = 0  # nothing at any level
    probs[1] = 255  # one component (the whole map) at every level but 255
    probs[2, ::2, ::2] = 0  # a grid of holes: many small components at low levels
    scorer = TripletScorer(probs, masks, native=S, batch=5)
    table = scorer.components
    assert table.n == len(probs) and len(table.area) > 0
    seen = 0
    for lvl in range(256):
        ptr, areas, overlaps = table.at(lvl)
        for i in range(len(probs)):
            mine = slice(ptr[i], ptr[i + 1])
            got = sorted(zip(areas[mine].tolist(), overlaps[mine].tolist(), strict=True))
            assert got == _labelled_components(probs[i], masks[i], lvl), (i, lvl)
            seen += len(got)
    assert seen > 1000  # the maps really have components at many levels


def test_component_table_cached_beside_the_working_copy(
    data: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """A second scorer of the same maps reads the table from the cache folder instead of
    building it; maps that changed get their own table and the same scores as without a cache."""
    from pneumoseg.postprocess.components import ComponentTable, file_fingerprint

    probs, masks = data
    files = [tmp_path / "probs.npy", tmp_path / "masks.npy"]
    np.save(files[0], probs)
    np.save(files[1], masks)
    cache = tmp_path / "cache"
    t = Triplet(0.5, 0, 0.3, min_component_area=40)
    key = file_fingerprint(*files)
    first = TripletScorer(
        np.load(files[0], mmap_mode="r"), masks, 128, components_cache=(cache, key)
    )
    expected = first.per_image(t)
    assert [p.name for p in cache.iterdir()] == [f"{key}.npz"]
    loaded = ComponentTable.load(cache / f"{key}.npz", key)
    assert loaded is not None and np.array_equal(loaded.area, first.components.area)
    assert ComponentTable.load(cache / f"{key}.npz", "another key") is None
    second = TripletScorer(np.zeros_like(probs), masks, 128, components_cache=(cache, key))
    # the zero maps are never labelled: the cached table of the real maps answers
    assert np.array_equal(second.per_image(t), expected)
    changed = probs.copy()
    changed[:, :4] = 255
    np.save(files[0], changed)
    new_key = file_fingerprint(*files)
    assert new_key != key
    third = TripletScorer(changed, masks, 128, components_cache=(cache, new_key))
    assert np.array_equal(third.per_image(t), kaggle_dice_naive(changed, masks, t, 128))
    assert sorted(p.name for p in cache.iterdir()) == sorted([f"{key}.npz", f"{new_key}.npz"])


def test_kaggle_rules() -> None:
    probs = np.zeros((4, 4, 4), dtype=np.uint8)
    masks = np.zeros((4, 4, 4), dtype=np.uint8)
    probs[1, 3, 3] = 255  # 1: false positive on an empty mask
    masks[2, :2, :2] = 1  # 2: missed positive
    probs[3, 0, :3] = 255  # 3: prediction of 3 pixels, 2 of them inside a 2x2 truth
    masks[3, :2, :2] = 1
    t = Triplet(top_threshold=0.5, min_area=0, bottom_threshold=0.5)
    expected = np.array([1.0, 0.0, 0.0, 4 / 7])
    assert np.array_equal(kaggle_dice_naive(probs, masks, t, native=4), expected)
    scorer = TripletScorer(probs, masks, native=4)
    assert np.array_equal(scorer.per_image(t), expected)
    assert scorer.score(t) == np.mean(expected)
    assert scorer.empty_baseline() == 0.5


@pytest.mark.parametrize(
    ("components", "gate", "per_image_native"),
    [(False, False, False), (True, False, False), (False, True, False), (True, True, True)],
)
def test_scorer_matches_naive(
    data: tuple[np.ndarray, np.ndarray], components: bool, gate: bool, per_image_native: bool
) -> None:
    probs, masks = data
    rng = np.random.default_rng(4 * components + 2 * gate + per_image_native)
    native = rng.choice(NATIVES, size=N) if per_image_native else 128
    cls = rng.integers(0, 256, size=N, dtype=np.uint8) if gate else None
    scorer = TripletScorer(probs, masks, native, cls=cls, batch=7)
    subset = rng.choice(N, size=25, replace=False)
    scores, filtered = set(), 0
    for _ in range(40):
        t = _random_triplet(rng, components, gate)
        naive = kaggle_dice_naive(probs, masks, t, native, cls)
        fast = scorer.per_image(t)
        assert np.array_equal(fast, naive), t
        assert scorer.score(t) == naive.mean()
        assert np.array_equal(scorer.per_image(t, subset), naive[subset])
        assert scorer.score(t, subset) == naive[subset].mean()
        scores.add(scorer.score(t))
        plain = scorer.per_image(dataclasses.replace(t, min_component_area=0.0))
        filtered += not np.array_equal(plain, fast)
    assert len(scores) >= 10  # the random triplets are not all trivial
    assert filtered >= 3 if components else filtered == 0


def test_exhaustive_matches_bruteforce(data: tuple[np.ndarray, np.ndarray]) -> None:
    probs, masks = data
    scorer = TripletScorer(probs, masks, native=128)
    areas, levels = [0, 300, 2000, 6000], [0, 1, 30, 60, 90, 110, 128, 150, 180, 210, 254, 255]
    best, best_score, scores = scorer.exhaustive(areas, top_levels=levels, bottom_levels=levels)
    assert scores.shape == (len(areas), len(levels), len(levels))
    brute = np.empty_like(scores)
    for (a, area), (i, top), (j, bottom) in itertools.product(
        enumerate(areas), enumerate(levels), enumerate(levels)
    ):
        t = Triplet(top / 255, area, bottom / 255)
        brute[a, i, j] = kaggle_dice_naive(probs, masks, t, native=128).mean()
    np.testing.assert_allclose(scores, brute, rtol=0, atol=1e-12)
    assert best_score == pytest.approx(brute.max(), abs=1e-12)
    assert best_score == scorer.score(best)
    assert best.min_area in areas and level(best.top_threshold) in levels


def test_exhaustive_full_grid(data: tuple[np.ndarray, np.ndarray]) -> None:
    probs, masks = data
    rng = np.random.default_rng(3)
    native = rng.choice(NATIVES, size=N)
    cls = rng.integers(0, 256, size=N, dtype=np.uint8)
    scorer = TripletScorer(probs, masks, native, cls=cls)
    subset = np.arange(N) % 3 != 0
    areas = [0.0, 250.0, 1000.0]
    best, best_score, scores = scorer.exhaustive(areas, subset=subset, cls_gate=0.2)
    assert scores.shape == (3, 256, 256)
    a, i, j = np.unravel_index(np.argmax(scores), scores.shape)
    argmax = Triplet(i / 255, areas[a], j / 255, cls_gate=0.2)
    assert scorer.score(argmax, subset) == pytest.approx(scores.max(), abs=1e-12)
    assert best_score == pytest.approx(scores.max(), abs=1e-12)
    assert best_score == scorer.score(best, subset) >= scorer.empty_baseline(subset) - 1e-12
    for _ in range(20):  # spot checks of the array against the reference
        a, i, j = rng.integers(0, 3), rng.integers(0, 256), rng.integers(0, 256)
        t = Triplet(i / 255, areas[a], j / 255, cls_gate=0.2)
        ref = kaggle_dice_naive(probs, masks, t, native, cls)[subset].mean()
        assert scores[a, i, j] == pytest.approx(ref, abs=1e-12)
    ordered, ordered_score, _ = scorer.exhaustive(areas, subset=subset, ordered=True)
    assert ordered.bottom_threshold <= ordered.top_threshold
    with pytest.raises(ValueError):
        scorer.exhaustive(areas, min_component_area=100)


def test_exhaustive_best_searches_the_gate(data: tuple[np.ndarray, np.ndarray]) -> None:
    probs, masks = data
    cls = np.random.default_rng(4).integers(0, 256, size=N, dtype=np.uint8)
    scorer = TripletScorer(probs, masks, 128, cls=cls)
    gates = gate_levels((0.1, 0.3))
    assert gates[0] is None and gates[1:] == [lv / 255 for lv in range(26, 77, 5)]
    assert gate_levels(None) == [None]
    best, score = exhaustive_best(scorer, [0.0, 500.0], gates)
    per_gate = [scorer.exhaustive([0.0, 500.0], cls_gate=g, ordered=True)[1] for g in gates]
    assert score == pytest.approx(max(per_gate), abs=1e-12)
    assert best.cls_gate == gates[int(np.argmax(per_gate))]
    assert score == kaggle_dice_naive(probs, masks, best, 128, cls).mean()


def test_exhaustive_heatmap_marks_the_selected_triplet(
    data: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    from pneumoseg.plots import threshold_heatmap

    probs, masks = data
    scorer = TripletScorer(probs, masks, 128)
    areas = [0.0, 250.0, 1000.0]
    grids: dict = {}
    best, score = exhaustive_best(scorer, areas, [None], grids=grids)
    assert list(grids) == [None] and grids[None].shape == (3, 256, 256)
    marked = threshold_heatmap(grids[None], areas, best, tmp_path / "h.png")
    top, bottom = level(best.top_threshold), level(best.bottom_threshold)
    assert marked == {"area": best.min_area, "top": top, "bottom": bottom, "score": score}
    assert cv2.imread(str(tmp_path / "h.png")).shape[1] > 600  # a real image
    # a triplet off the grid (another min_area, or scored with another gate) is not marked
    off = Triplet(best.top_threshold, 123.0, best.bottom_threshold)
    assert threshold_heatmap(grids[None], areas, off, tmp_path / "off.png") is None
    assert threshold_heatmap(grids[None], areas, best, tmp_path / "g.png", same_gate=False) is None
    assert (tmp_path / "off.png").is_file() and (tmp_path / "g.png").is_file()


def test_empty_baseline(data: tuple[np.ndarray, np.ndarray]) -> None:
    probs, masks = data
    scorer = TripletScorer(probs, masks, native=128)
    empty = ~masks.any(axis=(1, 2))
    assert scorer.empty_baseline() == empty.mean()
    assert scorer.empty_baseline(np.arange(10)) == empty[:10].mean()
    never = Triplet(top_threshold=1.0, min_area=1, bottom_threshold=0.0)  # nothing is > 255
    assert scorer.score(never) == scorer.empty_baseline()


def test_memmap_input(data: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    probs, masks = data
    np.save(tmp_path / "probs.npy", probs)
    np.save(tmp_path / "masks.npy", masks)
    mm_probs = np.load(tmp_path / "probs.npy", mmap_mode="r")
    mm_masks = np.load(tmp_path / "masks.npy", mmap_mode="r")
    scorer = TripletScorer(mm_probs, mm_masks, native=128, batch=16)
    ref = TripletScorer(probs, masks, native=128)
    for t in (Triplet(0.7, 500, 0.3), Triplet(0.6, 100, 0.4, min_component_area=200)):
        assert np.array_equal(scorer.per_image(t), ref.per_image(t))
        assert np.array_equal(scorer.per_image(t), kaggle_dice_naive(probs, masks, t, 128))


def test_score_grouped(data: tuple[np.ndarray, np.ndarray]) -> None:
    probs, masks = data
    rng = np.random.default_rng(5)
    groups = rng.choice(np.array(["PA", "AP"]), size=N)
    triplets = {
        "PA": Triplet(0.75, 1500, 0.4),
        "AP": Triplet(0.6, 300, 0.2, min_component_area=100),
    }
    scorer = TripletScorer(probs, masks, native=128)
    mixed = np.where(
        groups == "PA",
        kaggle_dice_naive(probs, masks, triplets["PA"], 128),
        kaggle_dice_naive(probs, masks, triplets["AP"], 128),
    )
    assert score_grouped(scorer, groups, triplets) == mixed.mean()
    same = score_grouped(scorer, groups, {"PA": triplets["PA"], "AP": triplets["PA"]})
    assert same == scorer.score(triplets["PA"])
    with pytest.raises(ValueError):
        score_grouped(scorer, groups, {"PA": triplets["PA"]})


def test_suggest_triplet_tpe() -> None:
    import optuna  # a dependency: its absence is a failure, not a skip

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    probs, masks = _data(n=300, seed=1)
    scorer = TripletScorer(probs, masks, native=128)
    space = {
        "top_threshold": (0.3, 0.9),
        "bottom_threshold": (0.1, 0.8),
        "min_area": (0, 3000, 100),
    }
    # the exact optimum over the same space: every level and area step TPE can reach
    best, optimum, _ = scorer.exhaustive(
        range(0, 3001, 100),
        top_levels=range(level(0.3), level(0.9) + 1),
        bottom_levels=range(level(0.1), level(0.8) + 1),
        ordered=True,
    )
    assert optimum > scorer.empty_baseline() + 0.2  # post-processing matters on this data
    built: list[Triplet] = []

    def objective(trial: optuna.Trial) -> float:
        t = suggest_triplet(trial, space, prefix="PA/")
        built.append(t)
        assert trial.user_attrs["PA/bottom_threshold"] == t.bottom_threshold
        return scorer.score(t)

    sampler = optuna.samplers.TPESampler(seed=0, multivariate=True)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.optimize(objective, n_trials=30)
    assert all(t.bottom_threshold <= t.top_threshold for t in built)
    assert all(p.startswith("PA/") for p in study.best_params)
    found = triplet_from_params(study.best_params, space, prefix="PA/")
    assert found == built[study.best_trial.number]
    assert scorer.score(found) == study.best_value
    assert optimum - 0.03 <= study.best_value <= optimum + 1e-12


def test_suggest_triplet_space() -> None:
    import optuna  # a dependency: its absence is a failure, not a skip

    space = {
        "top_threshold": (0.5, 0.9),
        "bottom_threshold": 0.3,  # fixed
        "min_area": (0, 5000, 100),
        "min_component_area": (0, 1000, 50),
        "cls_gate": (0.1, 0.6),
    }
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        t = suggest_triplet(trial, space)
        assert t.bottom_threshold == 0.3 and 0.5 <= t.top_threshold <= 0.9
        assert t.min_area % 100 == 0 and t.min_component_area % 50 == 0
        assert t.cls_gate is not None and 0.1 <= t.cls_gate <= 0.6
        assert triplet_from_params(trial.params, space) == t
        study.tell(trial, 0.0)
    for bad in (
        {"top_threshold": (0.5, 0.9), "bottom_threshold": (0.6, 0.8), "min_area": (0, 10)},
        {"top_threshold": (0.5, 1.2), "bottom_threshold": (0.1, 0.2), "min_area": (0, 10)},
        {"top_threshold": (0.5, 0.9), "bottom_threshold": (0.1, 0.2)},
        {"top_threshold": 0.5, "bottom_threshold": 0.1, "min_area": 0, "typo": 1},
    ):
        with pytest.raises(ValueError):
            suggest_triplet(study.ask(), bad)

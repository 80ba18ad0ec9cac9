"""Benchmark of the triplet threshold search (pneumoseg.postprocess) on synthetic OOF maps.

Builds N uint8 probability maps (soft blurred ellipses: one over the truth of ~25% positive
images, weaker decoys, low-frequency background noise) and prints: precompute time, the cost
of one triplet evaluation vs re-thresholding the maps (reference loop and a vectorised numpy
pass), Optuna TPE trials per second, the component-filter path and the exhaustive grid time.
No assertions on time. Usage: ``python bench/thresholds.py [--n 2000] [--size 256]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import cv2
import numpy as np

from pneumoseg.postprocess import (
    Triplet,
    TripletScorer,
    kaggle_dice_naive,
    level,
    scale_area,
    suggest_triplet,
)

NATIVE = 1024
AREAS = [0, 500, 1000, 2000, 3000, 4000, 5000]
SPACE = {"top_threshold": (0.3, 0.95), "bottom_threshold": (0.1, 0.9), "min_area": (0, 5000, 50)}


def make_data(
    n: int, size: int, seed: int = 0, background: float = 0.4
) -> tuple[np.ndarray, np.ndarray]:
    """``(probs, masks)`` uint8 ``(n, size, size)`` with plausible blob structure.

    Positives (~25%) get an ellipse of peak 0.45..1 over a jittered truth ellipse; any image
    gets up to two weaker, smaller decoys (peak 0.2..0.9) and a smooth background (amplitude up
    to ``background``; 0 gives the exact zeros a sigmoid output quantises to far from lesions).
    Maps are drawn in uint8 at a quarter of the size and upsampled bilinearly, which
    softens the edges like a network output and keeps generation fast.
    """
    rng = np.random.default_rng(seed)
    probs = np.empty((n, size, size), dtype=np.uint8)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    small = max(size // 4, 8)
    low = (rng.random((n, 8, 8)) * rng.uniform(0, background * 255, (n, 1, 1))).astype(np.uint8)
    for i in range(n):
        canvas = cv2.resize(low[i], (small, small), interpolation=cv2.INTER_CUBIC)
        positive = rng.random() < 0.25
        for b in range(int(rng.integers(0, 3)) + positive):
            strong = positive and b == 0
            center = rng.uniform([0.125, 0.0], [0.875, 1.0]) * size
            axes = rng.uniform(8, 40, 2) if strong else rng.uniform(3, 12, 2)
            axes *= size / 256
            angle = float(rng.uniform(0, 180))
            peak = rng.uniform(0.45, 1.0) if strong else rng.uniform(0.2, 0.9)
            f = small / size
            c_small = (int(center[0] * f), int(center[1] * f))
            ax_small = (max(1, int(axes[0] * f)), max(1, int(axes[1] * f)))
            cv2.ellipse(canvas, c_small, ax_small, angle, 0, 360, int(peak * 255), -1)
            if strong:  # the truth: the same ellipse at full size, jittered
                shift = center + rng.normal(0, 2 * size / 256, 2)
                jit = axes * rng.uniform(0.8, 1.2, 2)
                c_full = (int(shift[0]), int(shift[1]))
                ax_full = (max(1, int(jit[0])), max(1, int(jit[1])))
                cv2.ellipse(masks[i], c_full, ax_full, angle, 0, 360, 1, -1)
        probs[i] = cv2.resize(canvas, (size, size), interpolation=cv2.INTER_LINEAR)
    return probs, masks


def numpy_pass(probs: np.ndarray, gt: np.ndarray, gt_count: np.ndarray, t: Triplet) -> float:
    """Plain vectorised re-thresholding of every map (the non-precomputed alternative)."""
    top = np.count_nonzero(probs > level(t.top_threshold), axis=(1, 2))
    pred = probs > level(t.bottom_threshold)
    p = np.count_nonzero(pred, axis=(1, 2))
    tp = np.count_nonzero(pred & gt, axis=(1, 2))
    empty = top < scale_area(t.min_area, probs.shape[1], NATIVE)
    p, tp = np.where(empty, 0, p), np.where(empty, 0, tp)
    den = p + gt_count
    return float(np.where(den > 0, 2 * tp / np.maximum(den, 1), 1.0).mean())


def timed(fn: Callable[[], object], repeat: int) -> float:
    """Median wall time of ``repeat`` calls, seconds."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_triplets(rng: np.random.Generator, k: int) -> list[Triplet]:
    out = []
    for _ in range(k):
        top = float(rng.uniform(0.3, 0.95))
        out.append(Triplet(top, float(rng.integers(0, 5001)), float(rng.uniform(0.1, top))))
    return out


def labelled_levels(probs: np.ndarray, masks: np.ndarray, levels: list[int]) -> float:
    """The bare baseline: seconds to label ``probs > l`` of every map with cv2 (foreground box
    only, as :func:`apply_triplet` does) and sum each component's truth overlap, per level, as
    the scorer did before its component table (one pass over the maps per level)."""
    start = time.perf_counter()
    for lvl in levels:
        for i in range(len(probs)):
            binary = (probs[i] > lvl).view(np.uint8)
            x, y, w, h = cv2.boundingRect(binary)
            if w and h:
                count, labels, _, _ = cv2.connectedComponentsWithStats(
                    np.ascontiguousarray(binary[y : y + h, x : x + w]), connectivity=8
                )
                np.bincount(labels[masks[i, y : y + h, x : x + w] != 0], minlength=count)
    return time.perf_counter() - start


def component_filter(
    probs: np.ndarray, masks: np.ndarray, scorer: TripletScorer, trials: int, sample: int
) -> None:
    """The ``min_component_area`` path: the component table (one max-tree per map, all levels)
    against the bare per-level labelling, and a TPE search with and without the filter."""
    import optuna

    fresh = TripletScorer(probs, masks, native=NATIVE)
    start = time.perf_counter()
    table = fresh.components
    build = time.perf_counter() - start
    print(
        f"component table (all 256 levels, one max-tree per map): {build:.2f} s, "
        f"{len(table.area):,} nodes, {table.nbytes / 2**20:.0f} MiB"
    )
    levels = [int(v) for v in np.linspace(0, 255, sample, endpoint=False)]
    per_level = labelled_levels(probs, masks, levels) / len(levels)
    print(
        f"bare baseline, cv2 labelling per level: {per_level:.2f} s per level (mean of "
        f"{len(levels)}) -> {per_level * 256:.0f} s for 256 levels (extrapolated) = "
        f"{per_level * 256 / build:.1f}x the table; the table pays off from "
        f"{build / per_level:.0f} levels on"
    )
    start = time.perf_counter()
    for lvl in range(256):
        fresh.score(Triplet(0.0, 0, lvl / 255, min_component_area=1000))
    print(f"then all 256 bottom levels with the filter: {time.perf_counter() - start:.2f} s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = SPACE | {"min_component_area": (0, 3000, 50)}
    for name, each_space, each_scorer in (
        ("without min_component_area", SPACE, scorer),
        ("with min_component_area (table built inside)", space, TripletScorer(probs, masks, 1024)),
    ):
        study = optuna.create_study(
            direction="maximize", sampler=optuna.samplers.TPESampler(seed=0)
        )
        start = time.perf_counter()
        study.optimize(
            lambda tr, sc=each_scorer, sp=each_space: sc.score(suggest_triplet(tr, sp)), trials
        )
        print(
            f"TPE {trials} trials {name}: {time.perf_counter() - start:.2f} s, "
            f"best {study.best_value:.4f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument(
        "--background", type=float, default=0.4, help="max amplitude of the smooth background"
    )
    parser.add_argument(
        "--levels", type=int, default=8, help="levels the per-level baseline labels (sampled)"
    )
    args = parser.parse_args()
    rng = np.random.default_rng(1)

    start = time.perf_counter()
    probs, masks = make_data(args.n, args.size, background=args.background)
    elapsed = time.perf_counter() - start
    print(f"data: {args.n} x {args.size}^2 maps (background <= {args.background}): {elapsed:.2f} s")

    start = time.perf_counter()
    scorer = TripletScorer(probs, masks, native=NATIVE)
    print(f"precompute: {time.perf_counter() - start:.2f} s")
    print(f"empty baseline: {scorer.empty_baseline():.4f}")

    triplets = random_triplets(rng, 2000)
    times = []
    for t in triplets:
        start = time.perf_counter()
        scorer.score(t)
        times.append(time.perf_counter() - start)
    one = statistics.median(times)
    print(f"one triplet (score, median of {len(times)}): {one * 1e6:.1f} us")

    gt = masks != 0
    gt_count = np.count_nonzero(gt, axis=(1, 2))
    sample = triplets[:3]
    for t in sample:  # sanity: all three paths agree
        ref = float(kaggle_dice_naive(probs, masks, t, NATIVE).mean())
        assert abs(scorer.score(t) - ref) < 1e-12
        assert abs(numpy_pass(probs, gt, gt_count, t) - ref) < 1e-12
    naive = timed(lambda: kaggle_dice_naive(probs, masks, sample[0], NATIVE), 3)
    vec = timed(lambda: numpy_pass(probs, gt, gt_count, sample[1]), 3)
    print(f"kaggle_dice_naive (per-image loop): {naive * 1e3:.0f} ms -> {naive / one:,.0f}x slower")
    print(f"vectorised numpy pass:              {vec * 1e3:.0f} ms -> {vec / one:,.0f}x slower")

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spent = [0.0]
    for multivariate in (False, True):
        sampler = optuna.samplers.TPESampler(seed=0, multivariate=multivariate)
        study = optuna.create_study(direction="maximize", sampler=sampler)
        spent[0] = 0.0

        def objective(trial: optuna.Trial) -> float:
            t = suggest_triplet(trial, SPACE)
            begin = time.perf_counter()
            value = scorer.score(t)
            spent[0] += time.perf_counter() - begin
            return value

        start = time.perf_counter()
        study.optimize(objective, n_trials=args.trials)
        total = time.perf_counter() - start
        print(
            f"optuna TPE (multivariate={multivariate}): {args.trials} trials in {total:.2f} s = "
            f"{args.trials / total:.0f} trials/s (scoring {spent[0] / total:.1%} of it), "
            f"best {study.best_value:.4f}"
        )

    component_filter(probs, masks, scorer, args.trials, args.levels)

    start = time.perf_counter()
    best, best_score, scores = scorer.exhaustive(AREAS)
    elapsed = time.perf_counter() - start
    print(
        f"exhaustive {len(AREAS)} areas x 256 top x 256 bottom ({scores.size:,} triplets): "
        f"{elapsed:.2f} s; best {best_score:.4f} at top={level(best.top_threshold)}/255 "
        f"area={best.min_area:g} bottom={level(best.bottom_threshold)}/255"
    )
    _, ordered_score, _ = scorer.exhaustive(AREAS, ordered=True)
    print(f"exhaustive, bottom <= top only: best {ordered_score:.4f}")


if __name__ == "__main__":
    main()

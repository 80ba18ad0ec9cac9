"""Per-image metrics and the Kaggle dice rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pneumoseg.metrics import SegMetrics, image_stats, kaggle_dice, kaggle_dice_min_area

SIZE = 4


def _mask(*pixels: tuple[int, int]) -> torch.Tensor:
    m = torch.zeros(1, 1, SIZE, SIZE)
    for r, c in pixels:
        m[0, 0, r, c] = 1.0
    return m


EMPTY = _mask()
ONE_PIXEL = _mask((3, 3))
TRUTH4 = _mask((0, 0), (0, 1), (1, 0), (1, 1))  # 2x2 square
PRED3 = _mask((0, 0), (0, 1), (0, 2))  # overlaps TRUTH4 in 2 pixels: tp 2, fp 1, fn 2


def _batch(*masks: torch.Tensor) -> torch.Tensor:
    return torch.cat(masks, dim=0)


# (prediction, truth, dice, iou): empty/empty, empty truth + fp, hand example, missed positive
CASES = [
    (EMPTY, EMPTY, 1.0, 1.0),
    (ONE_PIXEL, EMPTY, 0.0, 0.0),
    (PRED3, TRUTH4, 4 / 7, 2 / 5),
    (EMPTY, TRUTH4, 0.0, 0.0),
]


def test_image_stats_counts() -> None:
    stats = image_stats(_batch(PRED3, EMPTY), _batch(TRUTH4, EMPTY), 0.5)
    assert stats.dtype == np.int64 and stats.shape == (2, 4)
    assert stats.tolist() == [[2, 1, 2, 11], [0, 0, 0, 16]]


def test_kaggle_dice_rule() -> None:
    tp, fp, fn = np.array([0, 0, 2]), np.array([0, 1, 1]), np.array([0, 0, 2])
    assert kaggle_dice(tp, tp + fp, tp + fn).tolist() == pytest.approx([1.0, 0.0, 4 / 7])


@pytest.mark.parametrize(("pred", "truth", "dice", "iou"), CASES)
def test_single_image_cases(pred: torch.Tensor, truth: torch.Tensor, dice: float, iou: float):
    m = SegMetrics()
    m.update(pred, truth)
    assert m.per_image().tolist() == pytest.approx([dice])
    out = m.compute()
    assert out["kaggle_dice"] == pytest.approx(dice)
    if truth.any():
        assert out["iou_pos"] == pytest.approx(iou)


def test_mixed_batch_matches_hand_average() -> None:
    m = SegMetrics(threshold=0.5)
    m.update(_batch(*(c[0] for c in CASES)), _batch(*(c[1] for c in CASES)))
    out = m.compute()
    assert out["kaggle_dice"] == pytest.approx((1 + 0 + 4 / 7 + 0) / 4)
    assert out["dice_pos"] == pytest.approx((4 / 7 + 0) / 2)
    assert out["iou_pos"] == pytest.approx((2 / 5 + 0) / 2)
    assert out["empty_acc"] == pytest.approx(1 / 2)  # empty/empty right, one-pixel fp wrong
    assert out["pos_acc"] == pytest.approx(1 / 2)  # hand example found, missed one not
    assert out["empty_baseline"] == pytest.approx(2 / 4)
    assert out["n_images"] == 4 and out["n_pos"] == 2
    assert m.per_image().tolist() == pytest.approx([c[2] for c in CASES])


def test_threshold_side_is_inclusive() -> None:
    # a pixel with prob exactly at the threshold is predicted positive (>=, as smp get_stats)
    probs = TRUTH4 * 0.7
    m = SegMetrics(threshold=0.7)
    m.update(probs, TRUTH4)
    assert m.compute()["kaggle_dice"] == 1.0
    m = SegMetrics(threshold=0.70001)
    m.update(probs, TRUTH4)
    assert m.compute()["kaggle_dice"] == 0.0


def test_threshold_is_not_applied_to_the_target() -> None:
    # smp's own threshold= argument would also binarise the target with it
    stats = image_stats(torch.full((1, 1, SIZE, SIZE), 0.1), EMPTY, 0.0)
    assert stats.tolist() == [[0, 16, 0, 0]]


def test_soft_probabilities_and_float_target() -> None:
    probs = TRUTH4 * 0.9 + 0.05  # 0.95 inside, 0.05 outside
    m = SegMetrics()
    m.update(probs, TRUTH4.double())
    assert m.compute()["kaggle_dice"] == 1.0


def test_accumulation_equals_one_big_update() -> None:
    rng = torch.Generator().manual_seed(0)
    probs = torch.rand(10, 1, 8, 8, generator=rng)
    truth = (torch.rand(10, 1, 8, 8, generator=rng) > 0.7).float()
    truth[::3] = 0  # some empty images
    one = SegMetrics(0.6)
    one.update(probs, truth)
    many = SegMetrics(0.6)
    for lo, hi in [(0, 3), (3, 4), (4, 10)]:
        many.update(probs[lo:hi], truth[lo:hi])
    assert many.compute() == pytest.approx(one.compute())
    np.testing.assert_allclose(many.per_image(), one.per_image())


def test_empty_baseline_is_the_all_empty_predictor() -> None:
    truth = _batch(EMPTY, EMPTY, EMPTY, TRUTH4, ONE_PIXEL)
    m = SegMetrics()
    m.update(torch.zeros_like(truth), truth)
    out = m.compute()
    assert out["empty_baseline"] == pytest.approx(3 / 5)
    assert out["kaggle_dice"] == pytest.approx(out["empty_baseline"])
    assert out["empty_acc"] == 1.0 and out["pos_acc"] == 0.0


def test_no_positives_and_no_images_are_nan_free() -> None:
    m = SegMetrics()
    m.update(_batch(EMPTY, ONE_PIXEL), _batch(EMPTY, EMPTY))
    out = m.compute()
    assert out["dice_pos"] == 0.0 and out["iou_pos"] == 0.0 and out["pos_acc"] == 1.0
    assert out["n_pos"] == 0 and out["empty_acc"] == 0.5
    m.reset()
    out = m.compute()
    assert out["n_images"] == 0 and m.per_image().shape == (0,)
    assert not any(math.isnan(v) for v in out.values())


def test_kaggle_dice_with_min_area_against_hand_values() -> None:
    """10x10 images: a 3-pixel speck on an empty image, a 20-pixel hit (16 overlap) on a
    25-pixel lesion, and a missed 4-pixel lesion with 2 stray pixels elsewhere."""
    probs = torch.zeros(3, 1, 10, 10)
    target = torch.zeros(3, 1, 10, 10)
    probs[0, 0, 0, :3] = 0.9  # speck on an empty image
    target[1, 0, :5, :5] = 1
    probs[1, 0, :4, :5] = 0.8  # 20 predicted, 20 of them inside the 25-pixel lesion
    target[2, 0, 8:, 8:] = 1
    probs[2, 0, 0, :2] = 0.7  # 2 stray pixels, lesion missed
    m = SegMetrics(0.5)
    m.update(probs, target)
    out = m.compute()
    hit = 2 * 20 / (20 + 25)
    assert out["kaggle_dice"] == pytest.approx((0 + hit + 0) / 3)
    score, f = kaggle_dice_min_area(*m.stats().T, fractions=(0.0, 0.03, 0.05))
    # f=0.03 (3 px): speck kept (3 >= 3), stray emptied -> dice 0 (truth not empty): no gain.
    # f=0.05 (5 px): speck emptied -> 1, stray emptied -> 0, hit kept: (1 + hit + 0) / 3.
    assert (score, f) == (pytest.approx((1 + hit) / 3), 0.05)
    assert out["kaggle_dice_area"] == pytest.approx((0 + hit + 0) / 3)  # the grid is finer
    assert out["min_area_fraction"] == 0.0

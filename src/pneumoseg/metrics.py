"""The Kaggle (SIIM-ACR) dice, the one implementation every score uses, and per-image
segmentation metrics over batches.

The Kaggle rule: per image ``2 |P & G| / (|P| + |G|)``, and 1 when the prediction and the truth
are both empty; the score of a set is the mean over its images. :func:`kaggle_dice` computes it
from pixel counts; the training metrics (:class:`SegMetrics`), the threshold scorer
(:mod:`pneumoseg.postprocess`) and ``pneumoseg score`` all call it.

A pixel is predicted positive when ``prob >= threshold`` (the same ``>=`` as
:func:`smp.metrics.get_stats`); target pixels are positive when ``> 0.5``. torch and smp are
imported only where tensors are counted, so the numpy scorers stay light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor


def kaggle_dice(tp: Any, pred: Any, truth: Any) -> np.ndarray:
    """Per-image Kaggle dice from pixel counts: ``2 tp / (pred + truth)``, 1.0 where
    ``pred + truth == 0`` (float64).

    Counts may be int64 or float64 holding integers (exact below 2**53): the quotient of the
    same two integers is correctly rounded either way, so every caller gets identical floats.
    """
    num = np.add(tp, tp, dtype=np.float64)
    den = np.add(pred, truth, dtype=np.float64)
    none = den == 0  # empty prediction on an empty mask: 1 / 1
    num += none
    den += none
    return num / den


def iou(tp: Any, pred: Any, truth: Any) -> np.ndarray:
    """Per-image IoU ``tp / (pred + truth - tp)``, 1.0 where both are empty (float64)."""
    num = np.asarray(tp, dtype=np.float64)
    den = np.add(pred, truth, dtype=np.float64) - num
    none = den == 0
    return (num + none) / (den + none)


def image_stats(probs: Tensor, target: Tensor, threshold: float) -> np.ndarray:
    """``(B, 4)`` int64 ``tp, fp, fn, tn`` pixel counts per image of ``(B, 1, H, W)`` inputs.

    The probabilities are binarised here (``>= threshold``) and integer masks are handed to
    ``smp.metrics.get_stats``: with a float ``threshold`` argument smp would also threshold the
    *target* with it (so ``threshold=0`` would turn every target pixel positive).
    """
    import segmentation_models_pytorch as smp
    import torch

    if probs.shape != target.shape:
        raise ValueError(f"probs {tuple(probs.shape)} != target {tuple(target.shape)}")
    if probs.dim() < 3 or probs.shape[1] != 1:
        raise ValueError(f"expected (B, 1, H, W) probabilities, got {tuple(probs.shape)}")
    pred = (probs.detach() >= threshold).long()
    truth = (target.detach() > 0.5).long()
    tp, fp, fn, tn = smp.metrics.get_stats(pred, truth, mode="binary")
    return torch.cat([tp, fp, fn, tn], dim=1).long().cpu().numpy()


MIN_AREA_FRACTIONS = (0.0, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02)


def kaggle_dice_min_area(
    tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, tn: np.ndarray, fractions: tuple[float, ...]
) -> tuple[float, float]:
    """Best mean Kaggle dice when a prediction smaller than ``f * H * W`` pixels is emptied,
    over ``fractions`` ``f``; returns ``(score, f)`` (the first ``f`` wins ties).

    The simplest post-processing rule, tuned on the scored images themselves: optimistic as an
    estimate, but comparable across epochs and runs where the raw ``kaggle_dice`` is swamped by
    stray pixels on empty images."""
    tp, fp, fn, tn = (np.asarray(x, dtype=np.int64) for x in (tp, fp, fn, tn))
    if tp.size == 0:
        return 0.0, fractions[0]
    dice = kaggle_dice(tp, tp + fp, tp + fn)
    emptied = ((tp + fn) == 0).astype(np.float64)  # the dice of an emptied prediction
    area, pixels = tp + fp, tp + fp + fn + tn
    best = (-1.0, fractions[0])
    for f in fractions:
        score = float(np.where(area >= f * pixels, dice, emptied).mean())
        if score > best[0] + 1e-12:
            best = (score, f)
    return best


class SegMetrics:
    """Accumulates per-image pixel counts over batches; see :meth:`compute`."""

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = threshold
        self._stats: list[np.ndarray] = []

    @classmethod
    def of(cls, stats: np.ndarray, threshold: float = 0.5) -> SegMetrics:
        """Metrics over the given ``(N, 4)`` per-image ``tp, fp, fn, tn`` rows."""
        metrics = cls(threshold)
        if len(stats):
            metrics._stats.append(np.asarray(stats, dtype=np.int64))
        return metrics

    def update(self, probs: Tensor, target: Tensor) -> None:
        """Add a batch: ``probs`` ``(B, 1, H, W)`` in [0, 1], ``target`` 0/1 of the same shape."""
        self._stats.append(image_stats(probs, target, self.threshold))

    def reset(self) -> None:
        """Forget all images."""
        self._stats.clear()

    def stats(self) -> np.ndarray:
        """``(N, 4)`` int64 ``tp, fp, fn, tn`` of every image so far, in update order."""
        if not self._stats:
            return np.zeros((0, 4), dtype=np.int64)
        return np.concatenate(self._stats, axis=0)

    def per_image(self) -> np.ndarray:
        """Kaggle dice of every image so far, in update order."""
        tp, fp, fn, _ = self.stats().T
        return kaggle_dice(tp, tp + fp, tp + fn)

    def compute(self) -> dict[str, float]:
        """Summary over all images so far.

        - ``kaggle_dice``: mean over all images of the per-image dice (empty/empty = 1).
        - ``dice_pos`` / ``iou_pos``: mean dice / IoU over images with a non-empty target
          (0.0 when there are none, so the value is never NaN).
        - ``empty_acc``: fraction of empty-target images predicted empty (1.0 if none).
        - ``pos_acc``: fraction of non-empty-target images predicted non-empty (1.0 if none).
        - ``empty_baseline``: ``kaggle_dice`` of an all-empty predictor (= fraction of empty
          images).
        - ``kaggle_dice_area``, ``min_area_fraction``: :func:`kaggle_dice_min_area` over
          :data:`MIN_AREA_FRACTIONS`.
        - ``n_images``, ``n_pos``: counts.

        With no images at all every mean is 0.0 and both accuracies 1.0.
        """
        tp, fp, fn, tn = self.stats().T
        n = int(tp.size)
        dice = kaggle_dice(tp, tp + fp, tp + fn)
        overlap = iou(tp, tp + fp, tp + fn)
        pos = (tp + fn) > 0
        pred_pos = (tp + fp) > 0
        n_pos = int(pos.sum())
        n_empty = n - n_pos

        def mean(x: np.ndarray) -> float:
            return float(x.mean()) if x.size else 0.0

        area_score, area_fraction = kaggle_dice_min_area(tp, fp, fn, tn, MIN_AREA_FRACTIONS)
        return {
            "kaggle_dice": mean(dice),
            "dice_pos": mean(dice[pos]),
            "iou_pos": mean(overlap[pos]),
            "empty_acc": float((~pred_pos[~pos]).mean()) if n_empty else 1.0,
            "pos_acc": float(pred_pos[pos].mean()) if n_pos else 1.0,
            "empty_baseline": n_empty / n if n else 0.0,
            "kaggle_dice_area": area_score,
            "min_area_fraction": area_fraction,
            "n_images": n,
            "n_pos": n_pos,
        }

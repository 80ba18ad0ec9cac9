"""Per-image segmentation metrics with the Kaggle (SIIM-ACR) dice rule.

A pixel is predicted positive when ``prob >= threshold`` (the same ``>=`` as
:func:`smp.metrics.get_stats`); target pixels are positive when ``> 0.5``. The Kaggle rule scores
an image whose prediction and truth are both empty as dice 1; an empty truth with any predicted
pixel scores 0.
"""

from __future__ import annotations

import numpy as np
import segmentation_models_pytorch as smp
import torch
from torch import Tensor


def image_stats(probs: Tensor, target: Tensor, threshold: float) -> Tensor:
    """``(B, 4)`` int64 ``tp, fp, fn, tn`` pixel counts per image of ``(B, 1, H, W)`` inputs.

    The probabilities are binarised here (``>= threshold``) and integer masks are handed to
    ``smp.metrics.get_stats``: with a float ``threshold`` argument smp would also threshold the
    *target* with it (so ``threshold=0`` would turn every target pixel positive).
    """
    if probs.shape != target.shape:
        raise ValueError(f"probs {tuple(probs.shape)} != target {tuple(target.shape)}")
    if probs.dim() < 3 or probs.shape[1] != 1:
        raise ValueError(f"expected (B, 1, H, W) probabilities, got {tuple(probs.shape)}")
    pred = (probs.detach() >= threshold).long()
    truth = (target.detach() > 0.5).long()
    tp, fp, fn, tn = smp.metrics.get_stats(pred, truth, mode="binary")
    return torch.cat([tp, fp, fn, tn], dim=1).long().cpu()


def _ratio_or_one(num: Tensor, den: Tensor) -> Tensor:
    num, den = num.double(), den.double()
    return torch.where(den > 0, num / den.clamp_min(1), torch.ones_like(den))


def dice_per_image(tp: Tensor, fp: Tensor, fn: Tensor) -> Tensor:
    """``2tp / (2tp + fp + fn)`` per image (float64), 1.0 where ``tp + fp + fn == 0``."""
    return _ratio_or_one(2 * tp, 2 * tp + fp + fn)


def iou_per_image(tp: Tensor, fp: Tensor, fn: Tensor) -> Tensor:
    """``tp / (tp + fp + fn)`` per image (float64), 1.0 where ``tp + fp + fn == 0``."""
    return _ratio_or_one(tp, tp + fp + fn)


MIN_AREA_FRACTIONS = (0.0, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02)


def kaggle_dice_min_area(
    tp: Tensor, fp: Tensor, fn: Tensor, tn: Tensor, fractions: tuple[float, ...]
) -> tuple[float, float]:
    """Best mean Kaggle dice when a prediction smaller than ``f * H * W`` pixels is emptied,
    over ``fractions`` ``f``; returns ``(score, f)`` (the first ``f`` wins ties).

    The simplest post-processing rule, tuned on the scored images themselves: optimistic as an
    estimate, but comparable across epochs and runs where the raw ``kaggle_dice`` is swamped by
    stray pixels on empty images."""
    if tp.numel() == 0:
        return 0.0, fractions[0]
    dice = dice_per_image(tp, fp, fn)
    emptied = ((tp + fn) == 0).double()  # the dice of an emptied prediction
    area, pixels = (tp + fp).double(), (tp + fp + fn + tn).double()
    best = (-1.0, fractions[0])
    for f in fractions:
        score = float(torch.where(area >= f * pixels, dice, emptied).mean())
        if score > best[0] + 1e-12:
            best = (score, f)
    return best


class SegMetrics:
    """Accumulates per-image pixel counts over batches; see :meth:`compute`."""

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = threshold
        self._stats: list[Tensor] = []

    def update(self, probs: Tensor, target: Tensor) -> None:
        """Add a batch: ``probs`` ``(B, 1, H, W)`` in [0, 1], ``target`` 0/1 of the same shape."""
        self._stats.append(image_stats(probs, target, self.threshold))

    def reset(self) -> None:
        """Forget all images."""
        self._stats.clear()

    def stats(self) -> Tensor:
        """``(N, 4)`` int64 ``tp, fp, fn, tn`` of every image so far, in update order."""
        if not self._stats:
            return torch.zeros((0, 4), dtype=torch.long)
        return torch.cat(self._stats, dim=0)

    def per_image(self) -> np.ndarray:
        """Kaggle dice of every image so far, in update order."""
        tp, fp, fn, _ = self.stats().unbind(1)
        return dice_per_image(tp, fp, fn).numpy()

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
        tp, fp, fn, tn = self.stats().unbind(1)
        n = int(tp.numel())
        dice = dice_per_image(tp, fp, fn)
        iou = iou_per_image(tp, fp, fn)
        pos = (tp + fn) > 0
        pred_pos = (tp + fp) > 0
        n_pos = int(pos.sum())
        n_empty = n - n_pos

        def mean(x: Tensor) -> float:
            return float(x.mean()) if x.numel() else 0.0

        area_score, area_fraction = kaggle_dice_min_area(tp, fp, fn, tn, MIN_AREA_FRACTIONS)

        return {
            "kaggle_dice": mean(dice),
            "dice_pos": mean(dice[pos]),
            "iou_pos": mean(iou[pos]),
            "empty_acc": float((~pred_pos[~pos]).double().mean()) if n_empty else 1.0,
            "pos_acc": float(pred_pos[pos].double().mean()) if n_pos else 1.0,
            "empty_baseline": n_empty / n if n else 0.0,
            "kaggle_dice_area": area_score,
            "min_area_fraction": area_fraction,
            "n_images": n,
            "n_pos": n_pos,
        }
